import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import write_npz
from medssl.config import ConfigError, load_params
from medssl.data.prepare import resize_u8, stratified_subset
from medssl.data.sources import DataError, Split, fetch, load_npz, md5sum

OFFICIAL_TRAIN_COUNTS = [228, 359, 769, 80, 779, 4693, 99]


def test_real_dermamnist_validates_with_official_counts(dermamnist):
    splits = load_npz(dermamnist)
    assert {s: len(v.labels) for s, v in splits.items()} == {"train": 7007, "val": 1003, "test": 2005}
    assert np.bincount(splits["train"].labels).tolist() == OFFICIAL_TRAIN_COUNTS
    assert splits["train"].images.shape[1:] == (28, 28, 3) and splits["train"].labels.dtype == np.int64


@pytest.mark.parametrize(
    "override, message",
    [
        ({"val_labels": None}, "missing keys ['val_labels']"),
        ({"train_images": np.zeros((40, 28, 28, 3), np.float32)}, "train_images: dtype float32, expected uint8"),
        ({"test_images": np.zeros((40, 28, 28, 2), np.uint8)}, "test_images: shape (40, 28, 28, 2), expected (N, H, W) grey"),
        ({"test_images": np.zeros((40, 28, 28), np.uint8)}, "splits differ in channels (1 grey, 3 RGB)"),
        ({"val_labels": np.full((40, 1), 9, np.uint8)}, "val_labels: values [9] outside [0, 6]"),
        ({"val_labels": np.zeros((40, 3), np.uint8)}, "3 labels per image (multi-label, as ChestMNIST)"),
        ({"class_names": np.array(list("abcdef"))}, "train_labels: values [6] outside [0, 5] (the 6 classes named)"),
        ({"train_labels": np.zeros((39, 1), np.uint8)}, "train_labels: shape (39, 1), expected (40,) or (40, 1)"),
        ({"val_labels": (np.arange(40) % 6).astype(np.uint8)}, "val split has no example of class(es) ['6']"),
        ({"class_names": np.array(list("abcdefg")), "test_labels": (np.arange(40) % 6).astype(np.uint8)},
         "test split has no example of class(es) ['g']"),
        ({"val_images": np.zeros((40, 32, 32, 3), np.uint8)}, "splits differ in image size"),
    ],
)
def test_validation_errors_name_the_problem(tmp_path, override, message):
    path = write_npz(tmp_path / "bad.npz", **override)
    with pytest.raises(DataError) as e:
        load_npz(path)
    assert str(path) in str(e.value) and message in str(e.value)


def test_not_an_npz(tmp_path):
    bad = tmp_path / "x.npz"
    bad.write_text("hello")
    with pytest.raises(DataError, match="not a readable npz"):
        load_npz(bad)


def test_fetch_copies_env_file_atomically(tmp_path, monkeypatch):
    src = write_npz(tmp_path / "src.npz")
    monkeypatch.setenv("MEDSSL_DATA_PATH", str(src))
    target = fetch(tmp_path / "raw" / "dermamnist.npz")
    assert md5sum(target) == md5sum(src) and not list(target.parent.glob(".*tmp"))


