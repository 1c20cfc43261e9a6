"""Figures of one run: its per-epoch curves (train and val overlaid) and its confusion matrix."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator


def curves_figure(curves: list[dict], title: str, metric: str = "balanced_accuracy") -> Figure:
    """Per-epoch rows (or pretraining's per-window rows, by `step`) -> one figure. Classifier rows (train_*, val_*, gap_*): loss and `metric` with train and val
    overlaid, and the train - val gaps. Other rows (pretraining: loss and its parts): one panel per value."""
    x = "step" if curves and "step" in curves[0] else "epoch"  # pretraining traces: by optimizer step
    ep = [c[x] for c in curves]
    if curves and f"val_{metric}" in curves[0]:
        fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
        for ax, key in zip(axes[:2], ("loss", metric)):
            ax.plot(ep, [c[f"train_{key}"] for c in curves], "o-", label="train (eval mode)")
            ax.plot(ep, [c[f"val_{key}"] for c in curves], "o-", label="val")
            ax.set(xlabel="epoch", title=key)
            ax.legend()
        for key in (k for k in curves[0] if k.startswith("gap_")):
            axes[2].plot(ep, [c[key] for c in curves], "o-", label=key.removeprefix("gap_"))
        axes[2].axhline(0, color="grey", lw=0.8)
        axes[2].set(xlabel="epoch", title="train - val gap")
        axes[2].legend(fontsize=8)
    else:
        keys = [k for k in (curves[0] if curves else {}) if k not in ("epoch", "step")]
        fig, axes = plt.subplots(1, max(len(keys), 1), figsize=(4 * max(len(keys), 1), 3.4), squeeze=False)
        for ax, key in zip(axes[0], keys):
            ax.plot(ep, [c[key] for c in curves], "o-" if len(curves) <= 12 else "-")
            ax.set(xlabel="optimizer step" if x == "step" else x, title=key)
    for ax in fig.axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(title)
    # fixed margins: tight_layout draws the figure once more only to measure it (a third of the figure's time,
    # paid by every grid cell)
    fig.subplots_adjust(left=0.055, right=0.99, bottom=0.14, top=0.83, wspace=0.22)
    return fig


def save(fig: Figure, path: Path, dpi: int = 100) -> None:
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def confusion_figure(cm: np.ndarray, classes: list[str], title: str) -> Figure:
    fig, ax = plt.subplots(figsize=(5, 4.5))
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(classes)):
        for j in range(len(classes)):
            ax.text(j, i, cm[i, j], ha="center", va="center", fontsize=8, color="white" if norm[i, j] > 0.5 else "black")
    ax.set(xticks=range(len(classes)), yticks=range(len(classes)), xticklabels=classes, yticklabels=classes,
           xlabel="predicted", ylabel="true", title=title)
    fig.tight_layout()
    return fig
