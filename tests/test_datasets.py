"""Your own images: every source layout, grey and RGB, binary, multi-class and ordinal, and the refusals.

The fast tests build and refuse datasets through `medssl fetch`; the slow ones run `medssl pipeline` on each
synthetic layout against one real MLflow server, then `medssl predict`, pyfunc and `medssl serve` on grey and RGB
PNG files."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from conftest import BIN, free_port, project_copy, run_env, wait_http
from medssl.config import Folder, dataset_overrides, load_params
from medssl.errors import ConfigError
from medssl.data.folder import build_folder
from synthetic import class_folder, grouped_csv, images, medmnist_npz

COUNTS = {"train": 120, "val": 40, "test": 40}


def fetch(tmp_path: Path, data: dict, expect_ok: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    """`medssl fetch` then `medssl prepare` with params.yaml's data section updated by `data`, in tmp_path."""
    p = yaml.safe_load(open("params.yaml"))
    p["data"].update({"path": "data/raw.npz", **data})  # under tmp_path, the project (cwd)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(p))
    env = {k: v for k, v in os.environ.items() if k != "MEDSSL_DATA_PATH"} | (env or {})
    r = None
    for cmd in ("fetch", "prepare") if expect_ok else ("fetch",):
        r = subprocess.run([sys.executable, "-m", "medssl.cli", cmd, "--params", str(tmp_path / "params.yaml")],
                           cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300)
        assert (r.returncode == 0) == expect_ok, r.stderr
    return r


def one_line_error(r: subprocess.CompletedProcess) -> str:
    """The refusal: exit 2, no traceback, one message (rich wraps long lines; unwrap them)."""
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.startswith("error:"), r.stderr
    return " ".join(r.stderr.split())


def card(tmp_path: Path) -> dict:
    return json.loads((tmp_path / "metrics/data_card.json").read_text())


def test_grey_npz_stays_one_channel_with_its_class_names(tmp_path):
    npz = medmnist_npz(tmp_path / "xray.npz", COUNTS, 2)
    fetch(tmp_path, {"source": "npz", "npz": str(npz), "classes": ["normal", "pneumonia"]})
    c = card(tmp_path)
    assert c["dataset"] == "xray" and c["channels"] == 1 and c["task"] == "binary" and c["positive_class"] == "pneumonia"
    assert c["class_counts"]["test"] == {"normal": 20, "pneumonia": 20}
    with np.load(tmp_path / "data/prepared/dataset.npz") as z:
        assert z["train_images"].shape == (120, 32, 32, 1)  # no tripled storage
    meta = json.loads((tmp_path / "data/prepared/meta.json").read_text())
    assert len(meta["mean"]) == 1 and meta["classes"] == ["normal", "pneumonia"]


def test_folder_with_and_without_split_folders(tmp_path):
    classes = ["benign", "in-situ", "invasive", "normal"]  # alphabetical = label order
    flat = class_folder(tmp_path / "flat", classes, 20)
    (tmp_path / "w1").mkdir()
    fetch(tmp_path / "w1", {"source": "folder", "folder": {"images": str(flat)}})
    c = card(tmp_path / "w1")
    assert c["dataset"] == "flat" and c["channels"] == 3 and c["task"] == "multiclass" and c["num_classes"] == 4
    assert sum(c["n"].values()) == 80 and all(min(v.values()) >= 1 for v in c["class_counts"].values())
    split = class_folder(tmp_path / "split", classes, 20, {"train": 0.6, "val": 0.2, "test": 0.2})
    (tmp_path / "w2").mkdir()
    fetch(tmp_path / "w2", {"source": "folder", "folder": {"images": str(split)}})
    c = card(tmp_path / "w2")
    assert c["dataset"] == "split" and c["n"] == {"train": 48, "val": 16, "test": 16}  # the folders' own split, kept
    with np.load(tmp_path / "w2/data/raw.npz") as z:
        assert all(f.startswith("test/") for f in z["test_files"]) and z["class_names"].tolist() == classes
    (tmp_path / "noval").mkdir()
    for s in ("train", "test"):  # no val/: carved from train, stratified
        os.symlink(split / s, tmp_path / "noval" / s)
    p = load_params("params.yaml", {"data.source": "folder", "data.folder": {"images": str(tmp_path / "noval")}})
    built = build_folder(p.data.folder, p.seed)
    assert len(built.splits["val"].labels) > 0 and len(built.splits["test"].labels) == 16
    assert not set(built.files["val"]) & set(built.files["train"])


