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


def run_fetch(p, lay=None, source: str | None = None) -> Path:
    """Stage `fetch`: the raw npz at data.path (under the Layout's root), from the configured source.

    Sources, first match: `source` (a flow parameter), data.source=folder (built from images + CSV),
    $MEDSSL_DATA_PATH, data.npz (a user's own file: read, never written), an earlier fetch's file, the
    medmnist download. A source is validated completely before it replaces data.path, so a bad one leaves the good
    file in place. The stage always runs (DVC cannot see an environment variable or a folder) but rewrites
    data.path only when its content changes; metrics/source.json records where the data came from."""
    from medssl.io import write_json
    from medssl.layout import Layout

    lay = lay or Layout()
    target = lay.raw(p.data.path)
    given = source or os.environ.get(ENV_DATA_PATH) or p.data.npz
    if p.data.source == "folder" and not source:  # configured explicitly: $MEDSSL_DATA_PATH is for npz sources
        origin = _fetch_folder(p, target, lay)
    elif given:
        fetch(target, given, "data source" if source else ENV_DATA_PATH if os.environ.get(ENV_DATA_PATH) else "data.npz")
        origin = {"source": "file", "path": str(Path(given).resolve())}
    else:
        existed, last = target.is_file(), _record(lay)
        fetch(target)
        origin = {k: v for k, v in last.items() if k != "md5"} if existed and last.get("md5") == md5sum(target) \
            else {"source": "existing file" if existed else "medmnist download", "path": None}
    write_json(lay.data_source, {**origin, "md5": md5sum(target), "data_path": str(p.data.path)})
    return target


def _record(lay) -> dict:
    import json

    try:
        return json.loads(lay.data_source.read_text())
    except (OSError, ValueError):
        return {}


def _fetch_folder(p, target: Path, lay) -> dict:
    """Build data.path from data.folder, unless the folder, its CSV and the settings are as last time."""
    from medssl.data.folder import fingerprint, load_folder, write_npz

    f = p.data.folder
    mark = fingerprint(f.images, f.csv, [f.size, f.val, f.test, f.fit, p.seed])
    last = _record(lay)
    if not (target.is_file() and last.get("fingerprint") == mark and last.get("md5") == md5sum(target)):
        splits, groups = load_folder(f.images, f.csv, f.size, f.val, f.test, p.seed, fit=f.fit)
        write_npz(splits, groups, target)
    return {"source": "folder", "path": str(Path(f.images).resolve()), "csv": str(Path(f.csv).resolve()),
            "fingerprint": mark}


def fetch(target: str | Path, source: str | None = None, what: str = "data source") -> Path:
    """Make the raw npz available at `target`.

    Order: `source` or $MEDSSL_DATA_PATH (validated, then copied in), an existing `target`, then the
    `medmnist` download. The copy goes through a temporary file so a half-written file never sits at `target`.
    """
    target = Path(target)
    env = source or os.environ.get(ENV_DATA_PATH)
    if env:
        what = what if source else ENV_DATA_PATH
        src = Path(env)
        if not src.is_file():
            raise DataError(f"{what}={env}: no such file")
        if src.resolve() == target.resolve():
            raise DataError(f"{what}={env} is data.path, the fetch stage's output (DVC replaces it); keep your "
                            f"file elsewhere and point {what} at it")
        if not (target.is_file() and md5sum(target) == md5sum(src)):
            load_npz(src)  # a bad source never replaces a good file
            _atomic_copy(src, target)
        return target
    if target.is_file():
        return target
    try:
        import medmnist

        with tempfile.TemporaryDirectory() as tmp:
            medmnist.DermaMNIST(split="train", download=True, root=tmp, size=28)
            load_npz(Path(tmp) / "dermamnist.npz")
            _atomic_copy(Path(tmp) / "dermamnist.npz", target)
    except DataError:
        raise
    except Exception as e:  # network errors come in many types; all mean the same here
        raise DataError(
            f"DermaMNIST not found at {target} and the medmnist download failed "
            f"({type(e).__name__}: {e}). Obtain dermamnist.npz (MedMNIST v2, 28x28: "
            f"`python -m medmnist download --flag dermamnist --size 28` on a machine with internet, "
            f"or https://zenodo.org/records/10519652), then set data.npz: /path/to/dermamnist.npz in "
            f"params.yaml or {ENV_DATA_PATH}=/path/to/dermamnist.npz."
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
    h, w = sizes["train"]
    if h != w:
        raise DataError(f"{path}: images are {w}x{h} (width x height); medssl needs square images: "
                        f"crop or resize them to a square before building the npz")
    check_classes(splits, str(path), num_classes)
    check_leaks(splits, str(path))
    return splits


def check_classes(splits: dict[str, Split], where: str, num_classes: int = len(DERMAMNIST_CLASSES)) -> None:
    """Every split holds every class: a split without one scores balanced accuracy and AUC on fewer classes."""
    for s, sp in splits.items():
        counts = np.bincount(sp.labels, minlength=num_classes)
        if (empty := np.flatnonzero(counts == 0)).size:
            names = [DERMAMNIST_CLASSES[i] if num_classes == len(DERMAMNIST_CLASSES) else str(i) for i in empty]
            raise DataError(f"{where}: {s} split has no example of class(es) {names}; counts per class "
                            f"{counts.tolist()}; every split needs every class")


def check_leaks(splits: dict[str, Split], where: str, ids: dict[str, np.ndarray] | None = None) -> None:
    """Refuse pixel-identical images in two splits (a leak from train into val/test), naming them."""
    first: dict[bytes, tuple[str, int]] = {}
    leaks = []
    label = (lambda sp, j: f"{ids[sp][j]} ({sp})") if ids is not None else (lambda sp, j: f"{sp}[{j}]")
    for s in SPLITS:
        for i, img in enumerate(splits[s].images):
            h = hashlib.blake2b(img.tobytes(), digest_size=16).digest()
            s0, i0 = first.setdefault(h, (s, i))
            if s0 != s:
                leaks.append(f"{label(s0, i0)} = {label(s, i)}")
    if leaks:
        raise DataError(f"{where}: {len(leaks)} image(s) appear in two splits (identical pixels): {leaks[:20]}"
                        f"{' ...' if len(leaks) > 20 else ''}; remove the duplicates so no test image is seen in training")


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
