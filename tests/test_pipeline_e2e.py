"""End to end on a 512-image subset, 1 epoch: `medssl pipeline` (dvc repro inside a parent MLflow run)
against a real MLflow server, then the registry, pyfunc, `medssl predict` and DVC's change tracking."""
import csv
import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from conftest import BIN, project_copy, run_env, set_params

pytestmark = pytest.mark.slow


def sh(args, cwd, env, check=True):
    r = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    if check and r.returncode != 0:
        raise AssertionError(f"{args} exited {r.returncode}\nstdout:\n{r.stdout[-4000:]}\nstderr:\n{r.stderr[-6000:]}")
    return r


@pytest.fixture(scope="module")
def project(tmp_path_factory, mlflow_server, dermamnist):
    """A fresh git checkout of the project with a small budget, after one `medssl pipeline`."""
    work = project_copy(tmp_path_factory.mktemp("clone"), **{
        "data.max_train": 512, "data.max_eval": 256, "budgets.demo.pretrain_epochs": 1, "budgets.demo.finetune_epochs": 1,
        "pretrain.vae.latent_dim": 32, "mlflow.experiment": "e2e", "export.registered_model": "derm-e2e"})
    env = run_env(MLFLOW_TRACKING_URI=mlflow_server, MEDSSL_DATA_PATH=str(dermamnist),
                  DVC_SITE_CACHE_DIR=str(work / ".dvc/tmp/site"))
    run = sh([str(BIN / "medssl"), "pipeline"], work, env)
    mlflow.set_tracking_uri(mlflow_server)
    return {"dir": work, "env": env, "log": run.stderr + run.stdout, "uri": mlflow_server}


def runs_of(experiment: str):
    exp = mlflow.get_experiment_by_name(experiment)
    return mlflow.search_runs([exp.experiment_id], output_format="list", order_by=["attributes.start_time ASC"])


def test_pipeline_tracks_parent_and_nested_runs(project, dermamnist):
    runs = runs_of("e2e")
    parents = [r for r in runs if r.data.tags.get("stage") == "pipeline"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0]
    children = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert set(children) == {"pretrain-vae", "finetune-random", "finetune-imagenet", "finetune-vae", "export"}
    md5 = hashlib.md5(dermamnist.read_bytes()).hexdigest()
    lock = yaml.safe_load((project["dir"] / "dvc.lock").read_text())
    assert lock["stages"]["fetch"]["outs"][0]["md5"] == md5  # DVC and MLflow agree on the data version
    for r in children.values():
        assert r.info.status == "FINISHED"
        assert r.data.tags["data_md5"] == md5 and r.data.tags["seed"] == "42" and len(r.data.tags["git_commit"]) >= 40
    ft = children["finetune-imagenet"]
    sys.path.insert(0, str(project["dir"] / "src"))
    from medssl.config import load_params

    lr = load_params(project["dir"] / "params.yaml").finetune.lr  # params.yaml + tuned.yaml
    assert ft.data.tags["init"] == "imagenet" and float(ft.data.params["lr"]) == pytest.approx(lr)
    client = mlflow.MlflowClient()
    gap = client.get_metric_history(ft.info.run_id, "gap_accuracy")
    tr = client.get_metric_history(ft.info.run_id, "train_accuracy")
    va = client.get_metric_history(ft.info.run_id, "val_accuracy")
    assert [m.step for m in gap] == [1] and gap[0].value == pytest.approx(tr[0].value - va[0].value)
    assert "test_auc_macro" in ft.data.metrics and "test_kappa" in ft.data.metrics
    arts = {a.path for a in client.list_artifacts(ft.info.run_id, "plots")}
    assert {"plots/confusion_imagenet.png", "plots/curves_imagenet.png"} <= arts
    vae_imgs = {a.path for a in client.list_artifacts(children["pretrain-vae"].info.run_id, "vae")}
    assert "vae/reconstructions_epoch001.png" in vae_imgs and "vae/samples_epoch001.png" in vae_imgs


def test_registry_round_trip_champion_chosen_on_validation(project):
    d = project["dir"]
    ex = yaml.safe_load((d / "metrics/export.json").read_text())
    vals = {i: yaml.safe_load((d / f"metrics/finetune/{i}.json").read_text())["val"]["balanced_accuracy"]
            for i in ("random", "imagenet", "vae")}
    assert vals[ex["champion"]] == max(vals.values())
    assert ex["parity_max_abs_diff"] <= 1e-4 and ex["parity_images"] >= 64
    client = mlflow.MlflowClient()
    mv = client.get_model_version_by_alias("derm-e2e", "champion")
    assert int(mv.version) == ex["version"]
    assert mv.tags["init"] == ex["champion"] and "test_accuracy" in mv.tags and "val_balanced_accuracy" in mv.tags
    assert mv.tags["source_run_id"] == yaml.safe_load((d / f"metrics/finetune/{ex['champion']}.json").read_text())["run_id"]

    model = mlflow.pyfunc.load_model("models:/derm-e2e@champion")
    with np.load(d / "data/raw/dermamnist.npz") as z:
        x = z["test_images"][:32]
    p = model.predict(x)
    p = p["probabilities"] if isinstance(p, dict) else np.asarray(p)
    assert p.shape == (32, 7) and np.allclose(p.sum(1), 1, atol=1e-5)