def test_grouped_csv_keeps_each_patient_in_one_split(tmp_path):
    csv_path = grouped_csv(tmp_path / "ct", ["cyst", "normal", "stone"], patients=45)
    fetch(tmp_path, {"source": "csv", "csv": {"file": str(csv_path), "size": 28}})
    with np.load(tmp_path / "data/raw.npz") as z:
        groups = {s: set(z[f"{s}_groups"]) for s in ("train", "val", "test")}
        assert z["class_names"].tolist() == ["cyst", "normal", "stone"]
        assert sum(len(z[f"{s}_labels"]) for s in groups) == 135
    assert not (groups["train"] & groups["val"] or groups["train"] & groups["test"] or groups["val"] & groups["test"])
    assert card(tmp_path)["dataset"] == "labels"


def test_mixed_grey_and_rgb_folder_is_stored_rgb_and_grey_only_folder_grey(tmp_path):
    """One colour image makes the dataset RGB (grey ones repeated); RGB files with R = G = B count as grey."""
    rng = np.random.default_rng(0)
    for k, name in enumerate(["a", "b"]):
        (tmp_path / "mixed" / name).mkdir(parents=True)
        (tmp_path / "grey" / name).mkdir(parents=True)
        for i, img in enumerate(images(k, 12, rng)):
            Image.fromarray(img).save(tmp_path / "mixed" / name / f"{i}.png")  # mode L
            Image.fromarray(img).convert("RGB").save(tmp_path / "grey" / name / f"{i}.png")  # R = G = B
        Image.fromarray(images(k, 1, rng, rgb=True)[0]).save(tmp_path / "mixed" / name / "colour.png")
    cfg = Folder(images=str(tmp_path / "mixed"), size=28, val=0.25, test=0.25)
    built = build_folder(cfg, 0)
    assert built.splits["train"].images.shape[-1] == 3 and built.grey_images == 24
    grey = build_folder(cfg.model_copy(update={"images": str(tmp_path / "grey")}), 0)
    assert grey.splits["train"].images.shape[-1] == 1 and grey.grey_images == 24


def test_refusals_name_what_to_fix_and_keep_the_good_file(tmp_path):
    good = medmnist_npz(tmp_path / "good.npz", COUNTS, 3)
    fetch(tmp_path, {"source": "npz", "npz": str(good)})
    kept = (tmp_path / "data/raw.npz").read_bytes()
    cases = []
    multi = medmnist_npz(tmp_path / "multi.npz", COUNTS, 3)
    with np.load(multi) as z:
        arrays = dict(z)
    arrays["train_labels"] = np.eye(3, dtype=np.uint8)[np.arange(120) % 3]
    np.savez(multi, **arrays)
    cases.append(({"source": "npz", "npz": str(multi)}, "train_labels: shape (120, 3), 3 labels per image (multi-label"))
    csv_path = grouped_csv(tmp_path / "csv", ["x", "y"], patients=20)
    (tmp_path / "csv/images/p004_1.png").unlink()
    cases.append(({"source": "csv", "csv": {"file": str(csv_path)}}, "1 image(s) named in column 'path' are not in"))
    cases.append(({"source": "csv", "csv": {"file": str(csv_path)}}, "row 15: images/p004_1.png"))
    folder = class_folder(tmp_path / "folder", ["a", "b", "c"], 10)
    for f in (folder / "c").iterdir():
        f.unlink()
    cases.append(({"source": "folder", "folder": {"images": str(folder)}}, f"{folder / 'c'}: empty class folder"))
    csv2 = grouped_csv(tmp_path / "csv2", ["x", "y"], patients=20)
    cases.append(({"source": "csv", "csv": {"file": str(csv2)}, "classes": ["x", "z"]},
                  "column 'label' has unknown class(es) ['y']"))
    split = class_folder(tmp_path / "split", ["a", "b"], 10, {"train": 0.6, "val": 0.2, "test": 0.2})
    for f in (split / "val" / "b").iterdir():
        f.unlink()
    (split / "val" / "b").rmdir()
    cases.append(({"source": "folder", "folder": {"images": str(split)}}, "val split has no example of class(es) ['b']"))
    cases.append(({"source": "npz", "npz": str(good), "classes": ["only", "two"]}, "labels go up to 2 but data.classes names 2"))
    cases.append(({"source": "csv", "csv": {"file": str(csv2), "columns": {"group": "patient_id"}}},
                  "missing column(s) ['patient_id']"))
    grades = class_folder(tmp_path / "grades", ["mild", "moderate", "none", "severe"], 12)
    cases.append(({"source": "folder", "folder": {"images": str(grades)}, "task": "ordinal"},
                  "data.task is ordinal but the class names ['mild', 'moderate', 'none', 'severe']"))
    extra = class_folder(tmp_path / "extra", ["a", "b"], 10, {"train": 0.6, "val": 0.2, "test": 0.2})
    (extra / "valid").mkdir()
    cases.append(({"source": "folder", "folder": {"images": str(extra)}}, "folder(s) ['valid'] beside train/"))
    tiny = class_folder(tmp_path / "tiny", ["a", "b"], 2)
    cases.append(({"source": "folder", "folder": {"images": str(tiny)}},
                  "class(es) with fewer than 3 images, one for each of train, val and test: 'a' 2, 'b' 2"))
    typo = grouped_csv(tmp_path / "typo", ["normal", "pneumonia"], patients=20)
    rows = typo.read_text().splitlines()
    typo.write_text("\n".join(rows[:2] + [rows[2].replace("normal", "nromal").replace("pneumonia", "pnuemonia")] + rows[3:]) + "\n")
    cases.append(({"source": "csv", "csv": {"file": str(typo)}}, "fewer than 3 groups (column group: patients, lesions)"))
    for data, message in cases:
        msg = one_line_error(fetch(tmp_path, data, expect_ok=False))
        assert message in msg, (message, msg)
        assert (tmp_path / "data/raw.npz").read_bytes() == kept  # the last good file stays


