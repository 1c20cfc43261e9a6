"""Paired comparison of two inits scored on the same test images, as in the grid: the same label subsets per
seed, so differences pair over seeds; the test images are a sample too, so they are bootstrapped.

    boot = Bootstrap(y_test, n_boot=2000, seed=0)        # one stratified resample set for every comparison
    a = boot.replicates(probas_a)  # probas_a: (S, N, C), seeds in the same order as for b -> {metric: (S, B)}
    d = paired_difference(a, boot.replicates(probas_b), "balanced_accuracy", seed=0)
    # {"diff": mean over seeds on the full test set, "lo", "hi": 95 % percentile interval, "p": two-sided}
    holm([d1["p"], d2["p"], ...])                        # Holm-adjusted p values of one family
    boot.interval(proba)         # one model's (N, C) -> {metric: (lo, hi)}: its own 95 % interval, no pairing

Each bootstrap replicate resamples test images within each class (class counts kept) and seeds with
replacement (a hierarchical bootstrap: image sampling and training randomness). Pure numpy.
"""
from __future__ import annotations

import math

import numpy as np

from medssl.metrics import over_present


def stratified_counts(y: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """(n_boot, N) resampling counts: within each class, as many draws with replacement as it has images."""
    rng = np.random.default_rng(seed)
    w = np.zeros((n_boot, len(y)), np.float32)
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        w[:, idx] = rng.multinomial(len(idx), np.full(len(idx), 1 / len(idx)), size=n_boot)
    return w


def weighted_accuracy(w: np.ndarray, y: np.ndarray, proba: np.ndarray) -> np.ndarray:
    """Accuracy under each row of weights w (B, N) -> (B,)."""
    return (w @ (proba.argmax(1) == y).astype(np.float32)) / w.sum(1)


def weighted_balanced_accuracy(w: np.ndarray, y: np.ndarray, proba: np.ndarray) -> np.ndarray:
    """Balanced accuracy (mean recall over the classes present in y) under each row of weights w (B, N) -> (B,)."""
    correct = (proba.argmax(1) == y).astype(np.float32)
    recalls = [(w[:, y == c] @ correct[y == c]) / w[:, y == c].sum(1) for c in np.unique(y)]
    return np.mean(recalls, 0)


def weighted_auc(w: np.ndarray, positive: np.ndarray, score: np.ndarray) -> np.ndarray:
    """ROC AUC of `score` for the binary labels `positive` under each row of weights w (B, N) -> (B,).

    Rank form: each positive earns the weight of the negatives scored below it, and half of those tied with it
    (cumulative negative weight in score order, read where each positive would be inserted)."""
    neg = np.flatnonzero(~positive)
    neg = neg[np.argsort(score[neg], kind="stable")]
    cum = np.zeros((len(w), len(neg) + 1), np.float32)  # exact: weights are resampling counts (< 2**24)
    np.cumsum(w[:, neg], axis=1, out=cum[:, 1:])
    s_pos, s_neg = score[positive], score[neg]
    left, right = np.searchsorted(s_neg, s_pos, "left"), np.searchsorted(s_neg, s_pos, "right")
    credit = cum[:, left] + 0.5 * (cum[:, right] - cum[:, left])
    w_pos = w[:, positive]
    return (w_pos * credit).sum(1, dtype=np.float64) / (w_pos.sum(1, dtype=np.float64) * cum[:, -1])


def weighted_auc_macro(w: np.ndarray, y: np.ndarray, proba: np.ndarray) -> np.ndarray:
    """One-vs-rest macro AUC over the classes present in y, on probabilities renormalised over those classes, under
    each row of w (B, N) -> (B,). As metrics.classification_metrics: with two classes, the AUC of the second's column
    (the other column's ranks can differ from its reverse where float32 rounds one side to 1.0)."""
    present = np.unique(y)
    p = over_present(present, proba)
    if len(present) == 2:
        return weighted_auc(w, y == present[1], p[:, 1])
    return np.mean([weighted_auc(w, y == c, p[:, j]) for j, c in enumerate(present)], 0)


WEIGHTED = {"accuracy": weighted_accuracy, "balanced_accuracy": weighted_balanced_accuracy, "auc_macro": weighted_auc_macro}
PAIRED = ("balanced_accuracy", "auc_macro")  # what the comparison pairs; all of WEIGHTED get the champion's interval


class Bootstrap:
    """One set of stratified resamples of a test split, shared by every comparison on it (so they pair)."""

    def __init__(self, y: np.ndarray, n_boot: int = 2000, seed: int = 0):
        self.y = np.asarray(y)
        self.w = stratified_counts(self.y, n_boot, seed)
        self.ones = np.ones((1, len(self.y)), np.float32)

    def replicates(self, probas: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """probas (S, N, C) of S seeds -> metric -> (values on the full split (S,), replicates (S, B))."""
        out = {}
        for metric in PAIRED:
            fn = WEIGHTED[metric]
            full = np.array([fn(self.ones, self.y, p)[0] for p in probas])
            out[metric] = full, np.stack([fn(self.w, self.y, p) for p in probas])
        return out

    def interval(self, proba: np.ndarray) -> dict[str, tuple[float, float]]:
        """One model's (N, C) probabilities -> metric -> its 95 % percentile interval over the resamples, for
        accuracy, balanced accuracy and macro AUC (what the test images' sampling alone leaves uncertain)."""
        return {m: tuple(float(v) for v in np.percentile(fn(self.w, self.y, proba), [2.5, 97.5])) for m, fn in WEIGHTED.items()}


def paired_difference(a: dict, b: dict, metric: str, seed: int = 0) -> dict:
    """a - b in `metric`, from Bootstrap.replicates of two inits (same seeds, same order, same Bootstrap).

    diff: mean over seeds of the per-seed difference on the full split. Replicate r: the mean difference over
    seeds drawn with replacement, each on image resample r. lo, hi: 2.5 and 97.5 percentiles; p: two-sided
    p value of "no difference" from the bootstrap standard error (normal approximation: unlike a count of
    resamples beyond zero, it can fall below 1/n_boot, which a Holm correction over a hundred comparisons needs)."""
    (fa, ra), (fb, rb) = a[metric], b[metric]
    if ra.shape != rb.shape:
        raise ValueError(f"unpaired comparison: {ra.shape} vs {rb.shape} (seeds x resamples)")
    d = ra - rb                                                      # (S, B)
    n_seeds, n_boot = d.shape
    pick = np.random.default_rng(seed).integers(0, n_seeds, (n_boot, n_seeds))
    reps = d[pick, np.arange(n_boot)[:, None]].mean(1)              # (B,)
    lo, hi = np.percentile(reps, [2.5, 97.5])
    diff, se = float((fa - fb).mean()), float(reps.std(ddof=1))
    p = math.erfc(abs(diff) / se / math.sqrt(2)) if se > 0 else float(diff == 0)
    return {"diff": diff, "lo": float(lo), "hi": float(hi), "se": se, "p": float(p)}


def holm(p_values) -> np.ndarray:
    """Holm-Bonferroni adjusted p values (step-down; family-wise error rate)."""
    p = np.asarray(p_values, float)
    m = len(p)
    if m == 0:
        return p
    order = np.argsort(p, kind="stable")
    adjusted = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * p[order]))
    out = np.empty(m)
    out[order] = adjusted
    return out
