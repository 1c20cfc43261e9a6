"""SimCLR and MIM parts, nested label fractions and the frozen-feature probes."""
import numpy as np
import pytest
import torch

from medssl.config import load_params
from medssl.data.fractions import nested_fractions
from medssl.models.backbones import build_backbone
from medssl.models.mim import masked_mse, random_patch_mask
from medssl.models.simclr import nt_xent, random_view
from medssl.core.probes import knn_probe, linear_probe

from conftest import ROOT, project_copy


def test_nt_xent_prefers_matching_views():
    z = torch.nn.functional.normalize(torch.randn(8, 16), dim=1)
    other = torch.nn.functional.normalize(torch.randn(8, 16), dim=1)
    assert nt_xent(z, z, 0.2) < nt_xent(z, other, 0.2)


def test_patch_mask_ratio_and_masked_loss_ignores_visible_pixels():
    m = random_patch_mask(4, 64, 8, 0.6, torch.Generator().manual_seed(0))
    assert m.shape == (4, 1, 64, 64) and torch.allclose(m.mean((1, 2, 3)), torch.full((4,), 38 / 64))
    x = torch.rand(4, 3, 64, 64)
    assert masked_mse(x + 5 * (1 - m), x, m).item() == pytest.approx(0.0)


def test_random_view_shapes_and_range():
    x = torch.rand(5, 3, 64, 64)
    c = load_params(ROOT / "params.yaml").pretrain.simclr
    v = random_view(x, torch.Generator().manual_seed(0), (c.min_scale, 1.0), c.jitter, c.grayscale)
    assert v.shape == x.shape and 0 <= v.min() and v.max() <= 1 and not torch.allclose(v, x)


def test_nested_fractions_are_nested_stratified_and_keep_every_class():
    y = np.repeat(np.arange(7), [228, 359, 769, 80, 779, 4693, 99])
    fr = nested_fractions(y, [0.01, 0.05, 0.1, 0.25, 0.5, 1.0], seed=3)
    keys = sorted(fr)
    for small, large in zip(keys, keys[1:]):
        assert set(fr[small]) <= set(fr[large])
    assert all(np.bincount(y[idx], minlength=7).min() >= 1 for idx in fr.values())
    assert len(fr[1.0]) == len(y) and abs(len(fr[0.1]) - 700) <= 7
    assert np.array_equal(nested_fractions(y, [0.1], seed=3)[0.1], fr[0.1])  # seeded


# Budget of the SSL checks: the unlabelled train images at 32 px. MIM needs 10 epochs of batch 256 (~275 steps;
# 5 epochs of batch 128 left its encoder below random). SimCLR, whose step costs two views, gets 8 epochs of batch
# 128 (~440 steps): at 5 its linear probe's balanced accuracy depended on the CPU's vector unit (0.3145 with AVX2,
# 0.2962 with AVX-512, against the random draws' 0.2963); at 8: 0.3213 and 0.3107 (AUC 0.759, 0.767 vs 0.720), and
# with the probe's padded weights (8203555) 0.3147 and 0.3136 (AUC 0.761, 0.767; MIM 0.3235, 0.3187 vs 0.2961).
SSL_STEPS = {"simclr": {"budgets.demo.pretrain_epochs": 8, "pretrain.batch_size": 128}, "mim": {}}
SSL_CHECK = {"data.max_train": None, "data.max_eval": None, "data.image_size": 32, "budgets.demo.pretrain_epochs": 10,
             "pretrain.batch_size": 256, "inits.ssl": ["simclr", "mim"], "grid.fusion": [], "pretrain.mim.patch": 4,
             "mlflow.experiment": "ssl-check"}


@pytest.fixture(scope="module")
def ssl_project(tmp_path_factory, dermamnist):
    """Prepared real DermaMNIST (all 7,007 train images) and the linear probe of the random encoder of
    each grid seed (the draws the grid's random row averages)."""
    from medssl.data.prepare import load_prepared, run_prepare
    from medssl.data.sources import fetch

    work = project_copy(tmp_path_factory.mktemp("ssl") / "p", **SSL_CHECK)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(work)
        mp.setenv("MEDSSL_DATA_PATH", str(dermamnist))
        p = load_params("params.yaml")
        fetch(p.data.path)
        run_prepare(p)
        prepared = load_prepared()
        yield work, p, prepared, [_linear_probe_at_full_labels(p, prepared, "random", seed) for seed in p.grid.seeds]