def test_medmnist_flag_offline_without_the_file_names_the_flag(tmp_path):
    proxy = "http://127.0.0.1:9"  # a closed port: the download fails at once
    env = {"HOME": str(tmp_path / "home"), "HTTPS_PROXY": proxy, "HTTP_PROXY": proxy, "https_proxy": proxy, "http_proxy": proxy}
    msg = one_line_error(fetch(tmp_path, {"source": "medmnist", "medmnist": "pneumoniamnist"}, expect_ok=False, env=env))
    assert "data.medmnist=pneumoniamnist" in msg and "python -m medmnist download --flag pneumoniamnist" in msg
    assert "MEDSSL_DATA_PATH" in msg and not (tmp_path / "data/raw.npz").exists()
    # with the file in medmnist's folder: class names from medmnist's own information
    (tmp_path / "home/.medmnist").mkdir(parents=True, exist_ok=True)
    medmnist_npz(tmp_path / "home/.medmnist/pneumoniamnist.npz", COUNTS, 2)
    fetch(tmp_path, {"source": "medmnist", "medmnist": "pneumoniamnist"}, env=env)
    c = card(tmp_path)
    assert c["dataset"] == "pneumoniamnist" and list(c["class_counts"]["train"]) == ["normal", "pneumonia"]
    (tmp_path / "home/.medmnist/pneumoniamnist.npz").unlink()  # offline again: the earlier fetch's file serves
    fetch(tmp_path, {"source": "medmnist", "medmnist": "pneumoniamnist"}, env=env)
    msg = one_line_error(fetch(tmp_path, {"source": "medmnist", "medmnist": "bloodmnist"}, expect_ok=False, env=env))
    assert "data.medmnist=bloodmnist" in msg  # ... but not for another flag


def test_names_and_selection_follow_the_dataset():
    p = load_params("params.yaml", {"data.medmnist": "pneumoniamnist"})
    assert (p.data.name, p.mlflow.experiment, p.export.registered_model, p.tune.study_name) == \
        ("pneumoniamnist", "medssl-pneumoniamnist", "pneumoniamnist-classifier", "medssl-pneumoniamnist")
    o = load_params("params.yaml", {"data.medmnist": "retinamnist", "data.task": "ordinal", "export.registered_model": "dr"})
    assert o.export.select_metric == "kappa_quadratic" and o.export.registered_model == "dr"
    assert load_params("params.yaml").export.select_metric == "balanced_accuracy"
    over = dataset_overrides("bloodmnist")
    assert over["data.medmnist"] == "bloodmnist" and over["data.path"] == "data/raw/bloodmnist.npz"
    assert over["tune.output"] == "tuned-bloodmnist.yaml" and over["data.npz"] is None and over["data.task"] == "auto"
    assert dataset_overrides("/x/Chest X-ray.csv")["data.csv"] == {"file": "/x/Chest X-ray.csv"}
    assert load_params("params.yaml", {"data.classes": [0, 1, 2], "data.positive": 2}).data.classes == ["0", "1", "2"]
    with pytest.raises(ConfigError, match="data.source is 'npz' but data.npz is not set"):
        load_params("params.yaml", {"data.source": "npz"})


