"""Run tags: the commit a run came from is dirty only when the user changed a tracked file, not when the
pipeline rewrote its own outputs. Grid inputs published to a run reach a worker through the tracking server."""
import subprocess

import pytest

from medssl.tracking import git_commit


def test_pipeline_outputs_do_not_make_the_commit_dirty(tmp_path, monkeypatch):
    git = lambda *a: subprocess.run(["git", *a], cwd=tmp_path, check=True, capture_output=True)
    git("init", "-q")
    (tmp_path / "metrics").mkdir()
    for f in ("params.yaml", "dvc.lock", "metrics/report.json"):
        (tmp_path / f).write_text("a: 1\n")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init")
    monkeypatch.chdir(tmp_path)
    sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True, text=True).stdout.strip()
    assert git_commit() == sha
    (tmp_path / "dvc.lock").write_text("a: 2\n")
    (tmp_path / "metrics/report.json").write_text("a: 2\n")
    assert git_commit() == sha  # the pipeline's own outputs
    (tmp_path / "params.yaml").write_text("a: 2\n")
    assert git_commit() == sha + "-dirty"  # the user's change


def test_content_store_fetches_a_published_file_from_the_tracking_server(mlflow_server, tmp_path, monkeypatch):
    """A Dask worker without the parent's file system: cas.get finds the file among the run's artifacts on the
    MLflow server, checks its md5 and caches it for the next get; a digest no source matches is an error naming every source."""
    import mlflow

    from medssl import cas

    monkeypatch.setenv("MEDSSL_CACHE", str(tmp_path / "cache"))
    mlflow.set_tracking_uri(mlflow_server)
    src = tmp_path / "data.npz"
    src.write_bytes(bytes(range(256)) * 1000)
    exp = mlflow.set_experiment("cas-test").experiment_id
    run_id = mlflow.MlflowClient().create_run(exp).info.run_id
    r = cas.publish(cas.ref(src), run_id)
    assert r.sources[1] == f"runs:/{run_id}/inputs/{r.digest}/data.npz"
    src.unlink()  # only the server has it now
    got = cas.get(r)
    assert got == tmp_path / "cache/cas" / r.digest / "data.npz" and cas.md5(got) == r.digest
    assert not list(got.parent.glob("*.part*"))
    src.write_bytes(b"other")
    wrong = cas.Ref("0" * 32, "data.npz", r.sources)
    with pytest.raises(FileNotFoundError) as e:
        cas.get(wrong)
    assert f"{src} (other content)" in str(e.value) and f"{r.sources[1]} (other content)" in str(e.value)
    missing = cas.Ref("0" * 32, "data.npz", (str(tmp_path / "gone.npz"), f"runs:/{run_id}/inputs/none/data.npz"))
    with pytest.raises(FileNotFoundError, match=r"gone\.npz \(absent\); runs:/.*/none/data\.npz \(\w+\)"):
        cas.get(missing)
    mlflow.set_tracking_uri("http://127.0.0.1:9")  # no server: a second get is served from the cache
    try:
        assert cas.get(r) == got and cas.md5(got) == r.digest
    finally:
        mlflow.set_tracking_uri(mlflow_server)


