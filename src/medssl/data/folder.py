"""Your own image files -> the raw npz: a folder of class sub-folders, or a CSV of path,label[,group].

- Folder (torchvision ImageFolder layout): `<images>/<class>/*.png|jpg`, split by medssl (stratified, seeded), or
  `<images>/{train,val,test}/<class>/...` split as given (`val/` optional: carved from train).
- CSV: one row per image with a path (relative to `csv.images`, or the CSV's folder; a name without suffix
  finds `.png`/`.jpg`, as HAM10000's image_id), a class name and optionally a group (patient, lesion, study):
  the split is then grouped, so no group crosses splits. HAM10000 is `columns: {path: image_id, label: dx,
  group: lesion_id}`.
Every image is read the way `medssl predict` reads one, fitted to `size` x `size`. A dataset whose every image
is grey (grey files, or RGB files with R = G = B) is stored with one channel; one colour image makes the whole
dataset RGB (its grey images repeated into three channels); metrics/source.json counts the grey ones.
"""
from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

from medssl.data.sources import CLASS_NAMES_KEY, SPLITS, Split, check_classes, check_leaks
from medssl.errors import DataError

SUFFIXES = (".jpg", ".jpeg", ".png", ".JPG", ".JPEG", ".PNG")


@dataclass
class Built:
    splits: dict[str, Split]         # (N, size, size, C) uint8, C = 1 when every image is grey
    groups: dict[str, np.ndarray]    # split -> group of each image (the file itself when ungrouped)
    files: dict[str, np.ndarray]     # split -> the image's path as the source names it
    classes: list[str]
    grey_images: int                 # how many source images were grey
    grouped: bool


def class_order(names) -> list[str]:
    """Class names in label order: numeric names numerically (grades 0..10), then the rest alphabetically."""
    return sorted(set(names), key=lambda n: (0, int(n), n) if n.isdecimal() else (1, 0, n))


def _is_image(f: Path) -> bool:
    return f.is_file() and f.suffix in SUFFIXES and not f.name.startswith(".")


def _folder_items(root: Path, where: str, classes: list[str] | None) -> tuple[list[Path], list[str]]:
    dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")) if root.is_dir() else []
    if not dirs:
        raise DataError(f"{where}: no class sub-folders (expected {where}/<class>/<image>.png, one folder per class)")
    if classes is not None and (unknown := [d.name for d in dirs if d.name not in classes]):
        raise DataError(f"{where}: class folder(s) {unknown} are not in data.classes {classes}")
    paths, labels = [], []
    for d in dirs:
        files = sorted(f for f in d.rglob("*") if _is_image(f))
        if not files:
            raise DataError(f"{d}: empty class folder (no PNG/JPEG images); add images or remove the folder")
        paths += files
        labels += [d.name] * len(files)
    return paths, labels


def build_folder(cfg, seed: int, classes: list[str] | None = None) -> Built:
    """data.folder -> Built. cfg: images, size, val, test, fit."""
    root = Path(cfg.images).expanduser()
    if not root.is_dir():
        raise DataError(f"data.folder.images={cfg.images}: {'a file, not a folder' if root.is_file() else 'no such folder'}")
    if (root / "train").is_dir():
        present = [s for s in SPLITS if (root / s).is_dir()]
        if "test" not in present:
            raise DataError(f"{root}: has train/ but no test/; give train/ and test/ (val/ optional) or no split folders")
        other = sorted(d.name for d in root.iterdir() if d.is_dir() and d.name not in SPLITS and not d.name.startswith("."))
        if other:
            raise DataError(f"{root}: folder(s) {other} beside train/; split folders are named train, val, test")
        given = {s: _folder_items(root / s, str(root / s), classes) for s in present}
        names = classes or class_order(n for _, labels in given.values() for n in labels)
        paths = [f for s in present for f in given[s][0]]
        labels = [n for s in present for n in given[s][1]]
        split_of = np.array([s for s in present for _ in given[s][0]])
    else:
        paths, labels = _folder_items(root, str(root), classes)
        names, split_of = classes or class_order(labels), None
    y = np.array([names.index(n) for n in labels], np.int64)
    files = np.array([str(f.relative_to(root)) for f in paths])
    return _build(Listing(paths=paths, y=y, files=files, groups=files, names=names, where=str(root), split_of=split_of),
                  cfg, seed)


