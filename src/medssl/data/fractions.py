"""Nested, stratified label fractions of a training split."""
from __future__ import annotations

import numpy as np


def nested_fractions(labels: np.ndarray, fractions: list[float], seed: int) -> dict[float, np.ndarray]:
    """fraction -> sorted indices into `labels`.

    One seeded permutation per class; fraction f keeps the first max(1, round(f * n_c)) of class c.
    So every class keeps at least one example and a smaller fraction is a subset of every larger one.
    labels: (N,) int.
    """
    bad = [f for f in fractions if not 0 < f <= 1]
    if bad:
        raise ValueError(f"label fractions must lie in (0, 1], got {bad}")
    rng = np.random.default_rng(seed)
    orders = {c: rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)}
    return {
        f: np.sort(np.concatenate([idx[: max(1, int(round(f * len(idx))))] for idx in orders.values()]))
        for f in sorted(fractions)
    }
