"""Faults suite, trust: resume keyed on everything a result depends on, the exported file is the champion, the
registry's provenance is the checkpoint's own, outputs are checked, overrides never rewrite the project's data.

A tiny separable dataset (a colour per class) trains in seconds, so each case runs the real stages in-process
against an SQLite store in the test's folder.
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import threading
import time
from pathlib import Path

import mlflow
import numpy as np
import onnx
import pytest
import requests
import torch

from medssl.config import load_params
from medssl.data.prepare import run_prepare
from medssl.data.sources import md5sum
from medssl.layout import Layout
from medssl.resume import Checkpointer, resume_key

from conftest import BIN, ROOT, free_port, run_env, wait_http

# the comparison at the demo's 32 px, the champion at 48 px (prepared beside it): what export ships is the 48-px one
TINY = {"budgets.demo.finetune_image_size": 48, "inits.baselines": ["imagenet"], "inits.ssl": [], "grid.fusion": [],
        "grid.fractions": [1.0], "grid.imbalance": [], "grid.protocols": ["linear", "finetune"],
        "budgets.demo.grid": {"epochs": 2, "max_train": None, "max_eval": None, "batch_size": 16},
        "budgets.demo.finetune_epochs": 3, "finetune.batch_size": 16, "export.parity_images": 64,
        "mlflow.experiment": "trust", "export.registered_model": "trust-classifier"}


def colour_npz(path: Path, n: int = 70, size: int = 28, seed: int = 0) -> Path:
    """MedMNIST-layout npz whose 7 classes differ by colour (learnable in a few steps), noise on top."""
    rng = np.random.default_rng(seed)
    palette = rng.integers(30, 226, (7, 3))
    arrays = {}
    for i, split in enumerate(("train", "val", "test")):
        y = np.arange(n) % 7
        x = palette[y][:, None, None, :] + rng.normal(0, 25, (n, size, size, 3))
        x[:, :, :, :] += (i * 3 + np.arange(n) % 5)[:, None, None, None]  # no image repeats across splits
        arrays[f"{split}_images"] = np.clip(x, 0, 255).astype(np.uint8)
        arrays[f"{split}_labels"] = y.astype(np.uint8)[:, None]
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)
    return path


def project(root: Path, overrides: dict | None = None):
    """A folder with the colour npz at data.path, prepared; -> (Params, Layout)."""
    p = load_params(ROOT / "params.yaml", {**TINY, **(overrides or {})}, tuned=False)
    lay = Layout(root)
    colour_npz(lay.raw(p.data.path))
    run_prepare(p, lay)
    return p, lay


# ---- resume ---------------------------------------------------------------------------------------------------

def test_resume_state_of_other_data_model_encoder_or_device_is_discarded_with_the_reason(tmp_path, capsys):
    """Fails on the code before the key covered the prepared data (it keyed on the raw file's md5 only): a state
    left at 32 px was resumed at 48 px."""
    p32, lay = project(tmp_path)
    key = lambda p, init="vae", device="cpu": resume_key(p, "grid", init, json.loads(lay.meta.read_text()), lay, device)
    lay.encoder("vae").parent.mkdir(parents=True)
    torch.save({"state_dict": {"w": torch.zeros(2)}}, lay.encoder("vae"))
    p32 = load_params(ROOT / "params.yaml", {**TINY, "inits.ssl": ["vae"]}, tuned=False)
    state = Checkpointer(lay.resume("grid-vae"), key(p32))
    state.save({"cells": {"linear_fractions_f1_s0": {"x": np.float32(0.5)}}, "probas": {"k": {"val": np.ones((2, 7))}}})
    again = Checkpointer(lay.resume("grid-vae"), key(p32)).load()
    assert again["probas"]["k"]["val"].shape == (2, 7) and isinstance(again["probas"]["k"]["val"], np.ndarray)

    p48 = load_params(ROOT / "params.yaml", {**TINY, "inits.ssl": ["vae"], "data.image_size": 48}, tuned=False)
    run_prepare(p48, lay)  # the same raw file, prepared at another size
    cases = {"data": key(p48)}
    run_prepare(p32, lay)  # back to the state's data
    cases["model"] = key(p32.model_copy(update={"model": p32.model.model_copy(update={"dropout": 0.5})}))
    cases["device"] = key(p32, device="cuda")
    torch.save({"state_dict": {"w": torch.ones(2)}}, lay.encoder("vae"))  # the encoder retrained since
    cases["encoder"] = key(p32)
    for changed, k in cases.items():
        capsys.readouterr()
        assert Checkpointer(lay.resume("grid-vae"), k).load() is None, changed
        line = capsys.readouterr().err.strip()
        assert line.endswith("starting over") and f"other {changed}" in line and len(line.splitlines()) == 1, line


class _Payload:
    def __reduce__(self):
        return (Path.touch, (Path(os.environ["MEDSSL_TEST_MARKER"]),))


def test_resume_file_is_read_without_running_its_code(tmp_path, monkeypatch, capsys):
    """Fails on the code that unpickled the state (torch.load(weights_only=False)) before checking its key."""
    marker = tmp_path / "code-ran"
    monkeypatch.setenv("MEDSSL_TEST_MARKER", str(marker))
    path = tmp_path / "grid-random.pt"
    torch.save({"key": "anything", "state": _Payload()}, path, pickle_protocol=pickle.HIGHEST_PROTOCOL)
    assert Checkpointer(path, {"a": 1}).load() is None
    assert not marker.exists() and "not a resume state this version reads" in capsys.readouterr().err


# ---- export, registry, inference ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two classifiers of the same data and init (ImageNet's, fine-tuned 3 epochs: "long", and 1: "short"; a
    random init does not beat the constant predictor in so few steps), each evaluated: their model.pt,
    finetune.json and test.json kept aside for the export cases."""
    from medssl import grid, finetune, evaluate

    root = tmp_path_factory.mktemp("trust")
    mp = pytest.MonkeyPatch()
    mp.chdir(root)
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root}/mlflow.db")
    for var in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):  # left by earlier tests' runs
        mp.delenv(var, raising=False)
    # an earlier test in this worker may have left MLflow's active experiment set to another store's
    mp.setattr(mlflow.tracking.fluent, "_active_experiment_id", None)
    mlflow.set_tracking_uri(f"sqlite:///{root}/mlflow.db")
    p, lay = project(root)
    for init in p.inits.all:
        grid.run_grid(p, init, lay)
    kept = {}
    for label, epochs in (("short", 1), ("long", 3)):
        variant = load_params(ROOT / "params.yaml", {**TINY, "budgets.demo.finetune_epochs": epochs}, tuned=False)
        finetune.run_finetune(variant, "imagenet", lay, log_model=False)
        evaluate.run_evaluate(variant, lay)
        kept[label] = root / "kept" / label
        kept[label].mkdir(parents=True)
        for f in (lay.classifier, lay.finetune_metrics, lay.test_metrics):
            shutil.copy(f, kept[label] / f.name)
    yield {"root": root, "p": p, "lay": lay, "kept": kept}
    mp.undo()


