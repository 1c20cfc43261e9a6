import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from medssl.metrics import binary_auc, classification_metrics, confusion, overfitting_gap


def onehot(pred, c):
    p = np.full((len(pred), c), 0.1 / (c - 1))
    p[np.arange(len(pred)), pred] = 0.9
    return p


def test_perfect_predictions():
    y = np.array([0, 1, 2, 0, 1, 2])
    m = classification_metrics(y, onehot(y, 3))
    for k in ("accuracy", "balanced_accuracy", "kappa", "f1_macro", "auc_macro"):
        assert m[k] == pytest.approx(1.0)
    assert m["loss"] == pytest.approx(-np.log(0.9))


def test_known_binary_case():
    # y: two of each class, one error on class 0 -> acc .75, recalls .5 / 1
    y = np.array([0, 0, 1, 1])
    m = classification_metrics(y, onehot(np.array([0, 1, 1, 1]), 2), ["a", "b"])
    assert m["accuracy"] == pytest.approx(0.75)
    assert m["balanced_accuracy"] == pytest.approx(0.75)
    assert m["kappa"] == pytest.approx(0.5)  # po=.75, pe=.5*.25+.5*.75=.5
    assert m["recall_a"] == pytest.approx(0.5) and m["recall_b"] == pytest.approx(1.0)
    assert m["f1_macro"] == pytest.approx((2 / 3 + 0.8) / 2)


def test_imbalance_balanced_accuracy_vs_accuracy():
    # always predicting the majority class: accuracy .9, balanced accuracy 1/2
    y = np.array([0] * 9 + [1])
    m = classification_metrics(y, onehot(np.zeros(10, int), 2))
    assert m["accuracy"] == pytest.approx(0.9) and m["balanced_accuracy"] == pytest.approx(0.5)
    assert m["kappa"] == pytest.approx(0.0)


def test_macro_auc_matches_one_vs_rest_mean():
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 20)
    p = rng.dirichlet(np.ones(3), 60) + np.eye(3)[y] * 0.3
    p /= p.sum(1, keepdims=True)
    expected = np.mean([roc_auc_score(y == k, p[:, k]) for k in range(3)])
    assert classification_metrics(y, p)["auc_macro"] == pytest.approx(expected)


def test_macro_auc_counts_a_knns_tied_zero_votes_one_half():
    """A k-NN's probabilities hold many exact zeros (no neighbour of that class), in float32 rows whose sums miss 1
    by a bit. Macro AUC, as a cell scores it (core.train.scores) and as the paired bootstrap does, counts those
    ties one half, as scikit-learn; breaking them by rounding noise moved a cell's AUC by 0.04."""
    import torch

    from medssl.core.paired import weighted_auc_macro
    from medssl.core.probes import knn_probe
    from medssl.core.train import scores

    g = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 16, generator=g)
    train_y, eval_y = torch.arange(400) % 4, torch.arange(300) % 4
    feats = lambda y: centers[y] + 1.5 * torch.randn(len(y), 16, generator=g)
    p = knn_probe(feats(train_y), train_y, feats(eval_y), 4, k=5)
    y, pn = eval_y.numpy(), p.numpy()
    assert (pn == 0).mean() > 0.3 and np.abs(pn.astype(np.float64).sum(1) - 1).max() > 0  # ties, inexact sums
    expected = np.mean([roc_auc_score(y == c, pn[:, c]) for c in range(4)])
    assert scores(y, p, list("abcd"))["auc_macro"] == pytest.approx(expected, abs=1e-12)
    assert weighted_auc_macro(np.ones((1, len(y))), y, pn)[0] == pytest.approx(expected, abs=1e-6)


