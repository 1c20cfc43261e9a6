"""`prefect deployment run` through a real Prefect server and process worker (flows/services.sh)."""
import json
import os
import subprocess

import mlflow
import pytest

from conftest import BIN, free_port, project_copy, run_env

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def prefect_stack(tmp_path_factory, mlflow_server, dermamnist):
    work = project_copy(tmp_path_factory.mktemp("prefect") / "medssl", **{
        "mlflow.experiment": "prefect-e2e", "export.registered_model": "derm-prefect", "pretrain.vae.latent_dim": 32})
    port = free_port()
    home = work.parent / "prefect-home"
    env = run_env(MLFLOW_TRACKING_URI=mlflow_server, MEDSSL_DATA_PATH=str(dermamnist), PREFECT_HOME=str(home),
                  PREFECT_PORT=str(port), PREFECT_API_URL=f"http://127.0.0.1:{port}/api", RUN_DIR=str(work / ".run/prefect"))
    up = subprocess.run(["flows/services.sh", "up"], cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
    pids = {n: int((work / f".run/prefect/{n}.pid").read_text()) for n in ("server", "worker")}
    # a new shell without PREFECT_API_URL reaches the same server through the profile prefect-up made active
    shell = {k: v for k, v in env.items() if k != "PREFECT_API_URL"}
    ls = subprocess.run([str(BIN / "prefect"), "deployment", "inspect", "medssl-pipeline/dermamnist", "--output", "json"],
                        cwd=work, env=shell, capture_output=True, text=True, timeout=120)
    assert ls.returncode == 0 and json.loads(ls.stdout)["name"] == "dermamnist", ls.stdout + ls.stderr
    yield {"dir": work, "env": env, "pids": pids}
    down = subprocess.run(["flows/services.sh", "down"], cwd=work, env=env, capture_output=True, text=True, timeout=120)
    assert down.returncode == 0, down.stderr
    assert 'active = "ephemeral"' in (home / "profiles.toml").read_text()  # the profile it replaced
    for name, pid in pids.items():
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)  # prefect-down leaves no process of ours running


def deployment_run(stack, name, *params):
    cmd = [str(BIN / "prefect"), "deployment", "run", name, "--watch", "--watch-timeout", "900"]
    for p in params:
        cmd += ["--param", p]
    return subprocess.run(cmd, cwd=stack["dir"], env=stack["env"], capture_output=True, text=True, timeout=1000)