def read_rows(csv_path: Path, columns) -> list[dict]:
    try:
        with open(csv_path, newline="") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{csv_path}: cannot read ({e})") from None
    if not rows:
        raise DataError(f"{csv_path}: no rows")
    header = list(rows[0])
    missing = [c for c in (columns.path, columns.label) if c not in header]
    if columns.group is not None and columns.group != "group" and columns.group not in header:
        missing.append(columns.group)  # a group column the user named must exist: a silent ungrouped split would leak
    if missing:
        raise DataError(f"{csv_path}: missing column(s) {missing} (found {header}); set data.csv.columns "
                        f"{{path, label, group}} to your column names")
    empty = [i + 2 for i, r in enumerate(rows) if not (r[columns.path] or "").strip() or not (r[columns.label] or "").strip()]
    if empty:
        raise DataError(f"{csv_path}: row(s) {empty[:20]} have an empty {columns.path!r} or {columns.label!r}")
    seen: dict[str, int] = {}
    dups = [f"{r[columns.path]} (rows {seen[r[columns.path]] + 2} and {i + 2})" for i, r in enumerate(rows)
            if seen.setdefault(r[columns.path], i) != i]
    if dups:
        raise DataError(f"{csv_path}: {len(dups)} duplicate {columns.path}(s): {dups[:20]}{' ...' if len(dups) > 20 else ''}; "
                        f"each image must appear once")
    return rows


def resolve_images(images_dir: Path, names: list[str], csv_path: Path, column: str) -> list[Path]:
    """Each row's file: the path as written, else with an image suffix added (HAM10000's image_id)."""
    paths, missing = [], []
    for i, name in enumerate(names):
        base = images_dir / name
        found = base if _is_image(base) else next((base.with_name(base.name + s) for s in SUFFIXES
                                                   if (base.with_name(base.name + s)).is_file()), None)
        (paths if found else missing).append(found or f"row {i + 2}: {name}")
    if missing:
        raise DataError(f"{csv_path}: {len(missing)} image(s) named in column {column!r} are not in {images_dir}: "
                        f"{missing[:10]}{' ...' if len(missing) > 10 else ''}")
    return paths


def build_csv(cfg, seed: int, classes: list[str] | None = None, complete: bool = True) -> Built:
    """data.csv (or grid.shift) -> Built. cfg: file, images, columns, size, val, test, fit. complete: every split
    must hold every class (a second source scored only may lack some)."""
    csv_path = Path(cfg.file).expanduser()
    images_dir = Path(cfg.images).expanduser() if cfg.images else csv_path.parent
    c = cfg.columns
    rows = read_rows(csv_path, c)
    labels = [r[c.label].strip() for r in rows]
    if classes is not None:
        unknown = sorted(set(labels) - set(classes))
        if unknown:
            where = [i + 2 for i, v in enumerate(labels) if v in unknown][:10]
            raise DataError(f"{csv_path}: column {c.label!r} has unknown class(es) {unknown} (rows {where}); "
                            f"expected one of {list(classes)}")
    names = list(classes) if classes is not None else class_order(labels)
    paths = resolve_images(images_dir, [r[c.path].strip() for r in rows], csv_path, c.path)
    grouped = c.group is not None and c.group in rows[0]
    files = np.array([r[c.path].strip() for r in rows])
    groups = np.array([(r[c.group] or "").strip() or r[c.path] for r in rows]) if grouped else files
    y = np.array([names.index(v) for v in labels], np.int64)
    return _build(Listing(paths=paths, y=y, files=files, groups=groups, names=names, where=str(csv_path), grouped=grouped),
                  cfg, seed, complete)


def carve(labels: np.ndarray, groups: np.ndarray, idx: np.ndarray, frac: float, seed: int,
          where: str = "data") -> tuple[np.ndarray, np.ndarray]:
    """idx -> (rest, held): a stratified, grouped share `frac` of idx held out (sorted)."""
    k = max(2, int(round(1 / frac)))
    cv = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    try:
        rest, held = next(cv.split(idx, labels[idx], groups[idx]))
    except ValueError as e:  # fewer groups than folds
        raise DataError(f"{where}: cannot hold out {frac:.0%} of {len(idx)} images in {len(set(groups[idx]))} group(s) "
                        f"({e}); give each class at least {k} images (groups) or split it yourself") from None
    return np.sort(idx[rest]), np.sort(idx[held])


def grouped_splits(labels: np.ndarray, groups: np.ndarray, val: float, test: float, seed: int,
                   where: str = "data") -> dict[str, np.ndarray]:
    """Stratified, grouped train/val/test indices: all images of a group land in one split."""
    train_val, test_idx = carve(labels, groups, np.arange(len(labels)), test, seed, where)
    train_idx, val_idx = carve(labels, groups, train_val, val / (1 - test), seed, where)
    return {"train": train_idx, "val": val_idx, "test": test_idx}


