"""A grid stage killed mid-run resumes from its last finished cell and gives the cells of an uninterrupted run."""
import itertools
import shutil

import pytest
import torch

from medssl import grid as grid_stage
from medssl.config import load_params
from medssl.data.prepare import run_prepare
from medssl.layout import Layout

from conftest import ROOT, write_npz

SMALL = {"data.image_size": 32, "inits.baselines": ["random"], "inits.ssl": [], "grid.fusion": [],
         "grid.fractions": [0.5, 1.0], "grid.imbalance": [], "budgets.demo.grid": {"epochs": 1, "max_train": None, "max_eval": None},
         "finetune.batch_size": 16, "mlflow.experiment": "resume"}


def dies_on_call(n: int, fn):
    """fn, except that its n-th call raises KeyboardInterrupt (a kill in the middle of the stage)."""
    calls = itertools.count(1)  # thread-safe: shards call from several threads

    def wrapped(*a, **k):
        if next(calls) == n:
            raise KeyboardInterrupt("killed")
        return fn(*a, **k)

    return wrapped


def prepared(root, p):
    lay = Layout(root)
    lay.raw(p.data.path).parent.mkdir(parents=True)
    write_npz(lay.raw(p.data.path), n=42)
    run_prepare(p, lay)
    return lay


def test_killed_grid_resumes_from_last_cell(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.chdir(tmp_path)
    p = load_params(ROOT / "params.yaml", SMALL, tuned=False)
    ref_lay, lay = prepared(tmp_path / "ref", p), prepared(tmp_path / "run", p)
    reference = grid_stage.run_grid(p, "random", ref_lay)["cells"]

    real_probe, real_ft = grid_stage.probe_cell, grid_stage._finetune_cell
    monkeypatch.setattr(grid_stage, "probe_cell", dies_on_call(5, real_probe))
    with pytest.raises(KeyboardInterrupt):
        grid_stage.run_grid(p, "random", lay)
    assert lay.resume("grid-random").is_file() and not lay.grid_cells("random").exists()
    # shards run side by side: which cells the kill left finished depends on the threads' timing, but 5 probe
    # calls over 3 seeds mean some shard got past its first fine-tune cell
    saved = torch.load(lay.resume("grid-random"), weights_only=False)["state"]["cells"]
    saved_ft = sum(k.startswith("finetune_") for k in saved)
    assert 4 <= len(saved) < 18 and saved_ft >= 1

    finetuned = []

    def counted(*a, **k):
        finetuned.append(1)  # atomic, from any shard's thread
        return real_ft(*a, **k)

    monkeypatch.setattr(grid_stage, "probe_cell", real_probe)
    monkeypatch.setattr(grid_stage, "_finetune_cell", counted)
    resumed = grid_stage.run_grid(p, "random", lay)["cells"]
    # 3 seeds x 2 fractions x (linear, finetune, knn); only the fine-tune cells the killed run had not finished rerun
    assert len(resumed) == 18 and len(finetuned) == 6 - saved_ft
    assert resumed == reference
    assert not lay.resume("grid-random").exists()


def test_resume_state_of_other_settings_is_ignored(tmp_path, monkeypatch):
    """A state file keyed to other settings (here: another learning rate) is never resumed from."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.chdir(tmp_path)
    p = load_params(ROOT / "params.yaml", SMALL, tuned=False)
    lay = prepared(tmp_path / "run", p)
    real_probe = grid_stage.probe_cell
    monkeypatch.setattr(grid_stage, "probe_cell", dies_on_call(2, real_probe))
    with pytest.raises(KeyboardInterrupt):
        grid_stage.run_grid(p, "random", lay)  # dies once a first probe cell was saved
    assert lay.resume("grid-random").is_file()
    monkeypatch.setattr(grid_stage, "probe_cell", real_probe)
    other = load_params(ROOT / "params.yaml", {**SMALL, "finetune.lr": 3e-4}, tuned=False)
    ref_lay = prepared(tmp_path / "ref", other)
    fresh = grid_stage.run_grid(other, "random", ref_lay)["cells"]
    shutil.rmtree(ref_lay.root / "metrics")
    assert grid_stage.run_grid(other, "random", lay)["cells"] == fresh
