"""Stage `grid@<init>`: the comparison cells of one init.

For every seed in grid.seeds and label fraction in grid.fractions (nested, stratified subsets of
the labelled pool), three protocols with the same budget for every init:
  linear    logistic regression on the frozen encoder's pooled features
  knn       cosine k-NN on the same features
  finetune  the whole classifier trained from the init (finetune.* hyperparameters, grid epochs)
plus the regimes: imbalance (classes capped to a largest/smallest ratio, at 100 % labels) and
domain shift (every cell also scored on a second source's test split when grid.shift is set).
Selection (best fine-tune epoch) is on validation; test and shift are only scored.
Encoders are pretrained once per init; seeds vary the label subset and the head/fine-tune run, and
for the random init also the encoder itself (each seed probes the draw it fine-tunes).
"""
from __future__ import annotations

import time
from pathlib import Path

import mlflow
import numpy as np
import torch
from tqdm import tqdm

from medssl import tracking
from medssl.config import Params
from medssl.data.fractions import nested_fractions
from medssl.data.prepare import load_prepared, resize_u8, stratified_subset
from medssl.data.sources import Split
from medssl.device import pick_device, prepare_model, seed_everything
from medssl.engine import predict_proba
from medssl.finetune import build_classifier, fit
from medssl.models.classifier import Classifier
from medssl.io import save_npz, write_csv, write_json
from medssl.metrics import classification_metrics
from medssl.probe import extract_features, knn_probe, linear_probe

SCORED = ("accuracy", "balanced_accuracy", "auc_macro", "kappa", "kappa_quadratic", "f1_macro", "ece")


def cells_path(init: str, root: Path = Path(".")) -> Path:
    return root / f"metrics/grid/{init}.json"


def features_path(init: str, root: Path = Path(".")) -> Path:
    return root / f"models/grid/{init}/features.npz"


def capped_imbalance(labels: np.ndarray, ratio: float, seed: int) -> np.ndarray:
    """Indices keeping at most ceil(ratio * n_min) random examples per class (n_min: the smallest class),
    so the largest/smallest class count is at most `ratio`; ratio 1 balances the classes. Sorted."""
    rng = np.random.default_rng(seed)
    counts = {c: np.flatnonzero(labels == c) for c in np.unique(labels)}
    cap = int(np.ceil(ratio * min(len(v) for v in counts.values())))
    return np.sort(np.concatenate([rng.permutation(v)[:cap] for v in counts.values()]))


def load_shift(p: Params) -> Split | None:
    """The test split of the second source (split by lesion_id), resized like the prepared data."""
    if p.grid.shift is None:
        return None
    from medssl.data.folder import load_folder

    splits, _ = load_folder(p.grid.shift.images, p.grid.shift.csv, size=p.data.image_size, seed=p.seed)
    test = splits["test"]
    return Split(resize_u8(test.images, p.data.image_size), test.labels)


def grid_data(p: Params) -> tuple[dict[str, Split], dict]:
    """Labelled pool (train, capped by the budget) and the val/test subsets every cell is scored on."""
    splits, meta = load_prepared()
    b, seed = p.epochs.grid, p.seed
    data = {"pool": stratified_subset(splits["train"], b.max_train, seed),
            "val": stratified_subset(splits["val"], b.max_eval, seed),
            "test": stratified_subset(splits["test"], b.max_eval, seed)}
    shift = load_shift(p)
    if shift is not None:
        data["shift"] = shift
    return data, meta


def encoder_seed(p: Params, init: str, seed: int) -> int:
    """Seed of the frozen encoder a cell of `seed` probes: the random init is one draw per grid seed (as in
    its fine-tune cells); every other init loads fixed weights, so one encoder (p.seed) serves all seeds.
    Its features are `<split>_x_s<encoder seed>` in features.npz."""
    return seed if init == "random" else p.seed


def frozen_encoder(p: Params, init: str, num_classes: int, device, seed: int, root: Path = Path(".")) -> torch.nn.Module:
    """The backbone the frozen-feature protocols probe, built after seed_everything(seed) like fit() builds it."""
    seed_everything(seed)
    return prepare_model(build_classifier(p, init, num_classes, root).backbone, device)



