"""Resumable stages: a per-epoch (or per-cell) state file, written atomically, used only when its key matches.

The key holds everything the result depends on (config section, data md5, seed, budget); a state file
left by a run with other settings is ignored, never resumed from.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from medssl.io import save_torch


class Checkpointer:
    def __init__(self, path: Path, key: dict):
        self.path, self.key = Path(path), repr(sorted(key.items()))

    def load(self) -> dict | None:
        if not self.path.is_file():
            return None
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=False)
        except Exception:  # a state file from another version of the code: start over
            return None
        if state.get("key") != self.key:
            return None
        s = state["state"]
        done = f"epoch {s['epoch']}" if "epoch" in s else f"{len(s.get('cells', {}))} cells"
        print(f"resuming from {self.path}: {done} done", file=sys.stderr, flush=True)
        return s

    def save(self, state) -> None:
        save_torch({"key": self.key, "state": state() if callable(state) else state}, self.path)

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)