def test_grey_imagenet_stem_is_the_rgb_network_on_the_repeated_image():
    """Summing the first convolution's ImageNet kernels = feeding the grey image as R = G = B."""
    from medssl.models.backbones import build_backbone

    x = torch.rand(4, 1, 32, 32)
    grey, _ = build_backbone("mobilenet_v2", [0.4], [0.2], imagenet=True)
    rgb, _ = build_backbone("mobilenet_v2", [0.4] * 3, [0.2] * 3, imagenet=True)
    with torch.no_grad():
        a, b = grey.eval()(x), rgb.eval()(x.expand(-1, 3, -1, -1))
    assert torch.allclose(a, b, atol=1e-4)
    assert next(m for m in grey.modules() if isinstance(m, torch.nn.Conv2d)).in_channels == 1


# ---- end to end: each layout through `medssl pipeline` to a registered model -------------------------------

SMALL = {"data.image_size": 32, "grid.fusion": [], "grid.imbalance": [1], "finetune.batch_size": 32,
         "budgets.demo.pretrain_epochs": 1, "budgets.demo.finetune_epochs": 4, "pretrain.batch_size": 64,
         "pretrain.vae.latent_dim": 16,
         "budgets.demo.grid": {"epochs": 3, "max_train": None, "max_eval": None, "fractions": [0.5, 1.0], "batch_size": 32}}


