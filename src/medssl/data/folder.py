"""A folder of images + a labels CSV in HAM10000/ISIC layout, split by lesion.

CSV columns: `image_id` and `dx` (class name) are required; `lesion_id`, when present, groups the
images of one lesion so that no lesion is in two splits. Images are `<images>/<image_id>.{jpg,jpeg,png}`.
"""
from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

from medssl.data.sources import DERMAMNIST_CLASSES, SPLITS, Split, check_leaks
from medssl.errors import DataError

SUFFIXES = (".jpg", ".jpeg", ".png", ".JPG", ".JPEG", ".PNG")


def read_labels(csv_path: Path, classes=DERMAMNIST_CLASSES) -> list[dict]:
    try:
        with open(csv_path, newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError as e:
        raise DataError(f"{csv_path}: cannot read ({e})") from None
    if not rows:
        raise DataError(f"{csv_path}: no rows")
    missing = [c for c in ("image_id", "dx") if c not in rows[0]]
    if missing:
        raise DataError(f"{csv_path}: missing column(s) {missing} (found {list(rows[0])})")
    unknown = sorted({r["dx"] for r in rows} - set(classes))
    if unknown:
        raise DataError(f"{csv_path}: column dx has unknown class(es) {unknown}; expected {list(classes)}")
    seen: dict[str, int] = {}
    dups = [f"{r['image_id']} (rows {seen[r['image_id']] + 2} and {i + 2})" for i, r in enumerate(rows)
            if seen.setdefault(r["image_id"], i) != i]
    if dups:
        raise DataError(f"{csv_path}: {len(dups)} duplicate image_id(s): {dups[:20]}{' ...' if len(dups) > 20 else ''}; "
                        f"each image must appear once")
    return rows


def resolve_images(images_dir: Path, rows: list[dict], csv_path: Path) -> list[Path]:
    paths, missing = [], []
    for r in rows:
        found = next((images_dir / f"{r['image_id']}{s}" for s in SUFFIXES if (images_dir / f"{r['image_id']}{s}").is_file()), None)
        (paths if found else missing).append(found or r["image_id"])
    if missing:
        raise DataError(f"{csv_path}: {len(missing)} image(s) named in the CSV are not in {images_dir}: "
                        f"{missing[:10]}{' ...' if len(missing) > 10 else ''}")
    return paths


def lesion_splits(labels: np.ndarray, groups: np.ndarray, val: float, test: float, seed: int) -> dict[str, np.ndarray]:
    """Stratified, grouped train/val/test indices: all images of a group land in one split."""
    def carve(idx: np.ndarray, frac: float) -> tuple[np.ndarray, np.ndarray]:
        k = max(2, int(round(1 / frac)))
        cv = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
        rest, held = next(cv.split(idx, labels[idx], groups[idx]))
        return idx[rest], idx[held]

    train_val, test_idx = carve(np.arange(len(labels)), test)
    train_idx, val_idx = carve(train_val, val / (1 - test))
    return {"train": np.sort(train_idx), "val": np.sort(val_idx), "test": np.sort(test_idx)}


def fingerprint(images_dir: str | Path, csv_path: str | Path, settings: list) -> str:
    """md5 of the CSV, every file's name, size and mtime under `images_dir`, and the build settings."""
    h = hashlib.md5(Path(csv_path).read_bytes() if Path(csv_path).is_file() else b"")
    h.update(repr(settings).encode())
    root = Path(images_dir)
    for f in sorted(root.rglob("*")) if root.is_dir() else []:
        if f.is_file():
            st = f.stat()
            h.update(f"{f.relative_to(root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def write_npz(splits: dict[str, Split], groups: dict[str, np.ndarray], path: Path) -> None:
    """MedMNIST-layout npz (+ `{split}_lesion_ids`), written through a temporary file."""
    arrays = {}
    for s in SPLITS:
        arrays[f"{s}_images"], arrays[f"{s}_labels"] = splits[s].images, splits[s].labels[:, None].astype(np.uint8)
        arrays[f"{s}_lesion_ids"] = groups[s].astype(str)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)


def load_folder(images_dir: str | Path, csv_path: str | Path, size: int, val: float = 0.1, test: float = 0.2,
                seed: int = 0, classes=DERMAMNIST_CLASSES, fit: str = "stretch") -> tuple[dict[str, Split], dict[str, np.ndarray]]:
    """-> splits of (N, size, size, 3) uint8 images with labels, and the lesion ids per split.

    Every unreadable file is named in one error; identical images in two splits are refused (a leak)."""
    from medssl.data.images import read_image
    from medssl.errors import ImageReadError

    images_dir, csv_path = Path(images_dir), Path(csv_path)
    rows = read_labels(csv_path, classes)
    paths = resolve_images(images_dir, rows, csv_path)
    labels = np.array([classes.index(r["dx"]) for r in rows], np.int64)
    groups = np.array([r.get("lesion_id") or r["image_id"] for r in rows])
    images, bad = np.empty((len(rows), size, size, 3), np.uint8), []
    for i, p in enumerate(paths):
        try:
            images[i] = read_image(p, (size, size), fit)
        except ImageReadError as e:
            bad.append(str(e))
    if bad:
        raise DataError(f"{images_dir}: {len(bad)} of {len(paths)} image(s) cannot be used:\n  " + "\n  ".join(bad[:50])
                        + (f"\n  ... and {len(bad) - 50} more" if len(bad) > 50 else ""))
    idx = lesion_splits(labels, groups, val, test, seed)
    splits = {s: Split(images[idx[s]], labels[idx[s]]) for s in SPLITS}
    ids = {s: np.array([rows[i]["image_id"] for i in idx[s]]) for s in SPLITS}
    check_leaks(splits, str(images_dir), ids)
    return splits, {s: groups[idx[s]] for s in SPLITS}
