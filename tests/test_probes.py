"""The torch probes against scikit-learn (the objective they replace), on CPU."""
import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import KNeighborsClassifier
from sklearn.preprocessing import StandardScaler

from medssl.core.probes import knn_probe, linear_probe


def _data(n=1200, d=64, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.choice(7, n, p=[0.05, 0.05, 0.1, 0.02, 0.1, 0.65, 0.03])
    centers = rng.normal(size=(7, d)) * 0.4
    x = (centers[y] + rng.normal(size=(n, d))).astype(np.float32)
    ev = (centers[rng.integers(0, 7, 400)] + rng.normal(size=(400, d))).astype(np.float32)
    return x, y, ev


@pytest.mark.parametrize("solver", ["torch", "sklearn"])
@pytest.mark.parametrize("class_weight, n, d", [("balanced", 1200, 64), ("none", 1200, 64), ("balanced", 300, 512)])
def test_linear_probe_matches_scikit_learn(class_weight, n, d, solver):
    """Same objective as LogisticRegression(C, class_weight) on standardised features: the torch solver (a GPU's)
    against a tightly converged scikit-learn fit, probabilities within 0.01 and the same predicted class for
    >= 99 % of rows, also with more features than rows (solved in the rows' span); the sklearn solver (a CPU's)
    is that pipeline at scikit-learn's default tolerance."""
    x, y, ev = _data(n, d)
    sc = StandardScaler().fit(x)
    tight = {"tol": 1e-8, "max_iter": 5000} if solver == "torch" else {"max_iter": 1000}
    ref = LogisticRegression(C=0.5, **tight, class_weight=None if class_weight == "none" else "balanced")
    ref = ref.fit(sc.transform(x), y).predict_proba(sc.transform(ev))
    got = linear_probe(torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(ev), 7, 0.5, class_weight, solver).numpy()
    got = got[:, np.unique(y)]  # scikit-learn has columns for the classes it saw only
    assert np.abs(got - ref).max() < (0.01 if solver == "torch" else 1e-4)
    assert (got.argmax(1) == ref.argmax(1)).mean() >= 0.99


@pytest.mark.parametrize("solver", ["torch", "sklearn"])
def test_linear_probe_leaves_absent_classes_at_zero(solver):
    x, y, ev = _data()
    keep = y != 3
    got = linear_probe(torch.from_numpy(x[keep]), torch.from_numpy(y[keep]), torch.from_numpy(ev), 7, 1.0, solver=solver).numpy()
    assert np.all(got[:, 3] == 0) and np.allclose(got.sum(1), 1, atol=1e-5)


def test_knn_probe_matches_scikit_learn():
    x, y, ev = _data(seed=1)
    ref = KNeighborsClassifier(20, metric="cosine", weights="distance").fit(x, y).predict_proba(ev)
    got = knn_probe(torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(ev), 7, 20).numpy()
    assert np.abs(got - ref).max() < 1e-4