def _read_all(paths: list[Path], size: int, fit: str, where: str) -> tuple[np.ndarray, np.ndarray]:
    """-> (N, size, size, 3) uint8 and (N,) bool: the image is grey. Every unusable file named in one error."""
    from tqdm import tqdm

    from medssl.data.images import fit_image, open_rgb
    from medssl.errors import ImageReadError

    images, grey, bad = np.empty((len(paths), size, size, 3), np.uint8), np.zeros(len(paths), bool), []
    for i, p in enumerate(tqdm(paths, desc=f"reading {where}", unit="img", disable=None, leave=False)):
        try:
            rgb = open_rgb(p)
            grey[i] = bool((rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all())
            images[i] = fit_image(rgb, (size, size), fit, str(p))
        except ImageReadError as e:
            bad.append(str(e))
    if bad:
        raise DataError(f"{where}: {len(bad)} of {len(paths)} image(s) cannot be used:\n  " + "\n  ".join(bad[:50])
                        + (f"\n  ... and {len(bad) - 50} more" if len(bad) > 50 else ""))
    return images, grey


@dataclass
class Listing:
    """The images a folder or CSV names, before any is read. paths: image files; y: labels (N,); files: each one's
    name as its source gives it (leak checks, ids); groups: the unit splits keep together (a patient, a lesion; the
    file itself when ungrouped); names: class names in label order; where: the source, for messages; split_of:
    the folder's own train/val/test per image (None: split here); grouped: whether the source named groups."""
    paths: list
    y: np.ndarray
    files: np.ndarray
    groups: np.ndarray
    names: list[str]
    where: str
    split_of: np.ndarray | None = None
    grouped: bool = False


def _build(ls: Listing, cfg, seed: int, complete: bool = True) -> Built:
    """Read, split (grouped, stratified) and check a listing. cfg: size, fit, val, test; complete: every class
    in every split (a shift source's test split alone may lack some)."""
    paths, y, files, groups, names, where, split_of = ls.paths, ls.y, ls.files, ls.groups, ls.names, ls.where, ls.split_of
    if split_of is None and complete:  # before reading: a class medssl cannot put in every split (a typo in a label)
        few = {n: len(set(groups[y == i])) for i, n in enumerate(names) if len(set(groups[y == i])) < 3}
        if few:
            unit = "groups (column group: patients, lesions)" if ls.grouped else "images"
            raise DataError(f"{where}: class(es) with fewer than 3 {unit}, one for each of train, val and test: "
                            + ", ".join(f"{n!r} {k}" for n, k in few.items()) + "; add images of them or leave them out")
    images, grey = _read_all(paths, cfg.size, cfg.fit, where)
    if grey.all():
        images = images[..., :1]
    if split_of is None:
        idx = grouped_splits(y, groups, cfg.val, cfg.test, seed, where)
    else:  # the folder's own split; a missing val/ is carved from train (stratified)
        idx = {s: np.flatnonzero(split_of == s) for s in SPLITS}
        if not idx["val"].size:
            idx["train"], idx["val"] = carve(y, groups, idx["train"], cfg.val, seed, where)
    splits = {s: Split(images[idx[s]], y[idx[s]]) for s in SPLITS}
    ids = {s: files[idx[s]] for s in SPLITS}
    if complete:
        check_classes(splits, where, names)
    check_leaks(splits, where, ids)
    return Built(splits, {s: groups[idx[s]] for s in SPLITS}, ids, list(names), int(grey.sum()), ls.grouped)


def fingerprint(images_dir: str | Path, csv_path: str | Path | None, settings: list) -> str:
    """md5 of the CSV, the build settings and the name, size and mtime of every image the build reads: the
    files under `images_dir` (folder source) or the files the CSV names (so that a CSV beside data.path, or
    beside other files, is not rebuilt when they change)."""
    h = hashlib.md5(Path(csv_path).read_bytes() if csv_path and Path(csv_path).is_file() else b"")
    h.update(repr(settings).encode())
    root = Path(images_dir)
    if csv_path is None:
        files = sorted(f for f in root.rglob("*") if _is_image(f)) if root.is_dir() else []
    else:
        try:
            with open(csv_path, newline="") as f:
                names = sorted({v.strip() for row in csv.reader(f) for v in row[:8] if v.strip()})
        except (OSError, UnicodeDecodeError, csv.Error):
            names = []  # the build names the problem
        files = sorted({f for n in names for f in (root / n, *((root / n).with_name((root / n).name + s)
                                                               for s in SUFFIXES)) if _is_image(f)})
    for f in files:
        st = f.stat()
        h.update(f"{f.relative_to(root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def write_npz(built: Built, path: Path) -> None:
    """MedMNIST-layout npz (grey images (N, H, W), as MedMNIST's) + `class_names`, `{split}_groups`, `{split}_files`,
    written through a temporary file."""
    arrays = {CLASS_NAMES_KEY: np.array(built.classes)}
    dtype = np.uint8 if len(built.classes) <= 256 else np.int64
    for s in SPLITS:
        im = built.splits[s].images
        arrays[f"{s}_images"] = im[..., 0] if im.shape[-1] == 1 else im
        arrays[f"{s}_labels"] = built.splits[s].labels[:, None].astype(dtype)
        arrays[f"{s}_groups"], arrays[f"{s}_files"] = built.groups[s].astype(str), built.files[s].astype(str)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)