def test_stages_side_by_side_log_a_new_dataset_without_failing(mlflow_server, tmp_path, monkeypatch):
    """Two pretraining stages start at once in a new experiment and both log `<data>-train`: the server inserts
    the dataset twice and one request fails on its unique key (a pipeline failed on it); log_datasets retries and
    both runs list the input."""
    import threading

    import mlflow
    import numpy as np

    from medssl.config import load_params
    from medssl.tracking import log_datasets

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    mlflow.set_tracking_uri(mlflow_server)
    raw = tmp_path / "raw.npz"
    np.savez(raw, x=np.zeros(1))
    meta = {"raw_md5": "0" * 32, "classes": ["a", "b"], "channels": 1, "task": "binary"}
    client, errors, runs = mlflow.MlflowClient(), [], []
    for round_ in range(4):
        p = load_params("params.yaml", {"mlflow.experiment": f"race-{round_}", "data.name": f"race{round_}"})
        exp = client.create_experiment(p.mlflow.experiment)
        barrier = threading.Barrier(4)

        def stage():
            try:
                with mlflow.start_run(experiment_id=exp) as run:
                    runs.append((round_, run.info.run_id))
                    barrier.wait()
                    log_datasets(p, meta, {"train": 10}, raw)
            except Exception as e:
                errors.append(e)

        threads = [threading.Thread(target=stage) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors, errors
    assert len(runs) == 16 and all([i.dataset.name for i in client.get_run(r).inputs.dataset_inputs] == [f"race{k}-train"]
                                   for k, r in runs)


def test_runs_are_named_to_fit_the_run_name_column(mlflow_server, monkeypatch):
    """MLflow's Run Name column shows ~17 characters: cells were `grid-imagenet-mim-fractions-f0.01-s0`, all reading
    `grid-imag…` under their init's run. An init's run is named by the init, its cells by fraction and seed, a
    pretraining run `ssl-<init>` (`pretrain-imagenet-simclr` and `-mim` both read `pretrain-imagen…`);
    stable names stay in `medssl.run`; a top-level run gets its start time."""
    import mlflow

    from medssl import tracking
    from medssl.config import load_params

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    mlflow.set_tracking_uri(mlflow_server)
    p = load_params("params.yaml", {"mlflow.experiment": "names"})
    with tracking.stage_run(p, "pipeline", {"stage": "pipeline"}) as pipeline:
        parent = pipeline.info.run_id
        with tracking.stage_run(p, "pretrain-imagenet-simclr", {"stage": "pretrain", "init": "imagenet-simclr"},
                                parent=parent) as pre:
            pass
        trial_tags = {"stage": "tune-trial", "init": "imagenet-simclr", "optuna_trial": "3"}
        with tracking.stage_run(p, "trial-imagenet-simclr-0003", trial_tags, parent=parent) as trial:
            pass
        init_tags = {"stage": "grid", "init": "imagenet-simclr", tracking.LEVEL_TAG: "init"}
        with tracking.stage_run(p, "grid-imagenet-simclr", init_tags, parent=parent) as grid:
            cell_tags = {"stage": "grid", "init": "imagenet-simclr", tracking.LEVEL_TAG: "cell"}
            for cell in ("grid-imagenet-simclr-fractions-f0.01-s2", "grid-imagenet-simclr-imbalance:10-f1-s0"):
                with tracking.stage_run(p, cell, cell_tags, parent=grid.info.run_id):
                    pass
    runs = {r.info.run_id: r for r in mlflow.search_runs(experiment_names=["names"], output_format="list")}
    assert runs[grid.info.run_id].info.run_name == "imagenet-simclr"
    cells = [r for r in runs.values() if r.data.tags.get("mlflow.parentRunId") == grid.info.run_id]
    assert sorted((r.info.run_name, r.data.tags["medssl.run"]) for r in cells) == [
        ("f0.01-s2", "grid-imagenet-simclr-fractions-f0.01-s2"), ("imb10-f1-s0", "grid-imagenet-simclr-imbalance:10-f1-s0")]
    assert (runs[pre.info.run_id].info.run_name, runs[pre.info.run_id].data.tags["medssl.run"]) == (
        "ssl-imagenet-simclr", "pretrain-imagenet-simclr")  # beside the inits, on the first page; ssl-imagenet-mim differs before the cut
    assert runs[trial.info.run_id].info.run_name == "t3-imagenet-simclr"  # was trial-imagenet-… for three inits
    assert runs[parent].info.run_name.startswith("pipeline-")


def test_a_resumed_run_keeps_its_own_duration(mlflow_server, monkeypatch):
    """`evaluate` logs the champion's test scores on its finetune run: that run keeps its status and end time, so the
    UI's duration stays its training's, even when the block fails; a run opened for workers (a grid's) ends on resume,
FAILED when the block fails and FINISHED when a retry succeeds."""
    import time

    import mlflow

    from medssl import tracking
    from medssl.config import load_params

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    mlflow.set_tracking_uri(mlflow_server)
    monkeypatch.setattr(mlflow.tracking.fluent, "_active_experiment_id", None)  # another test's set_experiment
    p = load_params("params.yaml", {"mlflow.experiment": "resume"})
    client = mlflow.MlflowClient()
    with tracking.stage_run(p, "finetune-imagenet", {"stage": "finetune"}) as run:
        mlflow.log_metric("val_accuracy", 0.8)
    trained = client.get_run(run.info.run_id).info
    time.sleep(0.05)
    with tracking.resume_run(run.info.run_id, keep_end=True):
        mlflow.log_metric("test_accuracy", 0.79)
    with pytest.raises(RuntimeError), tracking.resume_run(run.info.run_id, keep_end=True):
        raise RuntimeError("evaluate failed")
    after = client.get_run(run.info.run_id)
    assert (after.info.status, after.info.end_time) == ("FINISHED", trained.end_time)
    assert after.data.metrics["test_accuracy"] == 0.79
    client.update_run(run.info.run_id, "RUNNING")  # a reopening cut off (evaluate killed): RUNNING, with an end
    with tracking.resume_run(run.info.run_id, keep_end=True):
        pass
    after = client.get_run(run.info.run_id)
    assert (after.info.status, after.info.end_time) == ("FINISHED", trained.end_time)

    opened = tracking.open_run(p, "grid-imagenet", {"stage": "grid"}, {}, None)
    with pytest.raises(RuntimeError), tracking.resume_run(opened):
        raise RuntimeError("a shard failed")
    assert client.get_run(opened).info.status == "FAILED"
    with tracking.resume_run(opened):  # the task's retry
        pass
    info = client.get_run(opened).info
    assert info.status == "FINISHED" and info.end_time >= info.start_time


def test_a_wrong_model_uri_names_the_models_registered(mlflow_server, monkeypatch):
    """`medssl predict models:/dermamnist-classifier@champion` (the docs' example) on a project whose data is named
    xray: the error lists what the registry holds, as a user would address it."""
    import mlflow

    from medssl.errors import UsageError
    from medssl.inference import Predictor

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    mlflow.set_tracking_uri(mlflow_server)
    mlflow.MlflowClient().create_registered_model("a-xray-classifier")  # first by name: the session's server holds others too
    with pytest.raises(UsageError, match=r"no such model .*registered here: .*models:/a-xray-classifier"):
        Predictor("models:/dermamnist-classifier@champion")