def saturated(y: np.ndarray, classes: int, seed: int):
    """float32 softmax probabilities of a confident model: many rows round to exactly 1.0 in their top class while
    the other classes keep tiny, distinct masses (rows summing to 1 only in float32)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    logits = 30 * torch.randn(len(y), classes, generator=g) + 25 * torch.nn.functional.one_hot(torch.as_tensor(y), classes)
    return logits.softmax(1)


def test_macro_auc_counts_a_saturated_softmaxs_ties_one_half():
    """Rows tied at 1.0 in float32 stay tied: scored as a cell scores them (core.train.scores), as the ONNX check
    and the paired bootstrap do, macro AUC is scikit-learn's on the same probabilities."""
    from medssl.core.paired import weighted_auc_macro
    from medssl.core.train import scores

    y = np.arange(400) % 4
    p = saturated(y, 4, 0)
    pn = p.numpy()
    assert (pn == 1).sum(0).max() > 20 and (pn.astype(np.float64).sum(1) != 1).any()  # ties at 1.0, inexact sums
    expected = np.mean([roc_auc_score(y == c, pn[:, c]) for c in range(4)])
    assert scores(y, p, list("abcd"))["auc_macro"] == pytest.approx(expected, abs=1e-12)
    assert weighted_auc_macro(np.ones((1, len(y))), y, pn)[0] == pytest.approx(expected, abs=1e-9)


def test_auc_skips_absent_class():
    y = np.array([0, 0, 1, 1])  # class 2 absent
    p = np.array([[0.8, 0.1, 0.1], [0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.3, 0.6, 0.1]])
    m = classification_metrics(y, p)
    assert m["auc_classes"] == 2 and m["auc_macro"] == pytest.approx(1.0)


def test_confusion_and_gap():
    y = np.array([0, 1, 1, 2])
    cm = confusion(y, onehot(np.array([0, 2, 1, 2]), 3))
    assert cm.tolist() == [[1, 0, 0], [0, 1, 1], [0, 0, 1]]
    gap = overfitting_gap({"loss": 0.3, "accuracy": 0.95, "balanced_accuracy": 0.9},
                          {"loss": 0.8, "accuracy": 0.75, "balanced_accuracy": 0.6})
    assert gap == pytest.approx({"gap_loss": -0.5, "gap_accuracy": 0.2, "gap_balanced_accuracy": 0.3})


def test_auc_is_finite_when_a_row_puts_all_mass_on_an_absent_class():
    y = np.array([0, 1, 2, 0, 1, 2])
    proba = np.eye(4)[[0, 1, 3, 0, 2, 2]]  # third row: all mass on class 3, absent from y
    m = classification_metrics(y, proba)
    shown = proba[:, :3].copy()
    shown[2] = 1 / 3  # renormalised over the classes present: uniform
    expected = np.mean([roc_auc_score(y == c, shown[:, c]) for c in range(3)])
    assert m["auc_macro"] == pytest.approx(expected) and m["auc_classes"] == 3


@pytest.mark.parametrize("seed, classes", [(0, 7), (1, 2), (2, 5)])
def test_every_metric_equals_scikit_learn(seed, classes):
    """The numpy metrics are scikit-learn's definitions, on random imbalanced data with ties and absent predictions."""
    from sklearn import metrics as skm

    rng = np.random.default_rng(seed)
    y = rng.choice(classes, 300, p=np.r_[0.6, np.full(classes - 1, 0.4 / (classes - 1))])
    p = rng.dirichlet(np.ones(classes) * 0.5, 300)
    pred, labels = p.argmax(1), np.arange(classes)
    m = classification_metrics(y, p)
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
    assert m["kappa"] == pytest.approx(skm.cohen_kappa_score(y, pred, labels=labels))
    assert m["kappa_quadratic"] == pytest.approx(skm.cohen_kappa_score(y, pred, labels=labels, weights="quadratic"))
    assert m["f1_macro"] == pytest.approx(skm.f1_score(y, pred, labels=labels, average="macro", zero_division=0))
    assert m["loss"] == pytest.approx(skm.log_loss(y, p, labels=labels))
    auc = skm.roc_auc_score(y, p[:, 1]) if classes == 2 else skm.roc_auc_score(y, p, multi_class="ovr", average="macro")
    assert m["auc_macro"] == pytest.approx(auc)
    recall = skm.recall_score(y, pred, labels=labels, average=None, zero_division=0)
    assert [m[f"recall_{i}"] for i in range(classes)] == pytest.approx(list(recall))
    ties = p[:, 0].round(1)  # many tied scores: each tie counts one half, as in roc_auc_score
    assert binary_auc(y == 0, ties) == pytest.approx(skm.roc_auc_score(y == 0, ties))