def use(t, label: str, finetune_json_of: str | None = None) -> dict:
    """Put the kept outputs of `label` in place (with another's finetune.json: a kill between the two files)."""
    lay, kept = t["lay"], t["kept"]
    shutil.copy(kept[label] / "model.pt", lay.classifier)
    shutil.copy(kept[label] / "test.json", lay.test_metrics)
    shutil.copy(kept[finetune_json_of or label] / "finetune.json", lay.finetune_metrics)
    return torch.load(lay.classifier, weights_only=True)


def registered_onnx(name: str, version) -> bytes:
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}"))
    return onnx.load(str(local / "model.onnx")).SerializeToString()


def test_champion_onnx_is_the_alias_model_and_provenance_is_the_checkpoints(trained):
    """Fails on the code that replaced models/champion.onnx before the promotion decision and read the init, run and
    validation scores from metrics/finetune.json (here a stale one, as a kill right after model.pt leaves)."""
    from medssl.export import run_export

    p, lay = trained["p"], trained["lay"]
    vals = {label: torch.load(trained["kept"][label] / "model.pt", weights_only=True)["val"]["balanced_accuracy"]
            for label in trained["kept"]}
    better, worse = sorted(vals, key=vals.get, reverse=True)
    assert vals[better] > vals[worse] > 1 / 7, vals  # both above the export's constant-predictor floor
    use(trained, better)
    first = run_export(p, lay)
    assert first["promoted"] and lay.onnx.read_bytes() == registered_onnx(p.export.registered_model, first["version"])

    ckpt = use(trained, worse, finetune_json_of=better)
    second = run_export(p, lay)
    assert not second["promoted"] and second["champion"] == "imagenet"
    assert lay.onnx.read_bytes() == registered_onnx(p.export.registered_model, first["version"])  # still the alias's
    mv = mlflow.MlflowClient().get_model_version(p.export.registered_model, second["version"])
    assert mv.tags["source_run_id"] == ckpt["run_id"] and mv.tags["init"] == "imagenet"
    assert mv.tags["val_balanced_accuracy"] == f"{vals[worse]:.4f}" and mv.tags["onnx_sha256"]
    use(trained, better)