def layouts(root: Path) -> dict[str, dict]:
    """name -> (data section, inits, the class names its model must predict, channels). A folder already split into
    train/ val/ test/ differs from "tissue" only until `prepare` (test_folder_with_and_without_split_folders)."""
    xray = medmnist_npz(root / "xray.npz", {"train": 160, "val": 60, "test": 60}, 2)
    retina = medmnist_npz(root / "retina.npz", {"train": 200, "val": 75, "test": 75}, 5, rgb=True)
    tissue = ["benign", "in-situ", "invasive", "normal"]
    return {
        "xray": ({"source": "npz", "npz": str(xray), "classes": ["normal", "pneumonia"], "positive": "pneumonia"},
                 ["random", "imagenet", "vae", "simclr", "mim"], ["normal", "pneumonia"], 1),
        "tissue": ({"source": "folder", "folder": {"images": str(class_folder(root / "tissue", tissue, 45))}},
                   ["random", "imagenet"], tissue, 3),
        "labels": ({"source": "csv", "csv": {"file": str(grouped_csv(root / "ct", ["cyst", "normal", "stone"], 60))}},
                   ["random", "imagenet"], ["cyst", "normal", "stone"], 3),
        "retina": ({"source": "npz", "npz": str(retina), "task": "ordinal"},
                   ["random", "imagenet"], ["0", "1", "2", "3", "4"], 3),
    }


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory, mlflow_server):
    root = tmp_path_factory.mktemp("datasets")
    env = run_env(MLFLOW_TRACKING_URI=mlflow_server)
    env.pop("MEDSSL_DATA_PATH", None)
    out = {}
    for name, (data, inits, classes, channels) in layouts(root).items():
        work = project_copy(tmp_path_factory.mktemp(f"clone-{name}"), **SMALL, **{f"data.{k}": v for k, v in data.items()},
                            **{"inits.baselines": [i for i in inits if i in ("random", "imagenet")],
                               "inits.ssl": [i for i in inits if i not in ("random", "imagenet")]})
        r = subprocess.run([str(BIN / "medssl"), "pipeline"], cwd=work, env=env, capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, f"{name}:\n{r.stderr[-5000:]}"
        out[name] = {"dir": work, "classes": classes, "channels": channels, "log": r.stderr,
                     "export": json.loads((work / "metrics/export.json").read_text())}
    mlflow.set_tracking_uri(mlflow_server)
    return {"runs": out, "uri": mlflow_server, "env": env, "root": root}


slow = pytest.mark.slow


@slow
def test_each_layout_registers_a_model_with_its_classes(pipelines):
    client = mlflow.MlflowClient()
    for name, run in pipelines["runs"].items():
        model = f"{name}-classifier"
        assert run["export"]["model_uri"] == f"models:/{model}@champion", name
        v = client.get_model_version_by_alias(model, "champion")
        assert v.version == "1"  # a second dataset in the same store never moved this one's alias
        m = mlflow.pyfunc.load_model(f"models:/{model}@champion")
        meta = m.metadata.metadata
        assert meta["class_names"] == run["classes"] and meta["channels"] == run["channels"] and meta["dataset"] == name
        assert meta["input_size"] == [28, 28] and m.metadata.signature.inputs is None  # the model checks its input
        proba = m.predict(np.zeros((3, 28, 28, run["channels"]), np.uint8))
        assert proba.shape == (3, len(run["classes"])) and np.allclose(proba.sum(1), 1, atol=1e-5)
        with pytest.raises(mlflow.exceptions.MlflowException, match="channel"):  # grey to an RGB model, or RGB to grey
            m.predict(np.zeros((1, 28, 28, 3 if run["channels"] == 1 else 1), np.uint8))
        desc = client.get_registered_model(model).description
        assert ", ".join(run["classes"]) in desc and ("grey" if run["channels"] == 1 else "RGB") in desc
        exp = client.get_experiment_by_name(f"medssl-{name}")
        assert exp is not None and client.search_runs([exp.experiment_id], "tags.stage = 'pipeline'")[0].info.status == "FINISHED"


@slow
def test_task_shapes_the_report_and_the_selection(pipelines):
    xray, retina = pipelines["runs"]["xray"], pipelines["runs"]["retina"]
    report = (xray["dir"] / "reports/report.md").read_text()
    assert "### Binary task: positive class `pneumonia`" in report
    test = json.loads((xray["dir"] / "metrics/test.json").read_text())
    t = next(iter(test.values()))
    assert t["sensitivity"] == t["recall_pneumonia"] and t["specificity"] == t["recall_normal"]
    report = (retina["dir"] / "reports/report.md").read_text()
    assert report.index("### Quadratic κ (ordinal task") < report.index("### Linear probe")
    assert json.loads((retina["dir"] / "metrics/finetune.json").read_text())["select_metric"] == "kappa_quadratic"
    assert "onnx_val_kappa_quadratic" in retina["export"]  # the export gate and the alias compare on it too


@slow
def test_predict_answers_on_grey_and_rgb_png_files(pipelines, tmp_path):
    rng = np.random.default_rng(3)
    Image.fromarray(images(1, 1, rng)[0]).save(tmp_path / "grey.png")
    Image.fromarray(images(0, 1, rng, size=40, rgb=True)[0]).save(tmp_path / "colour.png")
    for name, run in pipelines["runs"].items():
        r = subprocess.run([str(BIN / "medssl"), "predict", f"models:/{name}-classifier@champion", str(tmp_path / "grey.png"),
                            str(tmp_path / "colour.png"), "--fit", "stretch"], cwd=run["dir"], env=pipelines["env"],
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        rows = list(__import__("csv").DictReader(r.stdout.splitlines()))
        assert list(rows[0]) == ["file", "predicted", *(f"p_{c}" for c in run["classes"])] and len(rows) == 2
        assert all(row["predicted"] in run["classes"] for row in rows)


@slow
@pytest.mark.parametrize("name", ["xray", "tissue"])
def test_serve_answers_with_the_dataset_names(pipelines, name):
    run, port = pipelines["runs"][name], free_port()
    proc = subprocess.Popen([str(BIN / "medssl"), "serve", "--port", str(port)], cwd=run["dir"], env=pipelines["env"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_http(f"{url}/ping", proc)
        direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        ping = json.loads(direct.open(f"{url}/ping").read())
        assert ping["classes"] == run["classes"] and ping["channels"] == run["channels"] and ping["dataset"] == name
        assert ping["model_uri"] == f"models:/{name}-classifier@champion"  # serve's default follows params.yaml
        rng = np.random.default_rng(0)
        img = images(1, 2, rng, rgb=run["channels"] == 3)
        body = json.dumps({"inputs": img.tolist()}).encode()  # grey: (N, h, w), no channel axis needed
        req = urllib.request.Request(f"{url}/invocations", body, {"Content-Type": "application/json"})
        out = json.loads(direct.open(req).read())
        assert out["classes"] == run["classes"] and np.asarray(out["predictions"]).shape == (2, len(run["classes"]))
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(30)
