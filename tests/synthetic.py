"""Small learnable datasets in each layout medssl reads, written by the tests themselves.

Class k is told apart by its brightness and a stripe of its own orientation; every image carries its own
noise, so no two images are pixel-identical (the leak check would refuse them)."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image


def images(label: int, n: int, rng: np.random.Generator, size: int = 28, rgb: bool = False) -> np.ndarray:
    """(n, size, size) or (n, size, size, 3) uint8 images of class `label`."""
    base = 50 + 30 * label
    x = rng.normal(base, 12, (n, size, size))
    stripe = (label % 4) * size // 4
    if label % 2:
        x[:, :, stripe : stripe + 4] += 80
    else:
        x[:, stripe : stripe + 4, :] += 80
    x = np.clip(np.rint(x), 0, 255).astype(np.uint8)
    if rgb:
        tint = np.array([1.0, 0.8 + 0.1 * (label % 3), 0.7], np.float32)
        x = np.clip(np.rint(x[..., None] * tint + rng.normal(0, 3, (n, size, size, 3))), 0, 255).astype(np.uint8)
    return x


def medmnist_npz(path: Path, counts: dict[str, int], num_classes: int, rgb: bool = False, seed: int = 0, **extra) -> Path:
    """A MedMNIST-layout npz: `{split}_images` (N, 28, 28) grey or (N, 28, 28, 3), `{split}_labels` (N, 1)."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in counts.items():
        y = np.arange(n) % num_classes
        arrays[f"{split}_images"] = np.concatenate([images(int(k), 1, rng, rgb=rgb) for k in y])
        arrays[f"{split}_labels"] = y.astype(np.uint8)[:, None]
    arrays.update(extra)
    np.savez(path, **arrays)
    return path


def class_folder(root: Path, classes: list[str], per_class: int, splits: dict[str, float] | None = None,
                 seed: int = 0, mode: str = "RGB") -> Path:
    """<root>/<class>/<i>.png, or <root>/<split>/<class>/<i>.png when `splits` gives each split's share."""
    rng = np.random.default_rng(seed)
    for k, name in enumerate(classes):
        imgs = images(k, per_class, rng, size=36, rgb=mode == "RGB")
        bounds = np.cumsum([0, *(int(round(f * per_class)) for f in (splits or {"": 1.0}).values())])
        for (split, lo, hi) in zip(splits or {"": 1.0}, bounds[:-1], bounds[1:]):
            d = root / split / name if split else root / name
            d.mkdir(parents=True, exist_ok=True)
            for i in range(lo, min(hi, per_class)):
                Image.fromarray(imgs[i]).save(d / f"{name}_{i:03d}.png")
    return root


def grouped_csv(root: Path, classes: list[str], patients: int, per_patient: int = 3, seed: int = 0) -> Path:
    """<root>/images/p<patient>_<j>.jpg and <root>/labels.csv (path,label,group): one class per patient."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for pt in range(patients):
        k = pt % len(classes)
        for j, img in enumerate(images(k, per_patient, rng, size=30, rgb=True)):
            name = f"images/p{pt:03d}_{j}.png"
            Image.fromarray(img).save(root / name)
            rows.append({"path": name, "label": classes[k], "group": f"patient-{pt:03d}"})
    with open(root / "labels.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["path", "label", "group"])
        w.writeheader()
        w.writerows(rows)
    return root / "labels.csv"
