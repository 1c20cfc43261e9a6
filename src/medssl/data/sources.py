"""Raw data in MedMNIST npz layout: locate, download or build it, load it, validate it, describe it.

A dataset is described by its data: class names and count, channels (1 = grey, 3 = RGB) and task kind come
from the source (the npz's `class_names`, medmnist's own dataset information, the folder or CSV) or from
params.yaml's data.classes / data.task, never from constants.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from medssl.errors import DataError

SPLITS = ("train", "val", "test")
ENV_DATA_PATH = "MEDSSL_DATA_PATH"
CLASS_NAMES_KEY = "class_names"   # optional npz key: the class names in label order (written by folder/CSV builds)


@dataclass
class Split:
    images: np.ndarray  # (N, H, W, C) uint8, C = 1 (grey) or 3 (RGB)
    labels: np.ndarray  # (N,) int64 in [0, num_classes)


@dataclass(frozen=True)
class DatasetInfo:
    """What every stage and every user-facing name needs to know about the data."""
    classes: list[str]           # names in label order
    channels: int                # 1 grey, 3 RGB
    task: str                    # multiclass | binary | ordinal
    positive: int | None = None  # binary: the positive class's label

    def to_meta(self) -> dict:
        return {**asdict(self), "positive_class": None if self.positive is None else self.classes[self.positive]}


@functools.lru_cache(maxsize=1)
def medmnist_flags() -> dict[str, dict]:
    """MedMNIST's own dataset information (medmnist/info.py) for its 2D datasets, read without importing the
    package (which imports torch); {} when medmnist is not installed."""
    spec = importlib.util.find_spec("medmnist")
    if spec is None or not spec.submodule_search_locations:
        return {}
    path = Path(next(iter(spec.submodule_search_locations))) / "info.py"
    info_spec = importlib.util.spec_from_file_location("_medmnist_info", path)
    mod = importlib.util.module_from_spec(info_spec)
    info_spec.loader.exec_module(mod)
    return {k: v for k, v in mod.INFO.items() if not k.endswith("3d")}


def medmnist_root() -> Path:
    """Where the medmnist package keeps its downloads (~/.medmnist)."""
    return Path(os.path.expanduser("~")) / ".medmnist"


def describe(p, splits: dict[str, Split], stored: list[str] | None, where: str) -> DatasetInfo:
    """Class names (data.classes, else the npz's own, else medmnist's for a medmnist flag, else "0", "1", ...),
    channels and task of validated splits; a name list that does not fit the labels is an error."""
    d = p.data
    k = int(max(int(sp.labels.max()) for sp in splits.values())) + 1
    flag = d.medmnist if d.source == "medmnist" else None
    info = medmnist_flags().get(flag or "")
    if d.classes is not None:
        classes, origin = list(d.classes), "data.classes"
    elif stored is not None:
        classes, origin = list(stored), f"{where}: {CLASS_NAMES_KEY}"
    elif info:
        classes, origin = [info["label"][str(i)] for i in range(len(info["label"]))], f"medmnist's {flag} information"
    else:
        classes, origin = [str(i) for i in range(k)], "the labels"
    if len(classes) < k:
        raise DataError(f"{where}: labels go up to {k - 1} but {origin} names {len(classes)} classes {classes}; "
                        f"give one name per class in label order (data.classes), or null to take them from the source")
    if d.task == "ordinal" and d.classes is None and not all(c.isdecimal() for c in classes):
        raise DataError(f"{where}: data.task is ordinal but the class names {classes} (from {origin}) have no numeric "
                        f"order; list them in grade order in data.classes")
    check_classes(splits, where, classes)
    task = d.task if d.task != "auto" else ("binary" if len(classes) == 2 else "multiclass")
    if task == "binary" and len(classes) != 2:
        raise DataError(f"{where}: data.task is binary but the data has {len(classes)} classes {classes}")
    positive = None
    if task == "binary":
        if d.positive is not None and d.positive not in classes:
            raise DataError(f"data.positive {d.positive!r} is not a class of {where}: {classes}")
        positive = classes.index(d.positive) if d.positive is not None else 1
    channels = {int(sp.images.shape[-1]) for sp in splits.values()}
    return DatasetInfo(classes, channels.pop(), task, positive)


def md5sum(path: str | Path, chunk: int = 1 << 20) -> str:
    """Plain content md5: the hash DVC 3 records for a file in dvc.lock."""
    h = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def run_fetch(p, lay=None, source: str | None = None) -> Path:
    """Stage `fetch`: the raw npz at data.path (under the Layout's root), from the configured source.

    Sources, first match: `source` (a flow parameter: an npz), data.source folder or csv (built from image files),
    data.npz (a user's own npz: read, never written), $MEDSSL_DATA_PATH (for data.source medmnist only when it
    is named <flag>.npz), then for data.source medmnist the flag's file in medmnist's folder (~/.medmnist), an
    earlier fetch's file of the same flag, the medmnist download.
    A source is validated completely (layout, labels, class names, leaks) before it replaces data.path, so a bad
    one leaves the good file in place. The stage always runs (DVC cannot see an environment variable or a folder)
    but rewrites data.path only when its content changes; metrics/source.json records where the data came from."""
    from medssl.io import write_json
    from medssl.layout import Layout

    lay = lay or Layout()
    target = lay.raw(p.data.path)
    env = os.environ.get(ENV_DATA_PATH)
    if env and p.data.source == "medmnist" and Path(env).stem != p.data.medmnist:
        print(f"{ENV_DATA_PATH}={env} is not {p.data.medmnist}.npz (data.medmnist): not used", file=sys.stderr)
        env = None  # a machine's DermaMNIST copy is not another flag's data
    given, what = ((source, "data source") if source else (p.data.npz, "data.npz") if p.data.npz
                   else (env, ENV_DATA_PATH) if env else (None, ""))
    if p.data.source in ("folder", "csv") and not source:  # configured explicitly: $MEDSSL_DATA_PATH is for npz sources
        origin = _fetch_built(p, target, lay)
    elif given:
        fetch(target, given, what, p)
        origin = {"source": "file", "path": str(Path(given).expanduser().resolve())}
    else:
        flag, last = p.data.medmnist, _record(lay)
        cached = medmnist_root() / f"{flag}.npz"
        # an earlier fetch's file of this flag (a record from before flags were recorded was DermaMNIST's)
        same = last.get("medmnist", "dermamnist" if last.get("source") != "folder" else None) == flag
        if cached.is_file():
            fetch(target, str(cached), f"data.medmnist={flag} ({cached})", p)
            origin = {"source": "medmnist folder", "path": str(cached)}
        elif target.is_file() and same and last.get("md5") == md5sum(target):
            origin = {k: v for k, v in last.items() if k not in ("md5", "data")}
        else:
            download_medmnist(flag, target, p)
            origin = {"source": "medmnist download", "path": None}
    if p.data.source == "medmnist" and not source:
        origin["medmnist"] = p.data.medmnist
    splits, info = validate_raw(target, p, "data.path")  # once, whichever way it came (settings may be new)
    data = {"name": p.data.name, "task": info.task, "classes": info.classes, "channels": info.channels,
            "size": int(splits["train"].images.shape[1]), "n": {s: len(v.labels) for s, v in splits.items()}}
    write_json(lay.data_source, {**origin, "md5": md5sum(target), "data_path": str(p.data.path), "data": data})
    return target


def _record(lay) -> dict:
    import json

    try:
        return json.loads(lay.data_source.read_text())
    except (OSError, ValueError):
        return {}


def _fetch_built(p, target: Path, lay) -> dict:
    """Build data.path from data.folder or data.csv, unless the files and the settings are as last time."""
    from medssl.data.folder import build_csv, build_folder, fingerprint, write_npz

    d = p.data
    cfg = d.folder if d.source == "folder" else d.csv
    files = cfg.images if d.source == "folder" else (cfg.images or str(Path(cfg.file).parent))
    mark = fingerprint(files, None if d.source == "folder" else cfg.file, [cfg.model_dump(), d.classes, p.seed])
    last = _record(lay)
    if not (target.is_file() and last.get("fingerprint") == mark and last.get("md5") == md5sum(target)):
        build = build_folder if d.source == "folder" else build_csv
        built = build(cfg, p.seed, d.classes)
        where = str(Path(cfg.images if d.source == "folder" else cfg.file))
        describe(p, built.splits, built.classes, where)  # class names and task fit before anything is written
        write_npz(built, target)
        seen = {"grey_images": built.grey_images, "grouped": built.grouped}
    else:
        seen = {k: last[k] for k in ("grey_images", "grouped") if k in last}
    out = {"source": d.source, "path": str(Path(files).resolve()), "fingerprint": mark, **seen}
    if d.source == "csv":
        out["csv"] = str(Path(cfg.file).resolve())
    return out


def fetch(target: str | Path, source: str | None = None, what: str = "data source", p=None) -> Path:
    """Copy the npz `source` (default $MEDSSL_DATA_PATH) to `target` once it has been validated (and, with params
    `p`, described: class names, task). The copy goes through a temporary file so a half-written file never sits
    at `target`."""
    if source is None:
        source, what = os.environ.get(ENV_DATA_PATH), ENV_DATA_PATH
        if not source:
            raise DataError(f"no data source given (set {ENV_DATA_PATH} or data.npz)")
    target, src = Path(target), Path(source).expanduser()
    if not src.is_file():
        raise DataError(f"{what}={source}: no such file")
    if src.resolve() == target.resolve():
        raise DataError(f"{what}={source} is data.path, the fetch stage's output (DVC replaces it); keep your "
                        f"file elsewhere and point {what} at it")
    if not (target.is_file() and md5sum(target) == md5sum(src)):
        validate_raw(src, p, what)  # a bad source never replaces a good file
        _atomic_copy(src, target)
    return target


def download_medmnist(flag: str, target: Path, p=None) -> Path:
    """The MedMNIST npz of `flag` (28 px) through the medmnist package, validated, at `target`."""
    info = medmnist_flags().get(flag)
    try:
        import medmnist

        with tempfile.TemporaryDirectory() as tmp:
            getattr(medmnist, info["python_class"])(split="train", download=True, root=tmp, size=28)
            validate_raw(Path(tmp) / f"{flag}.npz", p, f"data.medmnist={flag}")
            _atomic_copy(Path(tmp) / f"{flag}.npz", target)
    except DataError:
        raise
    except Exception as e:  # network errors come in many types; all mean the same here
        url = (info or {}).get("url", "https://zenodo.org/records/10519652").split("?")[0]
        raise DataError(
            f"data.medmnist={flag}: {flag}.npz is not at {target} nor in {medmnist_root()}, and the medmnist download "
            f"failed ({type(e).__name__}: {str(e)[:200]}). Get {flag}.npz on a machine with internet "
            f"(`python -m medmnist download --flag {flag} --size 28`, or {url}), then put it in {medmnist_root()}, or set "
            f"data.npz: /path/to/{flag}.npz in params.yaml or {ENV_DATA_PATH}=/path/to/{flag}.npz."
        ) from None
    return target


def _atomic_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def validate_raw(path: Path, p, what: str = "data") -> tuple[dict[str, Split], DatasetInfo | None]:
    """load_npz, then (with params) the dataset's description; errors name `what` and the file."""
    splits, stored = load_npz(path, with_names=True)
    return splits, (describe(p, splits, stored, f"{what} ({path})" if what != str(path) else str(path)) if p is not None else None)


def load_npz(path: str | Path, num_classes: int | None = None, with_names: bool = False):
    """Load and validate a MedMNIST-layout npz: keys `{split}_images` (N, H, W) grey or (N, H, W, 3) RGB, uint8,
    and `{split}_labels` (N,) or (N, 1); optional `class_names`. -> split -> Split with (N, H, W, C) images
    (grey stays one channel), and with `with_names` also the stored class names (or None)."""
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
        stored = None
        if CLASS_NAMES_KEY in npz.files:
            try:
                stored = [str(c) for c in npz[CLASS_NAMES_KEY].tolist()]
            except ValueError as e:
                raise DataError(f"{path}: {CLASS_NAMES_KEY}: not a list of strings ({e})") from None
        k = num_classes or (len(stored) if stored else None)
        splits = {"train": _validate_split(path, "train", npz["train_images"], npz["train_labels"], k)}
        k = k or int(splits["train"].labels.max()) + 1  # unnamed classes: the ones train holds
        splits |= {s: _validate_split(path, s, npz[f"{s}_images"], npz[f"{s}_labels"], k, named=bool(num_classes or stored))
                   for s in SPLITS[1:]}
    sizes = {s: sp.images.shape[1:3] for s, sp in splits.items()}
    if len(set(sizes.values())) != 1:
        raise DataError(f"{path}: splits differ in image size: {sizes}")
    channels = {s: sp.images.shape[-1] for s, sp in splits.items()}
    if len(set(channels.values())) != 1:
        raise DataError(f"{path}: splits differ in channels (1 grey, 3 RGB): {channels}")
    h, w = sizes["train"]
    if h != w:
        raise DataError(f"{path}: images are {w}x{h} (width x height); medssl needs square images: "
                        f"crop or resize them to a square before building the npz")
    check_classes(splits, str(path), stored or k)
    check_leaks(splits, str(path))
    return (splits, stored) if with_names else splits


def nhwc(images: np.ndarray) -> np.ndarray:
    """MedMNIST's grey (N, H, W) -> (N, H, W, 1) (a view); (N, H, W, C) as it is."""
    return images[..., None] if images.ndim == 3 else images


def check_classes(splits: dict[str, Split], where: str, classes: list[str] | int | None = None) -> None:
    """Every split holds every class: a split without one scores balanced accuracy and AUC on fewer classes.
    classes: the names, or their count, or None (the count the labels imply)."""
    if classes is None:
        classes = int(max(int(sp.labels.max()) for sp in splits.values())) + 1
    names = [str(i) for i in range(classes)] if isinstance(classes, int) else list(classes)
    for s, sp in splits.items():
        counts = np.bincount(sp.labels, minlength=len(names))
        if (empty := np.flatnonzero(counts == 0)).size:
            raise DataError(f"{where}: {s} split has no example of class(es) {[names[i] for i in empty]}; counts per class "
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


def _validate_split(path: Path, split: str, images: np.ndarray, labels: np.ndarray, num_classes: int | None,
                    named: bool = True) -> Split:
    key = f"{path}: {split}_images"
    if images.dtype != np.uint8:
        raise DataError(f"{key}: dtype {images.dtype}, expected uint8")
    if not (images.ndim == 3 or (images.ndim == 4 and images.shape[-1] in (1, 3))):
        raise DataError(f"{key}: shape {images.shape}, expected (N, H, W) grey or (N, H, W, 3) RGB")
    images = nhwc(images)
    if images.shape[0] == 0:
        raise DataError(f"{key}: no images")
    shape = labels.shape
    if labels.ndim == 2 and labels.shape[1] > 1:
        raise DataError(f"{path}: {split}_labels: shape {shape}, {shape[1]} labels per image (multi-label, as ChestMNIST); "
                        f"medssl trains single-label classifiers and does not support multi-label data")
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise DataError(f"{path}: {split}_labels: shape {shape}, expected ({images.shape[0]},) or ({images.shape[0]}, 1)")
    if not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{path}: {split}_labels: dtype {labels.dtype}, expected an integer type")
    bad = labels[(labels < 0) | (labels >= (num_classes or np.iinfo(np.int64).max))]
    if bad.size:
        allowed = (f"[0, {num_classes - 1}] (the {num_classes} classes {'named' if named else 'train_labels holds'})"
                   if num_classes else "[0, ...): labels are 0, 1, ...")
        raise DataError(f"{path}: {split}_labels: values {sorted(set(bad.tolist()))[:10]} outside {allowed}")
    return Split(images, labels.astype(np.int64))
