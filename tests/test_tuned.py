"""Fair tuning: the values `medssl tune` chose for an init reach that init's stages, and only those."""
import mlflow
import pytest
import yaml

from medssl.config import ConfigError, load_params
from medssl.finetune import run_finetune
from medssl.grid import run_grid
from medssl.pretrain import run_pretrain

from conftest import ROOT
from test_resume import prepared

TUNED = {"tuned": {
    "imagenet": {"finetune": {"lr": 2.5e-3, "weight_decay": 3e-3}},
    "vae": {"finetune": {"lr": 4e-4}, "pretrain": {"vae": {"beta": 0.3, "lr": 7e-4}}},
    "imagenet-simclr": {"finetune": {"lr": 6e-4}, "pretrain": {"simclr": {"temperature": 0.2}}},
}}
SMALL = {"data.image_size": 32, "inits.baselines": ["random", "imagenet"], "inits.ssl": ["vae", "imagenet-simclr"],
         "grid.fusion": [], "grid.protocols": ["finetune"], "grid.fractions": [1.0], "grid.imbalance": [],
         "budgets.demo.grid": {"epochs": 1, "max_train": None, "max_eval": None}, "budgets.demo.pretrain_epochs": 1,
         "budgets.demo.finetune_epochs": 1, "pretrain.vae.latent_dim": 16, "pretrain.batch_size": 16,
         "finetune.batch_size": 16, "mlflow.experiment": "tuned"}


@pytest.fixture
def params_dir(tmp_path):
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    (tmp_path / "tuned.yaml").write_text(yaml.safe_dump(TUNED))
    return tmp_path


def test_for_init_merges_only_that_inits_values(params_dir):
    p = load_params(params_dir / "params.yaml")
    assert p.for_init("imagenet").finetune.lr == 2.5e-3 and p.for_init("imagenet").finetune.weight_decay == 3e-3
    assert p.for_init("vae").finetune.lr == 4e-4 and p.for_init("vae").finetune.weight_decay == p.finetune.weight_decay
    assert p.for_init("vae").pretrain.vae.beta == 0.3 and p.for_init("imagenet").pretrain.vae.beta == p.pretrain.vae.beta
    assert p.for_init("imagenet-simclr").pretrain.simclr.temperature == 0.2
    assert p.for_init("simclr").pretrain.simclr.temperature == p.pretrain.simclr.temperature  # not tuned: params.yaml
    assert p.for_init("random") is p
    assert p.finetune.lr == 1e-3  # params.yaml's own value is untouched


@pytest.mark.parametrize("tuned,message", [
    ({"vae": {"finetune": {"lr": -1.0}}}, r"tuned\.vae\.finetune\.lr: Input should be greater than 0"),
    ({"vae": {"pretrain": {"simclr": {"lr": 1e-3}}}}, r"tuned\.vae\.pretrain may only hold 'vae' values"),
    ({"vae": {"finetune": {"lrr": 1e-3}}}, r"tuned\.vae\.finetune\.lrr: Extra inputs are not permitted"),
])
def test_bad_tuned_values_are_refused_naming_the_key(params_dir, tuned, message):
    (params_dir / "tuned.yaml").write_text(yaml.safe_dump({"tuned": tuned}))
    with pytest.raises(ConfigError, match=message):
        load_params(params_dir / "params.yaml")


def test_each_stage_trains_with_the_values_of_its_init(params_dir, tmp_path, monkeypatch):
    """pretrain, grid and finetune of each init log the values tuned for that init; an untuned init keeps
    params.yaml's."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.chdir(tmp_path)
    p = load_params(params_dir / "params.yaml", SMALL)
    lay = prepared(tmp_path / "run", p)
    for init in p.inits.ssl:
        run_pretrain(p, init, lay)
    for init in p.inits.all:
        run_grid(p, init, lay)
    run_finetune(p, "vae", lay)
    run_finetune(p, "random", lay)
    runs = {r.data.tags.get("medssl.run"): r for r in mlflow.search_runs(experiment_names=["tuned"], output_format="list")
            if "mlflow.parentRunId" not in r.data.tags}
    pv = runs["pretrain-vae"].data.params
    assert float(pv["beta"]) == 0.3 and float(pv["lr"]) == 7e-4
    ps = runs["pretrain-imagenet-simclr"].data.params
    assert float(ps["temperature"]) == 0.2 and ps["start"] == "imagenet" and float(ps["lr"]) == p.pretrain.simclr.lr
    expected = {"random": p.finetune.lr, "imagenet": 2.5e-3, "vae": 4e-4, "imagenet-simclr": 6e-4}
    for init, lr in expected.items():
        run = runs[f"grid-{init}"]
        assert float(run.data.params["finetune.lr"]) == lr and run.data.tags["tuned"] == str(init != "random")
    assert float(runs["grid-imagenet"].data.params["finetune.weight_decay"]) == 3e-3
    assert float(runs["finetune-vae"].data.params["lr"]) == 4e-4
    assert float(runs["finetune-random"].data.params["lr"]) == p.finetune.lr
