"""budgets.<budget>.pretrain_per_seed: each grid seed's cells of a self-supervised init start from their own
pretraining run, so the seeds' spread (and the verdict's intervals) carry the pretraining's variance."""
import mlflow
import numpy as np
import pytest
import torch

from medssl import grid as grid_stage
from medssl import tracking
from medssl.config import load_params
from medssl.errors import StaleStageError
from medssl import pretrain as pretrain_stage
from medssl.pretrain import run_pretrain
from medssl.resume import read_grid

from conftest import ROOT
from test_resume import prepared

SMALL = {"data.image_size": 32, "inits.baselines": ["imagenet"], "inits.ssl": ["vae"], "grid.fusion": [],
         "grid.fractions": [1.0], "grid.imbalance": [], "grid.shift": None,
         "budgets.demo.grid": {"epochs": 1, "max_train": None, "max_eval": None}, "budgets.demo.pretrain_epochs": 1,
         "budgets.demo.pretrain_per_seed": True, "finetune.batch_size": 16, "mlflow.experiment": "per-seed"}


def test_each_grid_seed_probes_and_finetunes_its_own_pretraining_run(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")  # the parent below, whatever an earlier test set
    monkeypatch.chdir(tmp_path)
    p = load_params(ROOT / "params.yaml", SMALL, tuned=False)
    lay = prepared(tmp_path / "run", p)

    mlflow.set_experiment("per-seed")
    with mlflow.start_run() as parent:  # as under a pipeline run, where MLflow shows the nested runs' names
        pass
    summary = run_pretrain(p, "vae", lay, parent=parent.info.run_id)
    seeds = [p.seed + s for s in p.grid.seeds]  # 42, 43, 44: grid seed 0 shares params.yaml seed's encoder
    files = [lay.encoder("vae")] + [lay.encoder("vae", s) for s in seeds[1:]]
    weights = [torch.load(f, weights_only=True) for f in files]
    assert [w["seed"] for w in weights] == seeds
    for a, b in ((0, 1), (0, 2), (1, 2)):  # another draw and order of batches each, not just another file
        differ = [k for k, v in weights[a]["state_dict"].items() if not torch.equal(v, weights[b]["state_dict"][k])]
        assert any(k.endswith("weight") for k in differ), (a, b)
    assert sorted(summary["encoders"]) == [f"s{s}" for s in seeds]
    runs = mlflow.search_runs(experiment_names=["per-seed"], filter_string="tags.stage = 'pretrain'", output_format="list")
    assert sorted((r.data.tags[tracking.RUN_TAG], r.info.run_name, r.info.status) for r in runs) == sorted(
        [("pretrain-vae", "ssl-vae", "FINISHED")] + [(f"pretrain-vae-s{s}", f"ssl{s}-vae", "FINISHED") for s in seeds[1:]])
    assert {r.info.run_id for r in runs} == {e["run_id"] for e in summary["encoders"].values()}

    built = []
    real = grid_stage.build_classifier

    def spy(p, init, meta, seed, lay, encoder=None):
        built.append((seed, encoder))
        return real(p, init, meta, seed, lay, encoder=encoder)

    monkeypatch.setattr(grid_stage, "build_classifier", spy)
    grid_stage.run_grid(p, "vae", lay)
    # the fine-tune cell of grid seed s starts from encoder 42 + s; the probes' features come from the same one
    assert sorted(set(built)) == sorted([(s, s) for s in seeds] + [(g, p.seed + g) for g in p.grid.seeds])
    with np.load(lay.grid_features("vae")) as z:
        keys = {k for k in z.files if k.startswith("test_x_")}
        assert keys == {f"test_x_s{s}" for s in seeds}
        assert not np.array_equal(z[f"test_x_s{seeds[0]}"], z[f"test_x_s{seeds[1]}"])

    # the grid's record names every encoder it read: another seed-43 encoder makes it stale
    read_grid(p, "vae", lay)
    lay.encoder("vae", seeds[1]).write_bytes(files[2].read_bytes())
    with pytest.raises(StaleStageError, match="encoder"):
        read_grid(p, "vae", lay)


def test_one_pretraining_run_serves_every_seed_when_off(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.chdir(tmp_path)
    p = load_params(ROOT / "params.yaml", {**SMALL, "budgets.demo.pretrain_per_seed": False}, tuned=False)
    lay = prepared(tmp_path / "run", p)
    summary = run_pretrain(p, "vae", lay)
    assert "encoders" not in summary
    assert [f.name for f in lay.encoder("vae").parent.iterdir()] == ["encoder.pt"]


def test_a_stopped_per_seed_pretraining_keeps_the_encoders_it_finished(tmp_path, monkeypatch):
    """Stopped while pretraining seed 44, the rerun keeps the encoders of 42 and 43 (same inputs) and trains 44 only;
    with other inputs (another learning rate) it trains every encoder again."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.chdir(tmp_path)
    p = load_params(ROOT / "params.yaml", SMALL, tuned=False)
    lay = prepared(tmp_path / "run", p)
    real, trained = pretrain_stage.pretrain, []

    def stops_at_44(m, images, spec, **kw):
        if spec.seed == p.seed + 2:
            raise KeyboardInterrupt("stopped")
        return real(m, images, spec, **kw)

    monkeypatch.setattr(pretrain_stage, "pretrain", stops_at_44)
    with pytest.raises(KeyboardInterrupt):
        run_pretrain(p, "vae", lay)
    kept = {s: lay.encoder("vae", None if s == p.seed else s).read_bytes() for s in (p.seed, p.seed + 1)}

    def counted(m, images, spec, **kw):
        trained.append(spec.seed)
        return real(m, images, spec, **kw)

    monkeypatch.setattr(pretrain_stage, "pretrain", counted)
    summary = run_pretrain(p, "vae", lay)
    assert trained == [p.seed + 2]
    assert {s: lay.encoder("vae", None if s == p.seed else s).read_bytes() for s in kept} == kept
    assert sorted(summary["encoders"]) == [f"s{s}" for s in (p.seed, p.seed + 1, p.seed + 2)]
    assert summary["loss"] == summary["encoders"][f"s{p.seed}"]["loss"]

    trained.clear()
    other = load_params(ROOT / "params.yaml", {**SMALL, "pretrain.vae.lr": 3e-4}, tuned=False)
    run_pretrain(other, "vae", lay)
    assert trained == [p.seed, p.seed + 1, p.seed + 2]