def api(stack, path: str, body: dict) -> list:
    """POST to the stack's Prefect REST API (not an in-process client, which would use its own settings)."""
    import json
    import urllib.request

    req = urllib.request.Request(stack["env"]["PREFECT_API_URL"] + path, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(req, timeout=30) as r:
        return json.loads(r.read())


def flow_runs(stack, flow_name):
    runs = api(stack, "/flow_runs/filter", {"flows": {"name": {"any_": [flow_name]}}})
    arts = api(stack, "/artifacts/filter", {})
    return runs, arts


def test_pipeline_deployment_completes_and_registers_champion(prefect_stack, mlflow_server):
    r = deployment_run(prefect_stack, "medssl-pipeline/dermamnist", "epochs=1", "pretrain_epochs=1", "max_train=512",
                       "max_eval=256", 'inits=["random", "imagenet", "simclr"]', "grid_epochs=1", "grid_max_train=128",
                       "fractions=[0.1, 1.0]")
    assert r.returncode == 0 and "Completed" in r.stdout, r.stdout[-4000:] + r.stderr[-2000:]
    runs, arts = flow_runs(prefect_stack, "medssl-pipeline")
    assert [x["state_type"] for x in runs] == ["COMPLETED"]
    results = [a["data"] for a in arts if a["key"] == "medssl-results"]
    assert len(results) == 1 and results[0].index("## Verdict") < results[0].index("## Champion")  # the answer first
    assert "difference to ImageNet" in results[0]
    report = [a["data"] for a in arts if a["key"] == "medssl-report"]
    assert len(report) == 1 and "### Linear probe" in report[0] and "| simclr |" in report[0]
    assert "](data:image/png;base64," in report[0] and ".png)" not in report[0]  # images travel with the artifact
    progress = [a for a in arts if a["key"] == "medssl-progress"]  # updated in place as stages end
    assert len(progress) == 1 and progress[0]["type"] == "progress" and float(progress[0]["data"]) == 100.0
    stages = [json.loads(a["data"]) if isinstance(a["data"], str) else a["data"] for a in arts if a["key"] == "medssl-stages"]
    n_stages = 2 + 1 + 3 + 3  # fetch, prepare, pretrain-simclr, three grids, finetune, evaluate, export
    assert len(stages) == n_stages  # a new version each time a stage ended, while the flow ran
    assert sorted(sum(r["state"] == "Completed" for r in t) for t in stages) == list(range(1, n_stages + 1))
    grid = [json.loads(a["data"]) if isinstance(a["data"], str) else a["data"] for a in arts if a["key"] == "medssl-grid"]
    assert sorted(len(t) for t in grid) == [3, 6, 9]  # init x protocol rows, growing as each grid finished
    assert all(0 <= r["100 %"] <= 1 and "10 %" in r for r in max(grid, key=len))

    mlflow.set_tracking_uri(mlflow_server)
    parents = [x for x in mlflow.search_runs(experiment_names=["prefect-e2e"], output_format="list")
               if x.data.tags.get("orchestrator") == "prefect"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert parents[0].data.tags["mlflow.note.content"] in results[0]  # the verdict is the run's description
    children = mlflow.search_runs(experiment_names=["prefect-e2e"], output_format="list",
                                  filter_string=f"tags.mlflow.parentRunId = '{parents[0].info.run_id}'")
    names = {c.data.tags.get("medssl.run") for c in children}
    finetuned = {n for n in names if n.startswith("finetune-")}  # the champion only, chosen on validation
    assert len(finetuned) == 1 and finetuned <= {"finetune-random", "finetune-imagenet", "finetune-simclr"}
    assert names - finetuned == {"pretrain-simclr", "grid-random", "grid-imagenet", "grid-simclr", "export"}
    reports = [a.path for a in mlflow.MlflowClient().list_artifacts(parents[0].info.run_id, "reports")]
    assert "reports/report.html" in reports and "reports/balanced_accuracy_vs_fraction.png" in reports
    mv = mlflow.MlflowClient().get_model_version_by_alias("derm-prefect", "champion")
    export_run = mlflow.get_run(mv.tags["export_run_id"])
    assert export_run.data.tags["mlflow.parentRunId"] == parents[0].info.run_id  # produced by this flow run


def test_failing_task_fails_flow_and_mlflow_run(prefect_stack, mlflow_server):
    r = deployment_run(prefect_stack, "medssl-pipeline/dermamnist", "data_path=/nonexistent/dermamnist.npz", "retries=0")
    assert r.returncode != 0
    runs, _ = flow_runs(prefect_stack, "medssl-pipeline")
    failed = [x for x in runs if x["state_type"] == "FAILED"]
    assert len(failed) == 1 and "nonexistent" in r.stdout + r.stderr
    mlflow.set_tracking_uri(mlflow_server)
    statuses = sorted(x.info.status for x in mlflow.search_runs(experiment_names=["prefect-e2e"], output_format="list")
                      if x.data.tags.get("orchestrator") == "prefect")
    assert statuses == ["FAILED", "FINISHED"]


def test_tune_deployment_agrees_with_study_and_best_file(prefect_stack, mlflow_server):
    """Fair tuning through the deployment: one study per init, the same trial budget, each init's best values
    under its own key in tuned.yaml."""
    import optuna
    import yaml

    r = deployment_run(prefect_stack, "medssl-tune/dermamnist", "n_trials=2", "epochs=1", "pretrain_epochs=1",
                       "max_train=256", "max_eval=128", 'tune_inits=["imagenet", "vae"]')
    assert r.returncode == 0 and "Completed" in r.stdout, r.stdout[-4000:] + r.stderr[-2000:]
    d = prefect_stack["dir"]
    tuned = yaml.safe_load((d / "tuned.yaml").read_text())["tuned"]
    assert set(tuned) == {"imagenet", "vae"}
    mlflow.set_tracking_uri(mlflow_server)
    parent = [x for x in mlflow.search_runs(experiment_names=["prefect-e2e"], output_format="list")
              if x.data.tags.get("stage") == "tune"][0]
    trials = mlflow.search_runs(experiment_names=["prefect-e2e"], output_format="list",
                                filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(t.data.tags["init"] for t in trials) == ["imagenet", "imagenet", "vae", "vae"]
    for init in ("imagenet", "vae"):
        study = optuna.load_study(study_name=f"medssl-dermamnist-{init}", storage=f"sqlite:///{d}/optuna.db")
        assert len(study.trials) == 2
        assert tuned[init]["finetune"]["weight_decay"] == pytest.approx(study.best_params["finetune.weight_decay"])
        assert parent.data.metrics[f"{init}/best_value"] == pytest.approx(study.best_value)
    assert "pretrain" not in tuned["imagenet"]  # a baseline has no pretraining to tune
    assert tuned["vae"]["pretrain"]["vae"]["beta"] == pytest.approx(
        optuna.load_study(study_name="medssl-dermamnist-vae", storage=f"sqlite:///{d}/optuna.db").best_params["pretrain.vae.beta"])
