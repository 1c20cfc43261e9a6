"""`prefect deployment run` through a real Prefect server and process worker (flows/services.sh)."""
import json
import os
import re
import subprocess
from pathlib import Path

import mlflow
import pytest

from conftest import BIN, free_port, project_copy, run_env

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def prefect_stack(tmp_path_factory, mlflow_server, dermamnist):
    # grid fine-tune cells at batch 128 (finetune.batch_size), as these runs were sized: at the demo's batch 32,
    # ImageNet's 1-epoch cells on the 128-image pool averaged 0.1407 validation balanced accuracy, under the
    # constant predictor's 0.1429 that random scores, so random became champion and the export gate (rightly)
    # refused its 1-epoch classifier. Each grid seed's SSL cells start from their own encoder (as under `budget: cpu`),
    # so the Dask shards below must find every seed's encoder.
    work = project_copy(tmp_path_factory.mktemp("prefect") / "medssl", **{
        "mlflow.experiment": "prefect-e2e", "export.registered_model": "derm-prefect", "pretrain.vae.latent_dim": 32,
        "budgets.demo.grid.batch_size": None, "budgets.demo.pretrain_per_seed": True})
    port = free_port()
    home = work.parent / "prefect-home"
    env = run_env(MLFLOW_TRACKING_URI=mlflow_server, MEDSSL_DATA_PATH=str(dermamnist), PREFECT_HOME=str(home),
                  PREFECT_PORT=str(port), PREFECT_API_URL=f"http://127.0.0.1:{port}/api", RUN_DIR=str(work / ".run/prefect"))
    up = subprocess.run(["flows/services.sh", "up"], cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
    pids = {n: int((work / f".run/prefect/{n}.pid").read_text()) for n in ("server", "worker")}
    # a new shell without PREFECT_API_URL reaches the same server through the profile prefect-up made active
    shell = {k: v for k, v in env.items() if k != "PREFECT_API_URL"}
    ls = subprocess.run([str(BIN / "prefect"), "deployment", "inspect", "medssl-pipeline/local", "--output", "json"],
                        cwd=work, env=shell, capture_output=True, text=True, timeout=120)
    assert ls.returncode == 0 and json.loads(ls.stdout)["name"] == "local", ls.stdout + ls.stderr
    yield {"dir": work, "env": env, "pids": pids}
    down = subprocess.run(["flows/services.sh", "down"], cwd=work, env=env, capture_output=True, text=True, timeout=120)
    assert down.returncode == 0, down.stderr
    assert 'active = "ephemeral"' in (home / "profiles.toml").read_text()  # the profile it replaced
    for pid in pids.values():
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
    r = deployment_run(prefect_stack, "medssl-pipeline/local", "epochs=1", "pretrain_epochs=1", "max_train=512",
                       "max_eval=256", 'inits=["random", "imagenet", "simclr"]', "grid_epochs=1", "grid_max_train=128",
                       "fractions=[0.1, 1.0]")
    assert r.returncode == 0 and "Completed" in r.stdout, r.stdout[-4000:] + r.stderr[-2000:]
    runs, arts = flow_runs(prefect_stack, "medssl-pipeline")
    assert [x["state_type"] for x in runs] == ["COMPLETED"]
    results = [a["data"] for a in arts if a["key"] == "medssl-results"]
    assert len(results) == 1 and results[0].index("## Verdict") < results[0].index("## Champion")  # the answer first
    assert "difference to ImageNet" in results[0]
    row = next(line for line in results[0].splitlines() if "(champion)" in line)  # test scores with [95 % interval]
    assert len(re.findall(r"\| \d\.\d{4} \[\d\.\d{3}, \d\.\d{3}\]", row)) == 3, row  # not the validation ones
    report = [a["data"] for a in arts if a["key"] == "medssl-report"]
    assert len(report) == 1 and "### Linear probe" in report[0] and "| simclr |" in report[0]
    assert "](data:image/png;base64," in report[0] and ".png)" not in report[0]  # images travel with the artifact
    progress = [a for a in arts if a["key"] == "medssl-progress"]  # updated in place as stages end
    assert len(progress) == 1 and progress[0]["type"] == "progress" and float(progress[0]["data"]) == 100.0
    stages = [json.loads(a["data"]) if isinstance(a["data"], str) else a["data"] for a in arts if a["key"] == "medssl-stages"]
    n_stages = 2 + 1 + 1 + 3 + 3  # fetch, prepare, pretrain-simclr, grid shards, three grids, finetune, evaluate, export
    assert len(stages) == 1 and len(stages[0]) == n_stages  # once, at the end: not a copy per stage burying the results
    assert all(r["state"] == "Completed" and r["minutes"] >= 0 for r in stages[0]), stages
    assert "stages ended; last: export Completed" in progress[0]["description"]
    shards = [a for a in arts if a["key"] == "medssl-shards"]
    assert len(shards) == 1 and float(shards[0]["data"]) == 100.0
    grid = [json.loads(a["data"]) if isinstance(a["data"], str) else a["data"] for a in arts if a["key"] == "medssl-grid"]
    assert len(grid) == 1 and len(grid[0]) == 3 * 3 and all(r["seeds"] == 3 for r in grid[0])  # once, every seed
    assert all(0 <= r["100 %"] <= 1 and "10 %" in r for r in grid[0])

    mlflow.set_tracking_uri(mlflow_server)
    parents = [x for x in mlflow.search_runs(experiment_names=["prefect-e2e"], output_format="list")
               if x.data.tags.get("orchestrator") == "prefect"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert parents[0].data.tags["mlflow.note.content"] in results[0]  # the verdict is the run's description
    children = mlflow.search_runs(experiment_names=["prefect-e2e"], output_format="list",
                                  filter_string=f"tags.mlflow.parentRunId = '{parents[0].info.run_id}'")
    names = {c.data.tags.get("medssl.run") for c in children}
    finetuned = {n for n in names if n.startswith("finetune-")}  # the champion only (demo: budgets.demo.finalists 1)
    assert len(finetuned) == 1 and finetuned <= {"finetune-random", "finetune-imagenet", "finetune-simclr"}
    assert names - finetuned == {"pretrain-simclr", "pretrain-simclr-s43", "pretrain-simclr-s44",  # one per grid seed
                                 "grid-random", "grid-imagenet", "grid-simclr", "export"}
    reports = [a.path for a in mlflow.MlflowClient().list_artifacts(parents[0].info.run_id, "reports")]
    assert "reports/report.html" in reports and "reports/balanced_accuracy_vs_fraction.png" in reports
    mv = mlflow.MlflowClient().get_model_version_by_alias("derm-prefect", "champion")
    export_run = mlflow.get_run(mv.tags["export_run_id"])
    assert export_run.data.tags["mlflow.parentRunId"] == parents[0].info.run_id  # produced by this flow run



def test_the_flow_runs_each_dvc_stage_after_the_stages_it_depends_on(prefect_stack):
    """The DAG is written twice, in dvc.yaml (for `dvc repro`) and in the flow (Prefect futures): the deployment run
    above ran one task per dvc.yaml stage of its inits, each started after every stage upstream of it in `dvc dag`
    had ended (`validate` is the flow's load_params). A stage missing from the flow, or one started early, fails."""
    from datetime import datetime

    from medssl.repro import Dag

    runs, _ = flow_runs(prefect_stack, "medssl-pipeline")
    run = next(r for r in runs if r["state_type"] == "COMPLETED")
    tasks = api(prefect_stack, "/task_runs/filter", {"flow_runs": {"id": {"any_": [run["id"]]}}})

    def stage(name: str) -> str:  # pretrain-simclr -> pretrain@simclr; fetch-1a2 -> fetch
        kind, _, item = name.partition("-")
        return f"{kind}@{item}" if kind in ("pretrain", "grid") else kind

    ran = {stage(t["name"]): t for t in tasks if not t["name"].startswith("medssl-grid")}  # not the subflow's
    dag = Dag.of(prefect_stack["env"], prefect_stack["dir"])
    name = {s: s.replace("grid_ssl@", "grid@") for s in dag.order}  # one grid task per init in the flow
    inits = {"random", "imagenet", "simclr"}  # the deployment run's
    want = {name[s] for s in dag.order if s != "validate" and s.partition("@")[2] in ("", *inits)}
    assert set(ran) == want, (sorted(ran), sorted(want))
    when = {s: (datetime.fromisoformat(t["start_time"]), datetime.fromisoformat(t["end_time"])) for s, t in ran.items()}
    for s in dag.order:
        if name[s] in ran:
            early = [name[u] for u in dag.upstream[s] if name[u] in ran and when[name[u]][1] > when[name[s]][0]]
            assert not early, (s, early)  # started before an upstream stage had ended


def test_the_flow_run_and_its_results_read_in_prefects_own_ui(prefect_stack, tmp_path):
    """Headless Chromium on the Prefect server's UI (nothing beyond 127.0.0.1): the deployment run's page shows it
    Completed, and the `medssl-results` artifact renders its markdown, the verdict before the champion."""
    from browser import Chromium

    runs, arts = flow_runs(prefect_stack, "medssl-pipeline")
    run = next(r for r in runs if r["state_type"] == "COMPLETED")
    results = next(a for a in arts if a["key"] == "medssl-results" and a["flow_run_id"] == run["id"])
    ui = prefect_stack["env"]["PREFECT_API_URL"].removesuffix("/api")
    shots = Path(os.environ.get("MEDSSL_SCREENSHOTS") or tmp_path)
    chromium = Chromium(tmp_path / "profile")
    try:
        page = chromium.open(f"{ui}/runs/flow-run/{run['id']}")
        page.wait(f"document.body.innerText.includes({json.dumps(run['name'])}) && "
                  "document.body.innerText.includes('Completed')", timeout=120)
        page.screenshot(shots / "prefect-flow-run.png")
        art = chromium.open(f"{ui}/artifacts/artifact/{results['id']}")  # (the key's page is a timeline of versions)
        headings = art.wait("(() => { const h = [...document.querySelectorAll('h2')].map(e => e.innerText.trim());"
                            " return h.includes('Verdict') && h.some(t => t.startsWith('Champion')) ? h : null; })()",
                            timeout=120)
        assert headings.index("Verdict") < next(i for i, t in enumerate(headings) if t.startswith("Champion")), headings
        assert "difference to ImageNet" in art.eval("document.body.innerText")
        art.screenshot(shots / "prefect-results.png")
    finally:
        chromium.close()

SMALL_RUN = ("epochs=1", "pretrain_epochs=1", "max_train=512", "max_eval=256", "grid_epochs=1", "grid_max_train=128",
             "fractions=[0.1, 1.0]")
THREADS_CELLS = {}  # init -> the cells of the threads runner's run above


@pytest.fixture(scope="module")
def dask_cluster(prefect_stack, mlflow_server, tmp_path_factory):
    """A real distributed.LocalCluster: 2 worker processes (nannies restart a killed one) on 127.0.0.1. Workers
    report to the stack's Prefect server and the MLflow server, and keep their own content cache."""
    import logging

    from distributed import Client, LocalCluster

    saved = dict(os.environ)
    os.environ.update(MLFLOW_TRACKING_URI=mlflow_server, PREFECT_API_URL=prefect_stack["env"]["PREFECT_API_URL"],
                      MEDSSL_CACHE=str(tmp_path_factory.mktemp("dask-cache")), MLFLOW_DISABLE_TELEMETRY="true")
    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                           dashboard_address=None, silence_logs=logging.ERROR)
    client = Client(cluster)
    try:
        yield cluster, client
    finally:
        client.close()
        cluster.close()
        os.environ.clear()
        os.environ.update(saved)


def grid_cells(stack, inits):
    return {i: json.loads((stack["dir"] / f"metrics/grid/{i}.json").read_text())["cells"] for i in inits}


def shard_runs(mlflow_server):
    mlflow.set_tracking_uri(mlflow_server)
    return [r for r in mlflow.search_runs(experiment_names=["prefect-e2e"], output_format="list")
            if "medssl.shard" in r.data.tags]


def grid_subflow_seconds() -> float:
    """Wall time of the newest medssl-grid subflow run (the grid alone, without the pipeline's other stages)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as client:
        run = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["medssl-grid"])),
                                    sort=FlowRunSort.START_TIME_DESC, limit=1)[0]
    return (run.end_time - run.start_time).total_seconds()


def test_dask_runner_gives_the_same_cells_as_threads_and_sequential(prefect_stack, mlflow_server, dask_cluster, tmp_path):
    """The same small grid through the threads runner (the first test), a 2-worker Dask cluster and one process
    cell after cell: the same cells, byte for byte in their scores."""
    import shutil
    import time

    from medssl.config import RunOverrides, load_params
    from medssl.grid import run_grid
    from medssl.layout import Layout

    cluster, client = dask_cluster
    inits = ["random", "imagenet", "simclr"]
    threads = grid_cells(prefect_stack, inits)
    before = {x.info.run_id for x in shard_runs(mlflow_server)}
    t0 = time.time()
    r = deployment_run(prefect_stack, "medssl-pipeline/local", *SMALL_RUN, f"inits={json.dumps(inits)}",
                       "runner=dask", f"dask_address={cluster.scheduler_address}")
    took = time.time() - t0
    assert r.returncode == 0 and "Completed" in r.stdout, r.stdout[-4000:] + r.stderr[-2000:]
    dask = grid_cells(prefect_stack, inits)
    workers = set(client.run(os.getpid).values())
    ran = {int(x.data.tags["medssl.process"].rsplit(":", 2)[1]) for x in shard_runs(mlflow_server)
           if x.info.run_id not in before}
    assert ran and ran <= workers, (ran, workers)  # the fine-tune cells ran in the Dask worker processes
    # one process, one cell after another (medssl grid), on a copy of the same prepared data and encoder
    d = prefect_stack["dir"]
    lay = Layout(tmp_path / "seq")
    shutil.copytree(d / "data/prepared", lay.prepared.parent)
    shutil.copytree(d / "models/pretrain/simclr", lay.encoder("simclr").parent)
    assert sorted(f.name for f in lay.encoder("simclr").parent.glob("*.pt")) == ["encoder.pt", "encoder_s43.pt",
                                                                                 "encoder_s44.pt"]  # one per grid seed
    over = RunOverrides(epochs=1, pretrain_epochs=1, max_train=512, max_eval=256, grid_epochs=1, grid_max_train=128,
                        fractions=[0.1, 1.0], inits=inits).dotted(load_params(d / "params.yaml"))
    p = load_params(d / "params.yaml", over)
    os.environ["MLFLOW_TRACKING_URI"] = mlflow_server
    t0 = time.time()
    sequential = {i: run_grid(p, i, lay, workers=1)["cells"] for i in inits}  # one torch thread, as on the workers
    took_sequential = time.time() - t0
    for i in inits:
        assert len(dask[i]) == 3 * 3 * (2 + 2) and dask[i] == threads[i], i  # seeds x protocols x (2 fractions + 2 imbalance)
    for i, cells in sequential.items():
        assert cells == dask[i], i
    print(f"\nDask pipeline (2 workers, {len(inits)} inits x 3 seeds = 9 shards): {took:.1f} s; its grid subflow "
          f"{grid_subflow_seconds():.1f} s; the same grid in one process, one cell after another: {took_sequential:.1f} s")
    THREADS_CELLS.update(threads)


def test_lost_dask_worker_reruns_its_shard_once(prefect_stack, mlflow_server, dask_cluster):
    """A worker killed mid-shard: the flow completes, the shard reran elsewhere, every cell is there once with
    the same scores, and the lost attempt's MLflow runs are KILLED, none RUNNING."""
    import signal
    import time

    cluster, client = dask_cluster
    inits = ["random", "imagenet"]
    workers = set(client.run(os.getpid).values())
    before = {x.info.run_id for x in shard_runs(mlflow_server)}
    cmd = [str(BIN / "prefect"), "deployment", "run", "medssl-pipeline/local", "--watch", "--watch-timeout", "900"]
    for a in (*SMALL_RUN, f"inits={json.dumps(inits)}", "runner=dask", f"dask_address={cluster.scheduler_address}"):
        cmd += ["--param", a]
    proc = subprocess.Popen(cmd, cwd=prefect_stack["dir"], env=prefect_stack["env"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    victim, deadline = None, time.time() + 600
    while victim is None and time.time() < deadline and proc.poll() is None:
        for x in shard_runs(mlflow_server):
            if x.info.run_id not in before and x.info.status == "RUNNING":
                pid = int(x.data.tags["medssl.process"].rsplit(":", 2)[1])
                if pid in workers:
                    victim = (pid, x.data.tags["medssl.shard"], x.data.tags["medssl.attempt"])
                    os.kill(pid, signal.SIGKILL)
                    break
        time.sleep(0.2)
    out, _ = proc.communicate(timeout=1000)
    assert victim is not None, "no shard was seen running on a Dask worker"
    assert proc.returncode == 0 and "Completed" in out, out[-4000:]
    cells = grid_cells(prefect_stack, inits)
    for i in inits:
        keys = [(c["protocol"], c["regime"], c["fraction"], c["seed"]) for c in cells[i]]
        assert len(keys) == len(set(keys)) == 3 * 3 * (2 + 2)  # every cell exactly once
        assert cells[i] == THREADS_CELLS[i], i  # and the same as without the loss
    runs = [x for x in shard_runs(mlflow_server) if x.info.run_id not in before]
    lost = [x for x in runs if x.data.tags["medssl.attempt"] == victim[2]]
    assert lost and {x.info.status for x in lost} == {"KILLED"}, [(x.info.status, x.data.tags) for x in lost]
    assert not [x for x in runs if x.info.status == "RUNNING"]
    kept = {x.data.tags["medssl.attempt"] for x in runs if x.data.tags["medssl.shard"] == victim[1]
            and x.info.status == "FINISHED"}
    assert len(kept) == 1 and victim[2] not in kept  # the shard's cells come from one attempt, on a live worker
    print(f"\nkilled Dask worker pid {victim[0]} during shard {victim[1]}; rerun as attempt {kept.pop()[:8]}")


def test_failing_task_fails_flow_and_mlflow_run(prefect_stack, mlflow_server):
    r = deployment_run(prefect_stack, "medssl-pipeline/local", "data_path=/nonexistent/dermamnist.npz", "retries=0")
    assert r.returncode != 0
    runs, _ = flow_runs(prefect_stack, "medssl-pipeline")
    failed = [x for x in runs if x["state_type"] == "FAILED"]
    assert len(failed) == 1 and "nonexistent" in r.stdout + r.stderr
    mlflow.set_tracking_uri(mlflow_server)
    statuses = sorted(x.info.status for x in mlflow.search_runs(experiment_names=["prefect-e2e"], output_format="list")
                      if x.data.tags.get("orchestrator") == "prefect")
    assert statuses.count("FAILED") == 1 and set(statuses) == {"FAILED", "FINISHED"}  # this one failed, the others not


def test_tune_deployment_agrees_with_study_and_best_file(prefect_stack, mlflow_server):
    """Fair tuning through the deployment: one study per init, the same trial budget, each init's best values
    under its own key in tuned.yaml."""
    import optuna
    import yaml

    r = deployment_run(prefect_stack, "medssl-tune/local", "n_trials=2", "epochs=1", "pretrain_epochs=1",
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


def test_deployment_takes_the_dataset_as_a_parameter(prefect_stack, mlflow_server, tmp_path):
    """`--param dataset=<npz>`: a grey two-class set through the same deployment; its experiment, registered
    model and class names are its own, and the DermaMNIST model's alias does not move."""
    import numpy as np

    from synthetic import medmnist_npz

    mlflow.set_tracking_uri(mlflow_server)
    client = mlflow.MlflowClient()
    before = client.get_model_version_by_alias("derm-prefect", "champion").version
    npz = medmnist_npz(tmp_path / "chest-xray.npz", {"train": 600, "val": 150, "test": 150}, 2)
    r = deployment_run(prefect_stack, "medssl-pipeline/local", f"dataset={npz}", 'inits=["random", "imagenet"]',
                       "epochs=4", "grid_epochs=3", "fractions=[0.5, 1.0]", "retries=0")
    assert r.returncode == 0 and "Completed" in r.stdout, r.stdout[-4000:] + r.stderr[-2000:]
    v = client.get_model_version_by_alias("chest-xray-classifier", "champion")
    meta = mlflow.pyfunc.load_model(f"models:/chest-xray-classifier/{v.version}").metadata.metadata
    assert meta["class_names"] == ["0", "1"] and meta["channels"] == 1 and meta["dataset"] == "chest-xray"
    assert client.get_run(v.run_id).info.experiment_id == client.get_experiment_by_name("medssl-chest-xray").experiment_id
    assert client.get_model_version_by_alias("derm-prefect", "champion").version == before
    with np.load(prefect_stack["dir"] / "data/prepared/dataset.npz") as z:
        assert z["train_images"].shape[-1] == 1
