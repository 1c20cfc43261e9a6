"""Optuna tuning: exact trial accounting with two worker processes on a real PostgreSQL server,
and pruned trials marked as such in Optuna and MLflow."""
import shutil
import subprocess

import mlflow
import optuna
import pytest
import yaml

from conftest import BIN, ROOT, project_copy, run_env
from medssl.tune import split_trials

SMALL = {"data.max_train": 256, "data.max_eval": 128, "budgets.demo.pretrain_epochs": 1,
         "budgets.demo.finetune_epochs": 2, "pretrain.batch_size": 64, "finetune.batch_size": 64}


def test_split_trials_is_exact():
    assert split_trials(5, 2) == [3, 2] and split_trials(4, 2) == [2, 2] and split_trials(1, 3) == [1, 0, 0]
    assert all(sum(split_trials(n, w)) == n for n in range(1, 20) for w in range(1, 5))


def test_sqlite_refuses_parallel_workers_before_any_work(tmp_path):
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    r = subprocess.run([str(BIN / "medssl"), "tune", "--workers", "2", "--storage", "sqlite:///x.db"], cwd=tmp_path,
                       env=run_env(), capture_output=True, text=True)
    assert r.returncode == 2 and "SQLite serves one process" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "data").exists()  # refused before fetching or preparing anything


@pytest.mark.slow
def test_two_workers_on_postgresql_lose_and_duplicate_nothing(tmp_path, postgres, mlflow_server, dermamnist):
    """Two inits, one study each, the same trial budget, shared by two worker processes."""
    work = project_copy(tmp_path / "p", **SMALL, **{"mlflow.experiment": "tune-pg", "tune.study_name": "pg-study",
                                                    "tune.inits": ["imagenet", "vae"]})
    n = 2
    r = subprocess.run([str(BIN / "medssl"), "tune", "--workers", "2", "--n-trials", str(n), "--storage", postgres],
                       cwd=work, env=run_env(MLFLOW_TRACKING_URI=mlflow_server, MEDSSL_DATA_PATH=str(dermamnist)),
                       capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stderr[-5000:]

    mlflow.set_tracking_uri(mlflow_server)
    runs = mlflow.search_runs(experiment_names=["tune-pg"], output_format="list")
    parents = [x for x in runs if x.data.tags.get("stage") == "tune"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    trials = [x for x in runs if x.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    tuned = yaml.safe_load((work / "tuned.yaml").read_text())["tuned"]
    status = {"COMPLETE": "FINISHED", "PRUNED": "KILLED", "FAIL": "FAILED"}
    for init in ("imagenet", "vae"):
        study = optuna.load_study(study_name=f"pg-study-{init}", storage=postgres)
        assert sorted(t.number for t in study.trials) == list(range(n))
        assert all(t.state.is_finished() for t in study.trials)
        mine = [x for x in trials if x.data.tags["init"] == init]
        assert sorted(int(x.data.tags["optuna_trial"]) for x in mine) == list(range(n))  # none lost, none twice
        by_number = {int(x.data.tags["optuna_trial"]): x for x in mine}
        for t in study.trials:
            run = by_number[t.number]
            assert t.user_attrs["mlflow_run_id"] == run.info.run_id
            assert run.data.tags["optuna_state"] == t.state.name and run.info.status == status[t.state.name]
            if t.state.name == "COMPLETE":
                assert run.data.metrics["value"] == pytest.approx(t.value)
        best = study.best_trial
        assert tuned[init]["finetune"]["lr"] == pytest.approx(best.params["finetune.lr"])
        assert tuned[init]["study"]["mlflow_run_id"] == best.user_attrs["mlflow_run_id"]
        assert parents[0].data.metrics[f"{init}/best_value"] == pytest.approx(best.value)
        assert set(best.params) == ({"finetune.lr", "finetune.weight_decay", "finetune.augment.strength",
                                     "finetune.label_smoothing", "finetune.frozen_blocks"}
                                    | ({"pretrain.vae.latent_dim", "pretrain.vae.beta", "pretrain.vae.lr"} if init == "vae" else set()))
    assert tuned["vae"]["pretrain"]["vae"]["beta"] == pytest.approx(
        optuna.load_study(study_name="pg-study-vae", storage=postgres).best_params["pretrain.vae.beta"])
    # each init trains with its own values: params.yaml + tuned.yaml, per init
    from medssl.config import load_params

    p = load_params(work / "params.yaml")
    for init in ("imagenet", "vae"):
        assert p.for_init(init).finetune.lr == pytest.approx(tuned[init]["finetune"]["lr"])
    assert p.for_init("random").finetune.lr == p.finetune.lr  # not tuned: params.yaml as is
    status_out = subprocess.run(["dvc", "status"], cwd=work, env=run_env(), capture_output=True, text=True).stdout
    assert "tuned.yaml" in status_out


@pytest.mark.slow
def test_pruned_trial_is_killed_in_mlflow(tmp_path, mlflow_server, dermamnist, monkeypatch):
    from medssl.config import load_params
    from medssl.tune import objective_for, prepare_search

    # a budget with one encoder per grid seed: a trial still pretrains one (params.yaml's seed), as its one fine-tune reads
    work = project_copy(tmp_path / "p", **SMALL, **{"mlflow.experiment": "tune-prune", "budgets.demo.pretrain_per_seed": True})
    monkeypatch.chdir(work)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.setenv("MEDSSL_DATA_PATH", str(dermamnist))
    p = load_params("params.yaml")
    prepare_search(p, p)
    mlflow.set_tracking_uri(mlflow_server)
    exp = mlflow.set_experiment("tune-prune")
    with mlflow.start_run(experiment_id=exp.experiment_id) as parent:
        pass
    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.ThresholdPruner(lower=1.01))
    study.optimize(objective_for(p, "vae", parent.info.run_id, work / "tune"), n_trials=1)  # any value < 1.01 is pruned
    assert study.trials[0].state == optuna.trial.TrialState.PRUNED
    run = mlflow.get_run(study.trials[0].user_attrs["mlflow_run_id"])
    assert run.info.status == "KILLED" and run.data.tags["optuna_state"] == "PRUNED"
    pretrained = yaml.safe_load((work / "tune/trial_0000/metrics/pretrain/vae.json").read_text())
    assert "loss" in pretrained and "encoders" not in pretrained  # the list a per-seed pretraining writes
