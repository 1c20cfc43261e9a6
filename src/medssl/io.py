"""Atomic writes: a half-written artifact never replaces a good one."""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np


def _tmp(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.with_name(f".{path.name}.tmp")


def save_torch(obj, path: str | Path) -> None:
    import torch  # here: the stages that write no tensors (validate, fetch) start without importing torch

    path = Path(path)
    tmp = _tmp(path)
    torch.save(obj, tmp)
    os.replace(tmp, path)


def write_json(path: str | Path, obj) -> None:
    path = Path(path)
    tmp = _tmp(path)
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def write_csv(path: str | Path, rows: list[dict]) -> None:
    path = Path(path)
    tmp = _tmp(path)
    with open(tmp, "w", newline="") as f:
        if rows:  # no rows: an empty file
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    os.replace(tmp, path)


def write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    tmp = _tmp(path)
    tmp.write_text(text)
    os.replace(tmp, path)


def save_npz(path: str | Path, **arrays) -> None:
    path = Path(path)
    tmp = _tmp(path).with_suffix(".npz")  # np.savez appends .npz to other names
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def read_json(path: str | Path):
    return json.loads(Path(path).read_text())
