"""The domain-shift split: the test images of a second source (grid.shift), scored by every grid cell and by the
champion, never trained or selected on."""
from __future__ import annotations

from medssl.config import Csv, Params
from medssl.data.folder import build_csv
from medssl.data.images import to_channels
from medssl.data.prepare import resize_u8
from medssl.data.sources import Split
from medssl.errors import ConfigError


def load_shift(p: Params, meta: dict, size: int | None = None) -> Split | None:
    """The test split of the second source (a CSV whose labels are grid.shift.classes, or the dataset's class
    names, by label order; split by its groups), at `size` px (None: the prepared data's) and its channels."""
    if p.grid.shift is None:
        return None
    s, classes, size = p.grid.shift, meta["classes"], size or p.image_size
    if s.classes is not None and len(s.classes) != len(classes):
        raise ConfigError(f"grid.shift.classes has {len(s.classes)} names {s.classes}; the dataset has {len(classes)}: "
                         f"{classes} (one name per class, in the dataset's label order)")
    cfg = Csv(file=s.csv, images=s.images, columns=s.columns, size=size)
    test = build_csv(cfg, p.seed, s.classes or classes, complete=False).splits["test"]
    x = resize_u8(test.images, size)
    return Split(to_channels(x, meta.get("channels", 3)), test.labels)  # as `medssl predict` reads its files
