"""Classification metrics (scikit-learn) and the train-val overfitting gap."""
from __future__ import annotations

import numpy as np
from sklearn import metrics as skm


def classification_metrics(y_true: np.ndarray, proba: np.ndarray, class_names: list[str] | None = None) -> dict:
    """y_true: (N,) int, proba: (N, C) rows summing to 1 -> flat dict of floats.

    Macro AUC is one-vs-rest over the classes present in y_true (it is undefined for a class
    without positives); `auc_classes` says how many entered the average.
    """
    num_classes = proba.shape[1]
    names = class_names or [str(i) for i in range(num_classes)]
    y_pred = proba.argmax(1)
    labels = np.arange(num_classes)
    eps = 1e-12
    out = {
        "accuracy": skm.accuracy_score(y_true, y_pred),
        "balanced_accuracy": skm.balanced_accuracy_score(y_true, y_pred),
        "kappa": skm.cohen_kappa_score(y_true, y_pred, labels=labels),
        "kappa_quadratic": skm.cohen_kappa_score(y_true, y_pred, labels=labels, weights="quadratic"),
        "ece": expected_calibration_error(y_true, proba),
        "f1_macro": skm.f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0),
        "loss": skm.log_loss(y_true, np.clip(proba, eps, 1), labels=labels),
    }
    present = np.unique(y_true)
    if len(present) >= 2:
        p = proba[:, present] + 1e-12  # a row with all its mass on absent classes becomes uniform, not NaN
        p = p / p.sum(1, keepdims=True)
        out["auc_macro"] = (
            skm.roc_auc_score(y_true, p[:, 1], average="macro")
            if len(present) == 2
            else skm.roc_auc_score(y_true, p, multi_class="ovr", average="macro", labels=present)
        )
    else:
        out["auc_macro"] = float("nan")
    out["auc_classes"] = int(len(present))
    recall = skm.recall_score(y_true, y_pred, labels=labels, average=None, zero_division=0)
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


def confusion(y_true: np.ndarray, proba: np.ndarray) -> np.ndarray:
    return skm.confusion_matrix(y_true, proba.argmax(1), labels=np.arange(proba.shape[1]))


def overfitting_gap(train: dict, val: dict, keys=("loss", "accuracy", "balanced_accuracy")) -> dict:
    """gap_<k> = train[k] - val[k]: positive accuracy gap / negative loss gap = overfitting."""
    return {f"gap_{k}": float(train[k] - val[k]) for k in keys if k in train and k in val}
