"""Classification metrics from one confusion matrix (numpy), and the train-val overfitting gap.

Same definitions as scikit-learn's accuracy_score, balanced_accuracy_score, cohen_kappa_score (plain and
quadratic), f1_score(average="macro", zero_division=0), recall_score, log_loss and roc_auc_score (one-vs-rest,
macro); tests/test_metrics.py checks each against scikit-learn. Computed here because scikit-learn's input
validation made them cost ~40 ms a call, and the grid scores every cell and epoch.
"""
from __future__ import annotations

import numpy as np

from medssl.metric_names import CURVE


def confusion(y_true: np.ndarray, proba: np.ndarray) -> np.ndarray:
    """(C, C) counts, rows = true class, columns = predicted (argmax) class."""
    k = proba.shape[1]
    return np.bincount(np.asarray(y_true) * k + proba.argmax(1), minlength=k * k).reshape(k, k)


def _kappa(cm: np.ndarray, weights: np.ndarray) -> float:
    n = cm.sum()
    expected = np.outer(cm.sum(1), cm.sum(0)) / n
    denom = (weights * expected).sum()
    return float(1 - (weights * cm).sum() / denom) if denom > 0 else 0.0


def _ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks, ties averaged (scipy.stats.rankdata's default)."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    starts = np.r_[0, np.flatnonzero(xs[1:] != xs[:-1]) + 1]
    ends = np.r_[starts[1:], len(x)]
    avg = (starts + ends + 1) / 2.0
    ranks = np.empty(len(x))
    ranks[order] = np.repeat(avg, ends - starts)
    return ranks


def binary_auc(positive: np.ndarray, score: np.ndarray) -> float:
    """ROC AUC as the Mann-Whitney statistic (ties count one half), = roc_auc_score."""
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    r = _ranks(score)
    return float((r[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def over_present(present: np.ndarray, proba: np.ndarray) -> np.ndarray:
    """proba (N, C) -> (N, len(present)): renormalised over the classes present in the labels, the scores macro AUC
    ranks (here and in the paired bootstrap, core.paired). With every class present it is proba itself: dividing by
    row sums that differ from 1 in the last bit would break the ties AUC counts one half (a k-NN's zero votes), by
    rounding noise. A row with all its mass on absent classes becomes uniform."""
    if len(present) == proba.shape[1]:
        return proba
    p = proba[:, present]
    total = p.sum(1, keepdims=True)
    return np.divide(p, total, out=np.full(p.shape, 1 / len(present), p.dtype), where=total > 0)


def classification_metrics(y_true: np.ndarray, proba: np.ndarray, class_names: list[str] | None = None) -> dict:
    """y_true: (N,) int, proba: (N, C) rows summing to 1 -> flat dict of floats.

    Macro AUC is one-vs-rest over the classes present in y_true (it is undefined for a class
    without positives); `auc_classes` says how many entered the average.
    """
    y_true = np.asarray(y_true).astype(np.int64)
    num_classes = proba.shape[1]
    names = class_names or [str(i) for i in range(num_classes)]
    cm = confusion(y_true, proba).astype(np.float64)
    support, predicted, hits = cm.sum(1), cm.sum(0), np.diag(cm)
    present = np.flatnonzero(support > 0)
    recall = np.divide(hits, support, out=np.zeros(num_classes), where=support > 0)
    precision = np.divide(hits, predicted, out=np.zeros(num_classes), where=predicted > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros(num_classes), where=precision + recall > 0)
    idx = np.arange(num_classes)
    eps = 1e-12
    p_true = np.clip(proba[np.arange(len(y_true)), y_true], eps, 1)
    out = {
        "accuracy": hits.sum() / cm.sum(),
        "balanced_accuracy": recall[present].mean(),
        "kappa": _kappa(cm, 1.0 - np.eye(num_classes)),
        "kappa_quadratic": _kappa(cm, (idx[:, None] - idx[None, :]) ** 2 / (num_classes - 1) ** 2),
        "ece": expected_calibration_error(y_true, proba),
        "f1_macro": f1.mean(),
        "loss": -np.log(p_true / np.clip(proba, eps, 1).sum(1)).mean(),
    }
    if len(present) >= 2:
        p = over_present(present, proba)
        if len(present) == 2:
            out["auc_macro"] = binary_auc(y_true == present[1], p[:, 1])
        else:
            out["auc_macro"] = float(np.mean([binary_auc(y_true == c, p[:, j]) for j, c in enumerate(present)]))
    else:
        out["auc_macro"] = float("nan")
    out["auc_classes"] = int(len(present))
    out.update({f"recall_{names[i]}": recall[i] for i in range(num_classes)})
    return {k: float(v) for k, v in out.items()}


def expected_calibration_error(y_true: np.ndarray, proba: np.ndarray, n_bins: int = 15) -> float:
    """Top-label ECE, equal-width confidence bins (right-closed, as torchmetrics' multiclass_calibration_error, l1).
    numpy only, so the compute core runs where torchmetrics is not installed."""
    conf, correct = proba.max(1), (proba.argmax(1) == y_true).astype(np.float64)
    bins = np.clip(np.searchsorted(np.linspace(0, 1, n_bins + 1), conf, side="left") - 1, 0, n_bins - 1)
    count = np.bincount(bins, minlength=n_bins)
    gap = np.abs(np.bincount(bins, correct, n_bins) - np.bincount(bins, conf, n_bins))
    return float(gap.sum() / max(len(y_true), 1)) if count.any() else 0.0


def task_metrics(m: dict, meta: dict) -> dict:
    """Binary tasks: the positive class's sensitivity and specificity (its recall and the other class's), from a
    metrics dict with per-class recalls; {} for other tasks. meta: the prepared data's (classes, task, positive)."""
    if meta.get("task") != "binary" or meta.get("positive") is None:
        return {}
    pos, neg = meta["classes"][meta["positive"]], meta["classes"][1 - meta["positive"]]
    return {"sensitivity": m[f"recall_{pos}"], "specificity": m[f"recall_{neg}"]}


def interval_keys(metric: str) -> tuple[str, str]:
    """Where a scores dict keeps the 95 % interval of `metric` (evaluate's test scores of the champion)."""
    return f"{metric}_ci_low", f"{metric}_ci_high"


def with_interval(m: dict, metric: str) -> str:
    """m[metric] to 4 decimals, then its 95 % interval to 3 when m carries one: "0.5945 [0.552, 0.639]"."""
    lo, hi = (m.get(k) for k in interval_keys(metric))
    return f"{m[metric]:.4f}" + (f" [{lo:.3f}, {hi:.3f}]" if lo is not None and hi is not None else "")


def overfitting_gap(train: dict, val: dict, keys=CURVE) -> dict:
    """gap_<k> = train[k] - val[k]: positive accuracy gap / negative loss gap = overfitting."""
    return {f"gap_{k}": float(train[k] - val[k]) for k in keys if k in train and k in val}
