"""DermaMNIST in MedMNIST npz layout: locate or download it, load it, validate it."""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medssl.errors import DataError

DERMAMNIST_CLASSES = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")  # MedMNIST label order
SPLITS = ("train", "val", "test")
ENV_DATA_PATH = "MEDSSL_DATA_PATH"


@dataclass
class Split:
    images: np.ndarray  # (N, H, W, 3) uint8
    labels: np.ndarray  # (N,) int64 in [0, num_classes)


def md5sum(path: str | Path, chunk: int = 1 << 20) -> str:
    """Plain content md5: the hash DVC 3 records for a file in dvc.lock."""
    h = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def run_fetch(p, lay=None) -> Path:
    """Stage `fetch`: the raw npz at data.path (under the Layout's root), from the configured source."""
    from medssl.layout import Layout

    target = (lay or Layout()).raw(p.data.path)
    if p.data.source == "folder":
        from medssl.data.folder import load_folder, write_npz

        f = p.data.folder
        splits, groups = load_folder(f.images, f.csv, f.size, f.val, f.test, p.seed)
        write_npz(splits, groups, target)
        return target
    return fetch(target)


def fetch(target: str | Path, source: str | None = None) -> Path:
    """Make the raw npz available at `target`.

    Order: `source` or $MEDSSL_DATA_PATH (copied in), an existing `target`, then the `medmnist`
    download. The copy goes through a temporary file so a half-written file never sits at `target`.
    """
    target = Path(target)
    env = source or os.environ.get(ENV_DATA_PATH)
    if env:
        src = Path(env)
        if not src.is_file():
            raise DataError(f"{'data source' if source else ENV_DATA_PATH}={env}: no such file")
        if not (target.is_file() and md5sum(target) == md5sum(src)):
            _atomic_copy(src, target)
        return target
    if target.is_file():
        return target
    try:
        import medmnist

        with tempfile.TemporaryDirectory() as tmp:
            medmnist.DermaMNIST(split="train", download=True, root=tmp, size=28)
            _atomic_copy(Path(tmp) / "dermamnist.npz", target)
    except Exception as e:  # network errors come in many types; all mean the same here
        raise DataError(
            f"DermaMNIST not found at {target} and the medmnist download failed "
            f"({type(e).__name__}: {e}). Obtain dermamnist.npz (MedMNIST v2, 28x28: "
            f"`python -m medmnist download --flag dermamnist --size 28` on a machine with internet, "
            f"or https://zenodo.org/records/10519652), then place it at {target} "
            f"or set {ENV_DATA_PATH}=/path/to/dermamnist.npz."
        ) from None
    return target


def _atomic_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def load_npz(path: str | Path, num_classes: int = len(DERMAMNIST_CLASSES)) -> dict[str, Split]:
    """Load and validate a MedMNIST-layout npz: keys `{split}_images`, `{split}_labels`."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file (run `medssl fetch` or set {ENV_DATA_PATH})")
    try:
        npz = np.load(path, allow_pickle=False)
    except Exception as e:
        raise DataError(f"{path}: not a readable npz file ({e})") from None
    with npz:
        missing = [f"{s}_{k}" for s in SPLITS for k in ("images", "labels") if f"{s}_{k}" not in npz.files]
        if missing:
            raise DataError(f"{path}: missing keys {missing} (found {sorted(npz.files)})")
        splits = {s: _validate_split(path, s, npz[f"{s}_images"], npz[f"{s}_labels"], num_classes) for s in SPLITS}
    sizes = {s: sp.images.shape[1:3] for s, sp in splits.items()}
    if len(set(sizes.values())) != 1:
        raise DataError(f"{path}: splits differ in image size: {sizes}")
    counts = np.bincount(splits["train"].labels, minlength=num_classes)
    if (empty := np.flatnonzero(counts == 0)).size:
        names = [DERMAMNIST_CLASSES[i] if num_classes == len(DERMAMNIST_CLASSES) else str(i) for i in empty]
        raise DataError(f"{path}: train_labels has no example of class(es) {names}; counts per class {counts.tolist()}")
    return splits


def _validate_split(path: Path, split: str, images: np.ndarray, labels: np.ndarray, num_classes: int) -> Split:
    key = f"{path}: {split}_images"
    if images.dtype != np.uint8:
        raise DataError(f"{key}: dtype {images.dtype}, expected uint8")
    if images.ndim != 4 or images.shape[-1] != 3:
        raise DataError(f"{key}: shape {images.shape}, expected (N, H, W, 3)")
    if images.shape[0] == 0:
        raise DataError(f"{key}: no images")
    shape = labels.shape
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise DataError(f"{path}: {split}_labels: shape {shape}, expected ({images.shape[0]},) or ({images.shape[0]}, 1)")
    if not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{path}: {split}_labels: dtype {labels.dtype}, expected an integer type")
    bad = labels[(labels < 0) | (labels >= num_classes)]
    if bad.size:
        raise DataError(f"{path}: {split}_labels: values {sorted(set(bad.tolist()))[:10]} outside [0, {num_classes - 1}]")
    return Split(images, labels.astype(np.int64))