def test_killed_registration_leaves_no_version_without_its_record(trained, monkeypatch):
    """Fails on the code that registered first and set the description and tags in later calls: a kill right
    after the version was created left it READY with neither."""
    from mlflow.tracking.client import MlflowClient

    from medssl.export import run_export

    p, lay = trained["p"], trained["lay"]
    use(trained, "long")
    before = lay.onnx.read_bytes() if lay.onnx.is_file() else None
    real = MlflowClient._create_model_version

    def killed_after(self, *a, **k):
        real(self, *a, **k)
        raise KeyboardInterrupt("killed right after the version was created")

    monkeypatch.setattr(MlflowClient, "_create_model_version", killed_after)
    with pytest.raises(KeyboardInterrupt):
        run_export(p, lay)
    monkeypatch.undo()
    client = mlflow.MlflowClient()
    versions = client.search_model_versions(f"name='{p.export.registered_model}'")
    assert versions
    for v in versions:
        assert v.status == "READY" and "source_run_id" in v.tags and "promoted" in v.tags and v.description, v
    assert (lay.onnx.read_bytes() if lay.onnx.is_file() else None) == before


def test_export_refuses_test_scores_of_another_checkpoint(trained):
    """Fails on the code that took metrics/test.json as it found it (scores of the model finetune replaced)."""
    from medssl.errors import StaleStageError
    from medssl.export import run_export

    lay = trained["lay"]
    use(trained, "short")
    shutil.copy(trained["kept"]["long"] / "test.json", lay.test_metrics)
    with pytest.raises(StaleStageError, match="run `medssl evaluate` first"):
        run_export(trained["p"], lay)
    use(trained, "long")


