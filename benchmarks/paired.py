"""`python -m benchmarks.paired`: time of the evaluate stage's paired statistics at the full budget's size.

The full grid: 7 inits x 3 protocols x (6 fractions + 2 imbalance ratios) x 3 seeds + 2 fusion groups x 6
fractions x 3 seeds = 540 cells, each with class probabilities for DermaMNIST's 2,005 test images; every
init compared with ImageNet and random in balanced accuracy and macro AUC over 2,000 stratified bootstrap
resamples (medssl.compare.comparisons, the code `evaluate` runs). Random probabilities: only sizes matter.
Runs where only numpy and scipy exist (PYTHONPATH=src on a bare host).
Writes benchmarks/results/paired_cpu_<date>.{json,md} (numpy runs on the CPU on any host).
"""
from __future__ import annotations

import datetime as dt
import json
import os
import time

import numpy as np

from benchmarks.index import write_index
from benchmarks.serve import ROOT, cpu_model
from medssl.compare import N_BOOT, comparisons

INITS = ["random", "imagenet", "vae", "simclr", "mim", "imagenet-simclr", "imagenet-mim"]
FRACTIONS = [0.01, 0.05, 0.1, 0.25, 0.5, 1.0]
FUSION = ["imagenet+simclr", "vae+simclr+mim"]


def full_size_probas(n: int = 2005, classes: int = 7, seed: int = 0) -> tuple[dict, np.ndarray]:
    rng = np.random.default_rng(seed)

    def draw():
        p = rng.random((n, classes), dtype=np.float32)
        return p / p.sum(1, keepdims=True)

    probas = {}
    for init in INITS:
        for protocol in ("linear", "finetune", "knn"):
            for regime, fractions in (("fractions", FRACTIONS), ("imbalance:1", [1.0]), ("imbalance:10", [1.0])):
                for f in fractions:
                    for s in (0, 1, 2):
                        probas[(init, protocol, regime, f, s, "test")] = draw()
    for group in FUSION:
        for f in FRACTIONS:
            for s in (0, 1, 2):
                probas[(group, "linear", "fusion", f, s, "test")] = draw()
    return probas, rng.integers(0, classes, n)


def main() -> None:
    probas, y = full_size_probas()
    t0 = time.perf_counter()
    rows = comparisons(probas, {"test": y}, [0, 1, 2], ["random", "imagenet"], INITS[2:], FUSION, 42)
    seconds = time.perf_counter() - t0
    res = {"date": dt.date.today().isoformat(), "cpu": cpu_model(), "cores": len(os.sched_getaffinity(0)),
           "cells": len(probas), "test_images": len(y), "resamples": N_BOOT, "comparison_rows": len(rows),
           "seconds": round(seconds, 1)}
    stem = ROOT / "benchmarks/results" / f"paired_cpu_{res['date']}"
    stem.with_suffix(".json").write_text(json.dumps(res, indent=2) + "\n")
    stem.with_suffix(".md").write_text(
        f"# Paired statistics at the full budget's size ({res['date']})\n\n{res['cpu']}, {res['cores']} cores.\n\n"
        f"{res['cells']} cells x {res['test_images']} test images, {res['resamples']} stratified resamples, "
        f"{res['comparison_rows']} comparison rows (balanced accuracy and macro AUC vs ImageNet and random): "
        f"**{res['seconds']} s**.\n")
    write_index(stem.parent)
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
