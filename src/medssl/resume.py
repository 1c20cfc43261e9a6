"""Resumable stages: a per-epoch (or per-cell) state file, written atomically, used only when its key matches.

The key (`resume_key`) is a digest of each thing the stage's result depends on: the prepared data (its arrays'
digest, so image size and subsets count), the config sections the stage reads, the init's encoder files (grids
and fine-tunes of a self-supervised init), the device type and the state format. A state file left by a run
with other inputs is discarded with one line naming what changed, never resumed from. State files hold tensors
and plain values only and are read with `torch.load(weights_only=True)`: nothing in them is executed.
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import torch

from medssl.errors import MissingInput
from medssl.io import save_torch

STATE_FORMAT = 2  # bump when what a stage keeps in its state changes shape


def digest(value) -> str:
    """Short digest of a JSON-able value (config sections, ids)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def inputs_key(p, stage: str, init: str, meta: dict, lay) -> dict[str, object]:
    """What the result of `stage` (pretrain | finetune | grid) for `init` depends on, by name. p: Params (resolved
    for `init`), meta: the prepared data's meta.json, lay: Layout."""
    from medssl.data.sources import md5sum

    data = meta.get("prepared_digest") or md5sum(lay.prepared)  # meta of earlier code lacks the digest
    key = {"data": data, "model": p.model.model_dump(), "seed": p.seed}
    if stage == "pretrain":
        from medssl.config import method_of

        method = method_of(init)
        key |= {"method": getattr(p.pretrain, method).model_dump(), "batch_size": p.pretrain.batch_size,
                "epochs": p.run_budget.pretrain_epochs, "augment": p.finetune.augment.model_dump()}
    else:
        from medssl.checkpoints import encoder_file, encoder_seeds

        # the grid's cells read every encoder of the init (one per grid seed under pretrain_per_seed), the champion p.seed's
        files = [encoder_file(p, init, s, lay) for s in (encoder_seeds(p, init) if stage == "grid" else [p.seed])]
        key |= {"encoder": "+".join(md5sum(f) for f in files) if init in p.inits.ssl and all(f.is_file() for f in files) else init,
                "finetune": (p.finetune if stage == "finetune" else p.grid_finetune).model_dump(),
                "select": p.export.select_metric}
        from medssl.core.train import champion_epochs

        key |= ({"epochs": champion_epochs(p.run_budget, p.finetune.batch_size, meta["n"]["train"]), "image_size": p.finetune_image_size} if stage == "finetune" else
                {"grid": p.grid.model_dump(), "budget": p.run_budget.grid.model_dump()})
    return {"stage": stage, "init": init, **key}


def resume_key(p, stage: str, init: str, meta: dict, lay, device) -> dict[str, object]:
    """inputs_key and the device type: a state's generators and reduction order are the device's own."""
    return {**inputs_key(p, stage, init, meta, lay), "device": torch.device(device).type}


def digests(key: dict) -> dict[str, str]:
    return {name: digest(value) for name, value in key.items()}


def changed(recorded: dict, current: dict) -> list[str]:
    """Names of the parts that differ between two digests() dicts (parts only one of them has count)."""
    return [k for k in current if recorded.get(k) != current[k]] + [k for k in recorded if k not in current]


def read_grid(p, init: str, lay) -> dict:
    """metrics/grid/<init>.json, refused with one line when it was computed from other inputs (data, encoder,
    grid settings) than the current ones: a report over it would mix grids or fail on a missing cell."""
    from medssl.errors import StaleStageError
    from medssl.io import read_json

    path = lay.grid_cells(init)
    if not path.is_file():
        raise MissingInput(f"{path} missing: run `medssl grid {init}` first")
    grid = read_json(path)
    if "inputs" in grid:  # grids of earlier code lack the record
        parts = changed(grid["inputs"], digests(inputs_key(p.for_init(init), "grid", init, read_json(lay.meta), lay)))
        if parts:
            raise StaleStageError(f"{path} was computed with other {', '.join(parts)} than the current ones: run "
                                  f"`medssl grid {init}` (or `dvc repro`) first")
    return grid


def _plain(x):
    """State -> what weights_only loading accepts: numpy arrays become tensors (tagged), numpy scalars Python ones."""
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_plain(v) for v in x)
    if isinstance(x, np.ndarray):
        return {"__ndarray__": torch.from_numpy(np.ascontiguousarray(x))}
    if isinstance(x, np.generic):
        return x.item()
    return x


def _unplain(x):
    if isinstance(x, dict):
        if set(x) == {"__ndarray__"}:
            return x["__ndarray__"].numpy()
        return {k: _unplain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_unplain(v) for v in x)
    return x


class Checkpointer:
    def __init__(self, path: Path, key: dict):
        self.path = Path(path)
        self.key = digests({**key, "format": STATE_FORMAT})
        self.key_digest = digest(self.key)  # one id of everything the result depends on

    def _discard(self, why: str) -> None:
        print(f"{self.path}: {why}; starting over", file=sys.stderr, flush=True)

    def load(self) -> dict | None:
        if not self.path.is_file():
            return None
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as e:  # unreadable, torn, of earlier code, or holding objects that would run code
            self._discard(f"not a resume state this version reads ({type(e).__name__})")
            return None
        old = state.get("key") if isinstance(state, dict) else None
        if not isinstance(old, dict) or "state" not in state:
            self._discard("not a resume state this version reads")
            return None
        parts = changed(old, self.key)
        if parts:
            self._discard(f"left by a run with other {', '.join(parts)}")
            return None
        s = _unplain(state["state"])
        done = ("all" if "done" in s else f"epoch {s['epoch']}" if "epoch" in s else f"{len(s.get('cells', {}))} cells")
        print(f"resuming from {self.path}: {done} done", file=sys.stderr, flush=True)
        return s

    def save(self, state) -> None:
        save_torch({"key": self.key, "state": _plain(state() if callable(state) else state)}, self.path)

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)