def test_damaged_or_non_finite_models_are_refused_everywhere(trained, tmp_path, monkeypatch, capsys):
    """Fails on the code that served and predicted whatever the registered file answered: a bit-rotted model.onnx
    answered NaN for every image and exited 0, and /ping said ok for a model answering NaN."""
    from medssl import inference
    from medssl.errors import ModelIntegrityError
    from medssl.inference import Predictor

    p, root = trained["p"], trained["root"]
    name = p.export.registered_model
    uri = f"models:/{name}@{p.export.alias}"
    good = Predictor(uri)
    assert good.check() is None
    # a GPU provider asked for that does not load (compiled in, its libraries missing): said in one line, not silent
    capsys.readouterr()
    with monkeypatch.context() as m:
        m.setattr(inference, "onnx_providers", lambda: ["TensorrtExecutionProvider", "CPUExecutionProvider"])
        fell_back = Predictor(uri)
    warned = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert fell_back.session.get_providers() == ["CPUExecutionProvider"] and fell_back.check() is None
    assert warned == [f"warning: {uri}: onnxruntime could not load TensorrtExecutionProvider and runs on the CPU "
                      f"(`medssl doctor` says why)"], warned
    # 4 KB of bit rot in the stored copy of the registered weights
    copy = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(tmp_path / "dl"))) / "model.onnx"
    original = copy.read_bytes()
    stored = [f for f in root.rglob("mlartifacts/**/model.onnx") if f.read_bytes() == original]
    assert stored
    rotted = bytearray(original)
    rotted[len(rotted) // 2 : len(rotted) // 2 + 4096] = os.urandom(4096)
    for f in stored:
        f.write_bytes(bytes(rotted))
    try:
        with pytest.raises(ModelIntegrityError, match="is not the file registered"):
            Predictor(uri)
        (tmp_path / "img").mkdir()
        from PIL import Image
        Image.fromarray(np.full((28, 28, 3), 90, np.uint8)).save(tmp_path / "img/a.png")
        r = subprocess.run([str(BIN / "medssl"), "predict", uri, str(tmp_path / "img")], cwd=root, capture_output=True,
                           text=True, env=run_env(MLFLOW_TRACKING_URI=f"sqlite:///{root}/mlflow.db"))
        assert r.returncode == 2 and "is not the file registered" in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert not r.stdout
    finally:
        for f in stored:
            f.write_bytes(original)

    # a model whose file is intact but whose outputs are not finite: refused by predict, unhealthy at /ping
    nan_uri = register_nan_model(p, root)
    with pytest.raises(ModelIntegrityError, match="non-finite probabilities"):
        Predictor(nan_uri).predict(np.zeros((3, 28, 28, 3), np.uint8))
    port = free_port()
    env = run_env(MLFLOW_TRACKING_URI=f"sqlite:///{root}/mlflow.db")
    proc = subprocess.Popen([str(BIN / "medssl"), "serve", nan_uri, "--port", str(port)], cwd=root, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 90
        while True:
            try:
                ping = requests.get(f"http://127.0.0.1:{port}/ping", timeout=5)
                break
            except requests.ConnectionError:
                assert proc.poll() is None and time.time() < deadline, proc.stderr.read() if proc.poll() is not None else "no answer"
                time.sleep(0.5)
        assert ping.status_code == 503 and ping.json()["status"] == "unhealthy" and "non-finite" in ping.json()["reason"]
        r = requests.post(f"http://127.0.0.1:{port}/invocations", json={"inputs": np.zeros((1, 28, 28, 3), int).tolist()})
        assert r.status_code == 500 and "non-finite" in r.json()["message"]
    finally:
        proc.terminate()
        proc.wait(30)


def register_nan_model(p, root: Path) -> str:
    """An ONNX graph with medssl's input and output that answers NaN, registered with medssl's metadata."""
    from onnx import TensorProto, helper

    from medssl.export import onnx_sha256

    c = 7
    nodes = [helper.make_node("Cast", ["images"], ["f"], to=TensorProto.FLOAT),
             helper.make_node("ReduceMean", ["f"], ["m"], keepdims=0, axes=[1, 2, 3]),
             helper.make_node("Unsqueeze", ["m", "ax"], ["u"]),
             helper.make_node("Mul", ["u", "zeros"], ["z"]),
             helper.make_node("Div", ["z", "zeros"], ["probabilities"])]
    graph = helper.make_graph(nodes, "nan", [helper.make_tensor_value_info("images", TensorProto.UINT8, ["N", 28, 28, 3])],
                              [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", c])],
                              [helper.make_tensor("zeros", TensorProto.FLOAT, [1, c], [0.0] * c),
                               helper.make_tensor("ax", TensorProto.INT64, [1], [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)  # one onnxruntime reads
    meta = {"class_names": [str(i) for i in range(c)], "input_size": [28, 28], "channels": 3, "onnx_sha256": onnx_sha256(model)}
    with mlflow.start_run():
        info = mlflow.onnx.log_model(model, name="nan", metadata=meta, save_as_external_data=False)
    mv = mlflow.register_model(info.model_uri, "trust-nan")
    return f"models:/trust-nan/{mv.version}"


# ---- overrides ------------------------------------------------------------------------------------------------

def test_tune_overrides_never_rewrite_the_projects_prepared_data(tmp_path):
    """Fails on the code whose `medssl tune -S data.max_train=...` prepared the subset into data/prepared (the DVC
    output every later stage reads)."""
    from medssl.tune import prepare_search
    from medssl.errors import ConfigError

    p, lay = project(tmp_path)
    before = {f: md5sum(f) for f in (lay.prepared, lay.meta, lay.data_card)}
    os.chdir(tmp_path)
    try:
        search = load_params(ROOT / "params.yaml", {**TINY, "data.max_train": 35}, tuned=False)
        card = prepare_search(search, p)
        assert card["n"]["train"] < 70 and Layout().tuning().prepared.is_file()
        assert {f: md5sum(f) for f in before} == before
        with pytest.raises(ConfigError, match="data.medmnist given to tune would replace"):
            prepare_search(load_params(ROOT / "params.yaml", {**TINY, "data.medmnist": "bloodmnist",
                                                              "data.path": p.data.path}, tuned=False), p)
    finally:
        os.chdir(ROOT)


# ---- hostile input: one-line refusals, in seconds ---------------------------------------------------------------

@pytest.fixture(scope="module")
def champion(trained) -> str:
    """models:/<name>@<alias> of the fixture's project (exported here unless an earlier case did)."""
    from medssl.export import run_export

    p = trained["p"]
    try:
        mlflow.MlflowClient().get_model_version_by_alias(p.export.registered_model, p.export.alias)
    except mlflow.exceptions.MlflowException:
        use(trained, "long")
        run_export(p, trained["lay"])
    return f"models:/{p.export.registered_model}@{p.export.alias}"


def serve_process(trained, uri: str, *args: str):
    """`medssl serve` as a real process on a free loopback port -> (process, base URL), once /ping answers."""
    port = free_port()
    proc = subprocess.Popen([str(BIN / "medssl"), "serve", uri, "--port", str(port), *args], cwd=trained["root"],
                            env=run_env(MLFLOW_TRACKING_URI=f"sqlite:///{trained['root']}/mlflow.db"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_http(f"http://127.0.0.1:{port}/ping", proc)
    except Exception:
        proc.kill()
        raise
    return proc, f"http://127.0.0.1:{port}"


def loopback() -> requests.Session:
    s = requests.Session()
    s.trust_env = False  # no proxy for 127.0.0.1
    return s


def test_config_refusals_name_the_field(tmp_path):
    """Fails on the code that validated `data.path: README.md` (fetch then replaced README.md with the npz),
    `registered_model: a/b` (refused by the registry after all the work) and read a 1 KB YAML alias bomb for 44 s
    and 3.1 GB."""
    from medssl.errors import ConfigError

    for path in ("README.md", "/etc/hosts.npz", "../elsewhere/data/x.npz", "data/prepared/x.npz", "data/raw/x.csv"):
        with pytest.raises(ConfigError, match=r"data\.path.*fetch writes this file"):
            load_params(ROOT / "params.yaml", {"data.path": path}, tuned=False)
    with pytest.raises(ConfigError, match=r"export\.registered_model"):
        load_params(ROOT / "params.yaml", {"export.registered_model": "a/b"}, tuned=False)
    with pytest.raises(ConfigError, match=r"export\.alias"):
        load_params(ROOT / "params.yaml", {"export.alias": "the champion"}, tuned=False)
    bomb = ["a: &a [x, x, x, x, x, x, x, x, x]"] + [
        f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]" for i in range(8)]
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text() + "\n".join(bomb) + "\n")
    assert len((tmp_path / "params.yaml").read_text()) - len((ROOT / "params.yaml").read_text()) < 1024
    with pytest.raises(ConfigError, match="72 YAML aliases"):
        load_params(tmp_path / "params.yaml", tuned=False)


def test_rest_refusals_are_named_and_coded(trained, champion):
    """Fails on the code that answered NaN in JSON with a message not naming it, a text/plain body with error code
    REQUEST_TOO_LARGE and 100k-deep JSON with 500."""
    proc, url = serve_process(trained, champion)
    s = loopback()
    try:
        ok = s.post(f"{url}/invocations", json={"inputs": np.full((2, 28, 28, 3), 90, int).tolist()})
        assert ok.status_code == 200 and np.allclose(np.sum(ok.json()["predictions"], 1), 1, atol=1e-5)
        nan = s.post(f"{url}/invocations", data=b'{"inputs": [[[[NaN, 1, 2]]]]}', headers={"content-type": "application/json"})
        assert nan.status_code == 400 and "NaN is not a JSON number" in nan.json()["message"], nan.text
        deep = s.post(f"{url}/invocations", data=b"[" * 100_000 + b"]" * 100_000, headers={"content-type": "application/json"})
        assert deep.status_code == 400 and "nested too deeply" in deep.json()["message"], deep.text
        text = s.post(f"{url}/invocations", data=b"hello", headers={"content-type": "text/plain"})
        assert text.status_code == 415 and text.json()["error_code"] == "UNSUPPORTED_MEDIA_TYPE", text.text
        assert s.get(f"{url}/ping").json()["status"] == "ok"
    finally:
        proc.terminate()
        proc.wait(30)


BAD_INPUTS = {  # what a user sends by mistake -> what the refusal must name
    "floats in [0, 1]": (np.full((2, 28, 28, 3), 0.35), "multiply by 255, round"),
    "another size": (np.full((1, 32, 32, 3), 90), "resize"),
    "grey for an RGB model": (np.full((1, 28, 28, 1), 90), "convert"),
    "values over 255": (np.full((1, 28, 28, 3), 300), "0-255"),
}


def test_registered_model_refuses_what_it_cannot_score_through_pyfunc(trained, champion):
    """Fails on the model logged with mlflow.onnx's own pyfunc: floats in [0, 1] became black uint8 images and got
    confident probabilities (nv 0.853, three identical rows)."""
    model = mlflow.pyfunc.load_model(champion)
    ok = model.predict(np.full((2, 28, 28, 3), 90, np.uint8))
    assert ok.shape == (2, 7) and ok.dtype == np.float32 and np.allclose(ok.sum(1), 1, atol=1e-5)
    assert np.array_equal(model.predict(np.full((2, 28, 28, 3), 90, np.int64)), ok)  # what JSON integers parse to
    for case, (x, fix) in BAD_INPUTS.items():
        with pytest.raises(mlflow.exceptions.MlflowException, match=fix) as e:
            model.predict(x)
        assert len(str(e.value)) < 200 and "\n" not in str(e.value), (case, str(e.value))


@pytest.mark.slow
def test_mlflow_models_serve_answers_like_medssl_serve_and_refuses_in_short_400s(trained, champion):
    """A real `mlflow models serve` of the registered model: a bad batch gets a 400 under 500 characters naming
    the fix (was: 200 for floats, 1,968 characters of array dump for a wrong size); a valid batch gets the
    probabilities `medssl serve` gives."""
    port = free_port()
    proc = subprocess.Popen([str(BIN / "mlflow"), "models", "serve", "-m", champion, "--env-manager", "local",
                             "-h", "127.0.0.1", "-p", str(port)], cwd=trained["root"],
                            env=run_env(MLFLOW_TRACKING_URI=f"sqlite:///{trained['root']}/mlflow.db"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    ours, url = serve_process(trained, champion)
    s = loopback()
    try:
        wait_http(f"http://127.0.0.1:{port}/ping", proc)
        batch = {"inputs": np.stack([np.full((28, 28, 3), v) for v in (30, 90, 200)]).tolist()}
        theirs = s.post(f"http://127.0.0.1:{port}/invocations", json=batch)
        mine = s.post(f"{url}/invocations", json=batch)
        assert theirs.status_code == 200 and mine.status_code == 200, theirs.text[:500]
        assert np.allclose(theirs.json()["predictions"], mine.json()["predictions"], atol=1e-6)
        for case, (x, fix) in BAD_INPUTS.items():
            r = s.post(f"http://127.0.0.1:{port}/invocations", json={"inputs": x.tolist()})
            assert r.status_code == 400 and fix in r.json()["message"], (case, r.status_code, r.text[:600])
            assert len(r.text) < 500, (case, len(r.text), r.text)
    finally:
        for p in (proc, ours):
            p.terminate()
            p.wait(30)


def test_predict_refusals_lose_nothing(trained, champion, tmp_path):
    """Fails on the code that accepted `--batch-size 0`, overwrote an input image with `--out` onto it, predicted a
    1x1 image with confidence and re-initialised a 0-byte mlflow.db."""
    root = trained["root"]
    env = run_env(MLFLOW_TRACKING_URI=f"sqlite:///{root}/mlflow.db")
    from PIL import Image

    (tmp_path / "img").mkdir()
    img = tmp_path / "img/a.png"
    Image.fromarray(np.full((28, 28, 3), 90, np.uint8)).save(img)
    kept = img.read_bytes()
    medssl = lambda *a, e=env, cwd=root: subprocess.run([str(BIN / "medssl"), "predict", *a], cwd=cwd, env=e,
                                                          capture_output=True, text=True, timeout=300)
    for args, says in (((champion, str(img), "--batch-size", "0"), "--batch-size"),
                       ((champion, str(tmp_path / "img"), "--out", str(img)), "would overwrite an image")):
        r = medssl(*args)
        assert r.returncode == 2 and says in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert img.read_bytes() == kept
    Image.fromarray(np.full((1, 1, 3), 90, np.uint8)).save(tmp_path / "dot.png")
    r = medssl(champion, str(tmp_path / "dot.png"))
    assert r.returncode == 2 and "1x1 is too small" in r.stderr and not r.stdout, r.stderr

    bare = {k: v for k, v in env.items() if k != "MLFLOW_TRACKING_URI"}
    for content, says in ((b"", "empty file"), (b"not a database, just bytes", "not an SQLite database")):
        (tmp_path / "mlflow.db").write_bytes(content)
        r = medssl(champion, str(img), e=bare, cwd=tmp_path)
        assert r.returncode == 2 and says in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert (tmp_path / "mlflow.db").read_bytes() == content


def test_stale_grid_and_damaged_checkpoint_are_named(trained, tmp_path):
    """Fails on the code whose evaluate, over grid outputs of a run with other fractions, died with
    KeyError: 'subset_fractions_f0.01_s0', and whose export of a truncated model.pt printed a traceback."""
    from medssl.errors import StaleStageError
    from medssl.checkpoints import load_classifier
    from medssl.finetune import choose_champion

    p, lay = trained["p"], trained["lay"]
    other = load_params(ROOT / "params.yaml", {**TINY, "grid.fractions": [0.5, 1.0]}, tuned=False)
    with pytest.raises(StaleStageError, match=r"imagenet\.json was computed with other .*grid.*run `medssl grid imagenet`"):
        choose_champion(other, lay)
    assert choose_champion(p, lay)[0][0] == "imagenet"
    use(trained, "long")
    good = lay.classifier.read_bytes()
    try:
        lay.classifier.write_bytes(good[: len(good) // 3])
        with pytest.raises(StaleStageError, match="not a readable checkpoint.*rerun `medssl finetune`"):
            load_classifier(lay.classifier, torch.device("cpu"))
    finally:
        lay.classifier.write_bytes(good)


@pytest.mark.slow
def test_serve_keeps_answering_with_idle_and_slow_sockets_open(trained, champion):
    """Fails on the code that passed --concurrency to uvicorn's limit_concurrency, which counts connections: three
    idle sockets made every request 503 (400 requests from 4 threads at --concurrency 4: 173 x 503), and
    `--concurrency 0` answered everything 503. Bounded: at most 800 requests within 60 s, on loopback."""
    import socket
    from concurrent.futures import ThreadPoolExecutor

    r = subprocess.run([str(BIN / "medssl"), "serve", champion, "--concurrency", "0"], cwd=trained["root"],
                       env=run_env(MLFLOW_TRACKING_URI=f"sqlite:///{trained['root']}/mlflow.db"),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--concurrency" in r.stderr and "Traceback" not in r.stderr, r.stderr

    proc, url = serve_process(trained, champion, "--concurrency", "4")
    port = int(url.rsplit(":", 1)[1])
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]  # connect, send nothing
    slow = socket.create_connection(("127.0.0.1", port))
    slow.sendall(b"POST /invocations HTTP/1.1\r\nHost: x\r\n")  # headers that never finish
    body = json.dumps({"inputs": np.full((2, 28, 28, 3), 90, int).tolist()})
    deadline, statuses, lock = time.time() + 60, {}, threading.Lock()

    def client(n: int) -> None:
        s = loopback()
        for _ in range(n):
            if time.time() > deadline:
                return
            code = s.post(f"{url}/invocations", data=body, headers={"content-type": "application/json"}, timeout=30).status_code
            with lock:
                statuses[code] = statuses.get(code, 0) + 1

    try:
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(client, [200] * 4))
        assert set(statuses) == {200} and sum(statuses.values()) >= 100, statuses
        for s in idle:  # closed by the server once idle (serve.IDLE_SECONDS), not held for ever
            s.settimeout(15)
            assert s.recv(1) == b""
        assert proc.poll() is None and loopback().get(f"{url}/ping").status_code == 200
    finally:
        for s in (*idle, slow):
            s.close()
        proc.terminate()
        proc.wait(30)


def test_a_tie_for_champion_goes_to_auc_then_calibration_never_to_the_first_listed():
    """On easy data every init's 100 % fine-tune cells reach 1.0 (a grey binary set under `budget: cpu`: all 7 at
    1.0); the old code took the first listed, random, whose 64-px fine-tune then predicted one class."""
    from medssl.finetune import champion_of

    def cells(bal, auc, ece):
        return [{"val": {"balanced_accuracy": bal, "auc_macro": auc, "ece": ece}} for _ in range(3)]

    tie = {"random": cells(1.0, 1.0, 0.006), "imagenet": cells(1.0, 1.0, 0.0001), "vae": cells(1.0, 0.99, 0.0)}
    order, means = champion_of(tie, "balanced_accuracy")
    assert order == ["imagenet", "random", "vae"] and means == {"random": 1.0, "imagenet": 1.0, "vae": 1.0}
    # an AUC that could not be computed ranks last (listed first, a NaN would compare neither above nor below and win)
    assert champion_of({"mim": cells(1.0, float("nan"), 0.0), **tie}, "balanced_accuracy")[0] == ["imagenet", "random", "vae", "mim"]
    # no tie: the select metric decides alone, whatever AUC and calibration say
    assert champion_of({"random": cells(0.61, 0.99, 0.0), "imagenet": cells(0.60, 1.0, 0.0)}, "balanced_accuracy")[0][0] == "random"