def test_fetch_offline_names_path_and_remedy(tmp_path):
    """The real medmnist download against a closed network (a dead proxy, in a child process so the
    proxy cannot leak into this one) fails with one clear error and leaves no file behind."""
    target = tmp_path / "data/raw/images.npz"  # data.path, relative to the project (cwd)
    params = tmp_path / "params.yaml"
    params.write_text(open("params.yaml").read())
    env = {k: v for k, v in os.environ.items() if k != "MEDSSL_DATA_PATH"}
    env.update(HTTPS_PROXY="http://127.0.0.1:9", HTTP_PROXY="http://127.0.0.1:9", https_proxy="http://127.0.0.1:9", http_proxy="http://127.0.0.1:9")
    r = subprocess.run([sys.executable, "-m", "medssl.cli", "fetch", "--params", str(params)],
                       cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 2, r.stderr
    msg = " ".join(r.stderr.split())
    assert "data/raw/images.npz" in msg and "MEDSSL_DATA_PATH" in msg and "medmnist" in msg and "Traceback" not in msg
    assert not target.exists()


def test_fetch_missing_env_file(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDSSL_DATA_PATH", str(tmp_path / "nope.npz"))
    with pytest.raises(DataError, match="nope.npz: no such file"):
        fetch(tmp_path / "t.npz")


def test_resize_and_stratified_subset():
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (70, 28, 28, 3), dtype=np.uint8)
    y = np.arange(70) % 7
    assert resize_u8(x, 64).shape == (70, 64, 64, 3)
    sub = stratified_subset(Split(x, y), 35, seed=0)
    assert len(sub.labels) == 35 and np.bincount(sub.labels).tolist() == [5] * 7


def test_params_yaml_is_valid_and_errors_name_field(tmp_path):
    p = load_params("params.yaml")
    assert p.inits.all == ["random", "imagenet", "vae", "simclr", "mim", "imagenet-simclr", "imagenet-mim"]
    assert p.run_budget.finetune_epochs >= 1 and p.tune_inits == p.inits.all
    assert p.grid.protocols == ["linear", "finetune", "knn"] and len(p.grid.seeds) >= 3
    assert p.grid.fractions == [0.01, 0.1, 1.0]  # the demo budget's (budgets.demo.grid.fractions)
    bad = tmp_path / "params.yaml"
    bad.write_text(open("params.yaml").read().replace("backbone: mobilenet_v2", "backbone: vgg11"))
    with pytest.raises(ConfigError, match=r"model\.backbone.*vgg11"):
        load_params(bad)
    bad.write_text(open("params.yaml").read().replace("budget: demo", "budget: huge"))
    with pytest.raises(ConfigError, match="budget 'huge'"):
        load_params(bad)
    with pytest.raises(ConfigError, match=r"grid\.seeds: .*at least 3 distinct seeds"):
        load_params("params.yaml", {"grid.seeds": [0, 1]})
    with pytest.raises(ConfigError, match=r"budgets\.demo\.grid\.fractions: .*\(0, 1\].*1\.5"):
        load_params("params.yaml", {"budgets.demo.grid.fractions": [0.1, 1.5]})
    with pytest.raises(ConfigError, match=r"grid\.fractions: .*\(0, 1\].*1\.5"):
        load_params("params.yaml", {"budgets.demo.grid.fractions": None, "grid.fractions": [0.1, 1.5]})
    # the budget's fractions are the grid's; a different grid.fractions beside them is named, not ignored
    assert load_params("params.yaml", {"budget": "full"}).grid.fractions == [0.01, 0.05, 0.1, 0.25, 0.5, 1.0]
    assert load_params("params.yaml", {"budgets.demo.grid.fractions": [1.0, 0.1]}).grid.fractions == [0.1, 1.0]
    assert p.run_budget.grid.batch_size == 32 and load_params("params.yaml", {"budget": "full"}).run_budget.grid.batch_size is None
    with pytest.raises(ConfigError, match=r"budgets\.demo\.grid\.batch_size.*0"):
        load_params("params.yaml", {"budgets.demo.grid.batch_size": 0})
    with pytest.raises(ConfigError, match=r"grid\.fractions \[0\.5, 1\.0\] and budgets\.demo\.grid\.fractions"):
        load_params("params.yaml", {"grid.fractions": [0.5, 1.0]})
    with pytest.raises(ConfigError, match=r"grid.fusion group \['imagenet', 'simclr'\].*not configured: \['simclr'\]"):
        load_params("params.yaml", {"inits.ssl": ["vae", "mim"]})


def test_cli_reports_data_error_without_traceback(tmp_path):
    write_npz(tmp_path / "data/raw/images.npz", train_images=np.zeros((40, 28, 28, 3), np.int16))  # data.path
    params = tmp_path / "params.yaml"
    params.write_text(open("params.yaml").read())
    r = subprocess.run([sys.executable, "-m", "medssl.cli", "prepare", "--params", str(params)],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2 and "train_images: dtype int16" in r.stderr and "Traceback" not in r.stderr


def test_run_overrides_target_the_chosen_budget_and_split_inits():
    from pydantic import ValidationError

    from medssl.config import RunOverrides

    base = load_params("params.yaml")
    assert RunOverrides().dotted(base) == {"budget": "demo"}
    assert RunOverrides(budget="full", epochs=2, max_train=512, inits=["random", "vae", "imagenet"]).dotted(base) == {
        "budget": "full", "budgets.full.finetune_epochs": 2, "data.max_train": 512,
        "inits.baselines": ["random", "imagenet"], "inits.ssl": ["vae"], "grid.fusion": []}
    p = load_params("params.yaml", RunOverrides(epochs=2, pretrain_epochs=3).dotted(base))
    assert (p.run_budget.finetune_epochs, p.run_budget.pretrain_epochs) == (2, 3)
    with pytest.raises(ValidationError, match="epoch"):
        RunOverrides(epoch=2)  # a misspelt override is an error, never silently ignored


def test_flows_take_every_run_override_under_its_own_name():
    """The flows' parameters are the overrides' names (RunOverrides.pick reads them from the flow's locals): a field
    the pipeline flow lacks would never be set, and a default other than None would override params.yaml."""
    import inspect
    from pathlib import Path

    from medssl.config import RunOverrides

    sys.path.insert(0, str(Path("flows").resolve()))
    try:
        import pipeline
        import tune
    finally:
        sys.path.pop(0)
    fields = set(RunOverrides.model_fields)
    signatures = {f.name: inspect.signature(f.fn).parameters for f in (pipeline.pipeline, tune.tune)}
    assert fields <= set(signatures["medssl-pipeline"]), fields - set(signatures["medssl-pipeline"])
    assert {"epochs", "pretrain_epochs", "max_train", "max_eval", "dataset"} <= set(signatures["medssl-tune"])
    assert {(flow, k): par.default for flow, ps in signatures.items() for k, par in ps.items()
            if k in fields and par.default is not None} == {}


def test_config_defaults_are_params_yaml_values():
    """A value params.yaml leaves out means what params.yaml says: the model's defaults are params.yaml's."""
    from pathlib import Path

    from medssl.config import Params, _read_yaml, flatten

    raw = _read_yaml(Path("params.yaml"))
    default = flatten(Params.model_validate({"budgets": raw["budgets"]}).model_dump())
    shipped = flatten(load_params("params.yaml", tuned=False).model_dump())
    assert {k: (default.get(k), v) for k, v in shipped.items() if default.get(k) != v} == {}


def test_the_budget_carries_its_image_size_and_data_image_size_overrides_it():
    full = load_params("params.yaml", {"budget": "full"}, tuned=False)
    assert (full.image_size, full.image_size_key) == (64, "budgets.full.image_size")
    assert load_params("params.yaml", {"budget": "demo"}, tuned=False).image_size == 32
    own = load_params("params.yaml", {"budget": "full", "data.image_size": 48}, tuned=False)
    assert (own.image_size, own.image_size_key) == (48, "data.image_size")
    with pytest.raises(ConfigError, match=r"budgets\.full\.image_size: must be a multiple of 16"):
        load_params("params.yaml", {"budgets.full.image_size": 40}, tuned=False)
    with pytest.raises(ConfigError, match=r"does not divide budgets\.full\.image_size=64"):
        load_params("params.yaml", {"budget": "full", "pretrain.mim.patch": 24}, tuned=False)


def test_the_champion_is_prepared_and_trained_at_its_own_size(tmp_path):
    """budgets.<b>.finetune_image_size: prepare writes the splits at both sizes from the raw images (not one resized
    from the other), load_prepared hands each out, and a size that was not prepared is named."""
    from medssl.data.prepare import load_prepared, run_prepare
    from medssl.errors import StaleStageError
    from medssl.layout import Layout

    cpu = load_params("params.yaml", {"budget": "cpu"}, tuned=False)
    assert (cpu.image_size, cpu.finetune_image_size) == (32, 64)  # params.yaml's cpu budget
    assert load_params("params.yaml", {"budget": "demo"}, tuned=False).finetune_image_size == 32  # null: image_size
    own = load_params("params.yaml", {"budget": "cpu", "data.image_size": 48}, tuned=False)
    assert (own.image_size, own.finetune_image_size) == (48, 48)  # data.image_size sets both

    p = load_params("params.yaml", {"budgets.demo.finetune_image_size": 48}, tuned=False)
    lay = Layout(tmp_path)
    with np.load(write_npz(lay.raw(p.data.path), n=14)) as z:
        raw = dict(z)
    run_prepare(p, lay)
    small, meta = load_prepared(lay)
    big, meta48 = load_prepared(lay, 48)
    assert (meta["image_size"], meta["finetune_image_size"]) == (32, 48) and meta48 == meta
    assert small["test"].images.shape == (14, 32, 32, 3) and big["test"].images.shape == (14, 48, 48, 3)
    assert np.array_equal(small["val"].images, resize_u8(raw["val_images"], 32))
    assert np.array_equal(big["val"].images, resize_u8(raw["val_images"], 48))
    assert np.array_equal(big["train"].labels, small["train"].labels)
    with pytest.raises(StaleStageError, match=r"prepared at 32 px, not at 64 px; run `medssl prepare`"):
        load_prepared(lay, 64)
    # a fine-tune state (and the checkpoint's config digest) is keyed on the size it trains at, not only on the data
    from medssl.resume import inputs_key

    at32 = load_params("params.yaml", {"budgets.demo.finetune_image_size": 32}, tuned=False)
    assert [inputs_key(q, "finetune", "imagenet", meta, lay)["image_size"] for q in (at32, p)] == [32, 48]