def _kept(m: dict) -> dict:
    return {k: v for k, v in m.items() if k in SCORED or k.startswith("recall_")}


def probe_scores(head, train_x: np.ndarray, labels: dict[str, np.ndarray], feats: dict[str, np.ndarray],
                 scored: list[str], classes: list[str]) -> dict:
    """Fit a frozen-feature head once (`head(eval_x) -> proba`, trained on train_x) and score it on its own
    training rows (for the gap) and on every scored split. labels: split -> y, with "train"."""
    order = ("train", *scored)
    proba = head(np.concatenate([train_x, *(feats[s] for s in scored)]))
    parts = np.split(proba, np.cumsum([len(labels[s]) for s in order])[:-1])
    return {s: _kept(classification_metrics(labels[s], part, classes)) for s, part in zip(order, parts)}


def make_cell(init, protocol, regime, fraction, seed, idx, scores, **extra) -> dict:
    gap = {k: scores["train"][k] - scores["val"][k] for k in ("accuracy", "balanced_accuracy")}
    return {"init": init, "protocol": protocol, "regime": regime, "fraction": fraction, "seed": seed,
            "n_train": int(len(idx)), **{s: scores[s] for s in scores if s != "train"},
            "train": scores["train"], "gap_accuracy": gap["accuracy"], "gap_balanced_accuracy": gap["balanced_accuracy"],
            **extra}


def run_grid(p: Params, init: str, root: Path = Path("."), parent: str | None = None) -> dict:
    """All cells of `init`; writes metrics/grid/<init>.json, its fine-tune curves and frozen features."""
    g, b = p.grid, p.epochs.grid
    device = pick_device()
    data, meta = grid_data(p)
    classes, nc = meta["classes"], len(meta["classes"])
    mean, std = (torch.tensor(meta[k], device=device) for k in ("mean", "std"))
    x = {s: torch.from_numpy(v.images).to(device) for s, v in data.items()}
    y = {s: v.labels for s, v in data.items()}
    scored = [s for s in data if s != "pool"]  # val, test (, shift)

    tags = {**tracking.base_tags(p, meta["raw_md5"]), "stage": "grid", "init": init, "method": init}
    params = {"init": init, **g.model_dump(exclude={"shift", "fusion"}), **b.model_dump(), "shift": bool(g.shift),
              "n_pool": len(y["pool"]), "backbone": p.model.backbone, "image_size": p.data.image_size}
    cells, curves = [], []
    with tracking.model_run(p, f"grid-{init}", tags, params, parent) as run:
        t0 = time.time()
        feats = {}  # encoder seed -> split -> (N, D) features
        for es in sorted({encoder_seed(p, init, seed) for seed in g.seeds}):
            backbone = frozen_encoder(p, init, nc, device, es, root)
            feats[es] = {s: extract_features(backbone, x[s], mean, std) for s in x}

        jobs = []  # (regime, fraction, seed, indices into the pool)
        for seed in g.seeds:
            for f, idx in nested_fractions(y["pool"], g.fractions, seed).items():
                jobs.append(("fractions", f, seed, idx))
            for r in g.imbalance:
                jobs.append((f"imbalance:{r:g}", 1.0, seed, capped_imbalance(y["pool"], r, seed)))
        # features for fusion, labels, and every cell's training subset (recorded: pool positions)
        # float32 as probed: a randomly initialised MobileNetV2 in eval mode emits features of ~1e-10,
        # which float16 would flush to zero
        save_npz(features_path(init, root),
                 **{f"{s}_x_s{es}": f for es, fs in feats.items() for s, f in fs.items()},
                 **{f"{s}_y": v for s, v in y.items()},
                 **{f"subset_{rg}_f{f:g}_s{sd}": idx for rg, f, sd, idx in jobs})
        mlflow.log_artifact(str(features_path(init, root)), "grid")
        for regime, f, seed, idx in tqdm(jobs, desc=f"grid {init}", disable=None):
            labels = {"train": y["pool"][idx], **{s: y[s] for s in scored}}
            for protocol in g.protocols:
                if protocol == "finetune":
                    cells.append(_finetune_cell(p, init, regime, f, seed, idx, x, y, labels, scored, mean, std,
                                                classes, root, run.info.run_id, curves))
                    continue
                fs = feats[encoder_seed(p, init, seed)]
                tr = fs["pool"][idx]
                head = (lambda ev: linear_probe(tr, labels["train"], ev, nc, g.linear_c, g.linear_class_weight, seed)) \
                    if protocol == "linear" else (lambda ev: knn_probe(tr, labels["train"], ev, nc, g.knn_k))
                cells.append(make_cell(init, protocol, regime, f, seed, idx,
                                       probe_scores(head, tr, labels, fs, scored, classes)))
        seconds = round(time.time() - t0, 1)
        mlflow.log_metric("seconds", seconds)
        main = [c for c in cells if c["regime"] == "fractions"]
        for protocol in g.protocols:
            for f in g.fractions:
                vals = [c["test"]["balanced_accuracy"] for c in main if c["protocol"] == protocol and c["fraction"] == f]
                mlflow.log_metric(f"test_balanced_accuracy_{protocol}_f{f:g}", float(np.mean(vals)))
        result = {"init": init, "n_pool": int(len(y["pool"])), "n": {s: int(len(v)) for s, v in y.items()},
                  "seconds": seconds, "run_id": run.info.run_id, "cells": cells}
        write_json(cells_path(init, root), result)
        mlflow.log_artifact(str(cells_path(init, root)), "grid")
    write_csv(root / f"plots/grid/{init}.csv", curves)
    return result