def _linear_probe_at_full_labels(p, prepared, init: str, seed: int) -> dict:
    """The grid's linear protocol at 100 % labels: the init's frozen encoder, built as the grid builds it,
    logistic regression (grid.linear_c, grid.linear_class_weight) on every train label, scored on the test split."""
    from medssl.core.engine import extract_features
    from medssl.core.train import scores
    from medssl.grid import frozen_encoder

    splits, meta = prepared
    backbone = frozen_encoder(p, init, meta, torch.device("cpu"), seed)
    feats = {s: extract_features(backbone, torch.from_numpy(splits[s].images)) for s in ("train", "test")}
    proba = linear_probe(feats["train"], torch.from_numpy(splits["train"].labels.astype(np.int64)), feats["test"],
                         len(meta["classes"]), p.grid.linear_c, p.grid.linear_class_weight,
                         solver="torch")  # the solver these margins were measured with (test_probes checks both)
    return scores(splits["test"].labels, proba, meta["classes"])


@pytest.mark.slow
@pytest.mark.parametrize("method", ["simclr", "mim"])
def test_ssl_objective_decreases_and_encoder_beats_random_under_linear_probe(method, ssl_project, monkeypatch):
    import mlflow

    from medssl.layout import Layout
    from medssl.pretrain import run_pretrain

    work, p, prepared, random_scores = ssl_project
    monkeypatch.chdir(work)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{work}/mlflow.db")
    p = load_params("params.yaml", overrides=SSL_STEPS[method])
    s = run_pretrain(p, method, Layout(work))
    assert s["loss"] < 0.97 * s["first_loss"], s
    ckpt = torch.load(Layout(work).encoder(method), weights_only=True)
    backbone, _ = build_backbone(p.model.backbone)
    backbone.load_state_dict(ckpt["state_dict"])  # the encoder drops into the classifier's backbone
    run = mlflow.get_run(s["run_id"])
    images = [a.path for a in mlflow.MlflowClient().list_artifacts(s["run_id"], method)]
    assert run.info.status == "FINISHED" and len(images) == p.run_budget.pretrain_epochs  # one diagnostic image per epoch

    ssl_scores = _linear_probe_at_full_labels(p, prepared, method, p.seed)
    # the report's two metrics, against the mean of the random draws the grid's random row averages
    random_mean = {k: float(np.mean([r[k] for r in random_scores])) for k in ("balanced_accuracy", "auc_macro", "accuracy")}
    print(f"{method}: pretrain {s['seconds']} s, loss {s['first_loss']:.3f} -> {s['loss']:.3f}")
    for k in random_mean:
        draws = ", ".join(f"{r[k]:.4f}" for r in random_scores)
        print(f"  linear probe, test {k}: {method} {ssl_scores[k]:.4f}  random {random_mean[k]:.4f} (seeds {p.grid.seeds}: {draws})")
    assert ssl_scores["balanced_accuracy"] > random_mean["balanced_accuracy"]
    assert ssl_scores["auc_macro"] > random_mean["auc_macro"] + 0.01


def test_knn_probe_on_separable_features():
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(3, 8)) * 5
    y = np.repeat(np.arange(3), 30)
    x = centers[y] + rng.normal(size=(90, 8))
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a))
    proba = knn_probe(t(x[::2]), t(y[::2]), t(x[1::2]), 4, k=5).numpy()
    assert proba.shape == (45, 4) and (proba.argmax(1) == y[1::2]).mean() > 0.95 and np.all(proba[:, 3] == 0)
    # cosine ignores scale, down to the ~1e-10 float32 features of a random encoder in eval mode
    tiny = (1e-10 * x).astype(np.float32)
    assert np.allclose(knn_probe(t(tiny[::2]), t(y[::2]), t(tiny[1::2]), 4, k=5).numpy(), proba, atol=1e-5)


def test_class_balanced_linear_probe_raises_minority_recall_and_balanced_accuracy():
    from sklearn.metrics import balanced_accuracy_score, recall_score
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], [900, 100])  # 9:1, overlapping classes
    x = rng.normal(size=(1000, 4)) + 1.2 * y[:, None]
    ty = np.repeat([0, 1], [500, 500])
    tx = rng.normal(size=(1000, 4)) + 1.2 * ty[:, None]
    t = torch.from_numpy
    pred = {w: linear_probe(t(x).float(), t(y), t(tx).float(), 2, 1.0, w).argmax(1).numpy() for w in ("none", "balanced")}
    assert recall_score(ty, pred["balanced"]) > recall_score(ty, pred["none"]) + 0.2
    assert balanced_accuracy_score(ty, pred["balanced"]) > balanced_accuracy_score(ty, pred["none"])