def test_predict_cli_agrees_with_pytorch(project, tmp_path):
    d, env = project["dir"], project["env"]
    with np.load(d / "data/raw/dermamnist.npz") as z:
        x = z["test_images"][:40]
    folder = tmp_path / "lesions"
    folder.mkdir()
    for i, img in enumerate(x):
        Image.fromarray(img).save(folder / f"img{i:03d}.png")
    out = tmp_path / "pred.csv"
    sh([str(BIN / "medssl"), "predict", "models:/derm-e2e@champion", str(folder), "--out", str(out)], d, env)
    rows = list(csv.DictReader(out.open()))
    assert [Path(r["file"]).name for r in rows] == [f"img{i:03d}.png" for i in range(40)]
    assert set(rows[0]) == {"file", "predicted", *(f"p_{c}" for c in ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"))}

    sys.path.insert(0, str(d / "src"))
    from medssl.models.classifier import Classifier, ExportModel

    champion = yaml.safe_load((d / "metrics/export.json").read_text())["champion"]
    ckpt = torch.load(d / f"models/finetune/{champion}/model.pt", weights_only=True)
    clf = Classifier(ckpt["backbone"], 7, ckpt["dropout"])
    clf.load_state_dict(ckpt["state_dict"])
    with torch.no_grad():
        ref = ExportModel(clf, ckpt["mean"], ckpt["std"], ckpt["image_size"]).eval()(torch.from_numpy(x)).argmax(1)
    assert [r["predicted"] for r in rows] == [ckpt["classes"][i] for i in ref.tolist()]

    bad = folder / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    r = sh([str(BIN / "medssl"), "predict", "models:/derm-e2e@champion", str(folder)], d, env, check=False)
    assert r.returncode == 2 and "broken.jpg" in r.stderr and "Traceback" not in r.stderr


def test_dvc_tracks_changes(project):
    d, env = project["dir"], project["env"]
    assert "Running stage" not in sh(["dvc", "repro"], d, env).stdout  # a second repro does nothing
    r = sh(["dvc", "status", "--json"], d, env)
    assert r.stdout.strip() in ("{}", ""), r.stdout
    set_params(d / "params.yaml", **{"finetune.lr": 3e-4})
    changed = set(yaml.safe_load(sh(["dvc", "status", "--json"], d, env).stdout))
    # stages whose own inputs changed; evaluate and export follow them in the DAG
    assert changed == {"finetune@random", "finetune@imagenet", "finetune_ssl@vae"}
    dag = sh(["dvc", "dag", "--dot", "export"], d, env).stdout
    assert '"finetune@imagenet" -> "evaluate"' in dag and '"evaluate" -> "export"' in dag, dag
    sh(["git", "checkout", "params.yaml"], d, env)


def test_failed_parity_registers_nothing_and_marks_run_failed(project, tmp_path):
    d, env = project["dir"], project["env"]
    params = tmp_path / "params.yaml"
    shutil.copy(d / "params.yaml", params)
    set_params(params, **{"export.parity_tolerance": 1e-15})
    client = mlflow.MlflowClient()
    before = len(client.search_model_versions("name='derm-e2e'"))
    onnx_before = hashlib.md5((d / "models/champion.onnx").read_bytes()).hexdigest()
    r = sh([str(BIN / "medssl"), "export", "--params", str(params)], d, env, check=False)
    assert r.returncode == 2 and "not registered" in r.stderr
    assert len(client.search_model_versions("name='derm-e2e'")) == before
    assert hashlib.md5((d / "models/champion.onnx").read_bytes()).hexdigest() == onnx_before
    last_export = [x for x in runs_of("e2e") if x.info.run_name == "export"][-1]
    assert last_export.info.status == "FAILED"


def test_mlflow_project_entry_point_calls_same_cli(project):
    d, env = project["dir"], project["env"]
    sh([str(BIN / "mlflow"), "run", ".", "-e", "evaluate", "--env-manager", "local", "--experiment-name", "e2e"], d, env)
    runs = [r for r in runs_of("e2e") if r.data.tags.get("mlflow.project.entryPoint") == "evaluate"]
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