def _finetune_cell(p, init, regime, fraction, seed, idx, x, y, labels, scored, mean, std, classes, root, parent, curves):
    """One fine-tune cell as a nested MLflow run with its per-epoch curves; best epoch on validation."""
    b = p.epochs.grid
    sel = torch.from_numpy(idx).to(x["pool"].device)
    tr_x, tr_y = x["pool"][sel], torch.from_numpy(y["pool"][idx]).to(x["pool"].device)
    sub = np.random.default_rng(seed).permutation(len(idx))[: b.max_eval or len(idx)]
    tags = {**tracking.base_tags(p), "stage": "grid", "init": init, "protocol": "finetune", "regime": regime,
            "fraction": str(fraction), "seed": str(seed)}
    with tracking.model_run(p, f"grid-{init}-{regime}-f{fraction:g}-s{seed}", tags,
                            {"n_train": len(idx), "epochs": b.epochs, "seed": seed}, parent):
        best, rows = fit(p, init, (tr_x, tr_y), (x["val"], y["val"]), (tr_x[sub], labels["train"][sub]), b.epochs,
                         seed, mean, std, classes, root, desc=f"{init} {regime} {fraction:g} s{seed}")
        model = Classifier(p.model.backbone, len(classes), p.model.dropout)  # weights: the best epoch's
        model.load_state_dict(best["state"])
        model = prepare_model(model, x["pool"].device)
        # train subset and val were scored at the best epoch inside fit; only the held-out splits remain
        scores = {"train": _kept(best["train"]), "val": _kept(best["val"]),
                  **{s: _kept(classification_metrics(labels[s], predict_proba(model, x[s], mean, std), classes))
                     for s in scored if s != "val"}}
        mlflow.log_metrics({f"test_{k}": v for k, v in scores["test"].items()} | {"best_epoch": best["epoch"]})
    if regime == "fractions":
        curves += [{"fraction": fraction, "seed": seed, "epoch": r["epoch"], "val_balanced_accuracy": r["val_balanced_accuracy"],
                    "gap_accuracy": r["gap_accuracy"], "gap_loss": r["gap_loss"]} for r in rows]
    return make_cell(init, "finetune", regime, fraction, seed, idx, scores, best_epoch=best["epoch"])
