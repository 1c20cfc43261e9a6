"""Stage `prepare`: raw npz -> arrays at `image_size` (and at the champion's `finetune_image_size` where that differs),
normalisation stats, data card."""
from __future__ import annotations

import hashlib
import json

import numpy as np
import torch
import torch.nn.functional as F

from medssl.config import Params
from medssl.data.fractions import nested_fractions
from medssl.data.sources import SPLITS, Split, md5sum, validate_raw
from medssl.errors import DataError, MissingInput, StaleStageError
from medssl.guard import one_writer
from medssl.io import save_npz, write_json
from medssl.layout import Layout


def resize_u8(images: np.ndarray, size: int, batch: int = 2048) -> np.ndarray:
    """(N, h, w, C) uint8 -> (N, size, size, C) uint8, bilinear as in the exported ONNX graph."""
    if images.shape[1] == size and images.shape[2] == size:
        return images
    out = np.empty((len(images), size, size, images.shape[-1]), np.uint8)
    for i in range(0, len(images), batch):
        x = torch.from_numpy(images[i : i + batch]).permute(0, 3, 1, 2).float()
        y = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        out[i : i + batch] = y.round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()
    return out


def stratified_subset(split: Split, n: int | None, seed: int) -> Split:
    """About n examples (each class keeps round(n * share), at least one), seeded; sorted order kept."""
    if n is None or n >= len(split.labels):
        return split
    idx = nested_fractions(split.labels, [n / len(split.labels)], seed)[n / len(split.labels)]
    return Split(split.images[idx], split.labels[idx])


@one_writer(lambda a: "prepare")
def run_prepare(p: Params, lay: Layout = Layout()) -> dict:
    raw_path = lay.raw(p.data.path)
    splits, info = validate_raw(raw_path, p, "data.path")
    raw_size = int(splits["train"].images.shape[1])
    splits["train"] = stratified_subset(splits["train"], p.data.max_train, p.seed)
    for s in ("val", "test"):
        splits[s] = stratified_subset(splits[s], p.data.max_eval, p.seed)

    arrays = {}
    for s in SPLITS:
        arrays[f"{s}_images"] = resize_u8(splits[s].images, p.image_size)
        arrays[f"{s}_labels"] = splits[s].labels
        if p.finetune_image_size != p.image_size:  # the champion's own resolution, resized from the raw images
            arrays[images_key(s, p.finetune_image_size)] = resize_u8(splits[s].images, p.finetune_image_size)
    x = arrays["train_images"].reshape(-1, info.channels).astype(np.float64) / 255.0  # train only: no leakage
    mean, std = x.mean(0).tolist(), x.std(0).tolist()

    save_npz(lay.prepared, **arrays)
    digest = hashlib.sha256()  # of the arrays, not the npz file (whose zip entries carry write times)
    for k in sorted(arrays):
        digest.update(f"{k}{arrays[k].dtype}{arrays[k].shape}".encode())
        digest.update(np.ascontiguousarray(arrays[k]).data)

    classes, nc = info.classes, len(info.classes)
    card = {
        "dataset": p.data.name,
        "raw_md5": md5sum(raw_path),
        "raw_image_size": raw_size,
        "image_size": p.image_size,
        "finetune_image_size": p.finetune_image_size,
        "channels": info.channels,
        "task": info.task,
        **({"positive_class": classes[info.positive]} if info.positive is not None else {}),
        "num_classes": nc,
        "n": {s: int(len(arrays[f"{s}_labels"])) for s in SPLITS},
        "class_counts": {
            s: dict(zip(classes, np.bincount(arrays[f"{s}_labels"], minlength=nc).tolist())) for s in SPLITS
        },
    }
    meta = {**card, "classes": classes, "positive": info.positive, "mean": mean, "std": std,
            "prepared_digest": digest.hexdigest()}
    write_json(lay.meta, meta)
    write_json(lay.data_card, card)
    return card


def images_key(split: str, size: int | None = None) -> str:
    """The prepared npz's key of a split's images: at the comparison's size (size None), else at `size` px."""
    return f"{split}_images" if size is None else f"{split}_images_{size}"


def load_prepared(lay: Layout = Layout(), size: int | None = None) -> tuple[dict[str, Split], dict]:
    """Prepared splits and meta (classes, mean/std, raw md5, sizes); images at `size` px (None: the comparison's
    image_size; the champion's finetune_image_size is prepared too)."""
    if not lay.prepared.is_file():
        raise MissingInput(f"{lay.prepared} missing: run `medssl prepare` (or `dvc repro prepare`) first")
    try:
        meta = json.loads(lay.meta.read_text())
        sized = None if size in (None, meta["image_size"]) else size
        with np.load(lay.prepared) as z:
            splits = ({s: Split(z[images_key(s, sized)], z[f"{s}_labels"]) for s in SPLITS}
                      if images_key("train", sized) in z.files else None)
    except Exception as e:  # truncated, overwritten, or of another layout
        raise DataError(f"{lay.prepared}: prepared data unreadable ({type(e).__name__}: {str(e).splitlines()[0][:120]}); "
                        f"run `medssl prepare` (or `dvc repro prepare`) again") from None
    if splits is None:
        raise StaleStageError(f"{lay.prepared}: prepared at {meta['image_size']} px, not at {size} px; run "
                              f"`medssl prepare` (or `dvc repro prepare`) again")
    return splits, meta
