"""Grid cells: one cell = (init, protocol, regime, fraction, seed) -> scores, as a plain dict.

The plan (which training subset each cell sees) depends only on the pool's labels, the grid section
and the seed, so the same cells come out whatever runs them, in whatever order.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from medssl.core.engine import predict_proba
from medssl.core.probes import knn_probe, linear_probe
from medssl.core.train import FitData, FitResult, FitSpec, finetune, scores
from medssl.data.fractions import nested_fractions
from medssl.metric_names import GAP, SCORED



@dataclass(frozen=True)
class CellData:
    """What the cells of an init train and are scored on. y: split -> labels (N,) numpy, with "pool" (the labelled
    pool a job's positions index) and each scored split; scored: the splits a cell is scored on (val, test, shift);
    classes: names in label order; x: split -> images (N, S, S, 3) uint8 on `device` (fine-tune cells; the
    frozen-feature cells take features instead)."""
    y: dict[str, np.ndarray]
    scored: list[str]
    classes: list[str]
    x: dict[str, torch.Tensor] = field(default_factory=dict)
    device: torch.device = torch.device("cpu")


@dataclass(frozen=True)
class Job:
    regime: str          # "fractions" or "imbalance:<ratio>"
    fraction: float
    seed: int
    idx: np.ndarray      # sorted positions in the labelled pool

    @property
    def key(self) -> str:
        return f"{self.regime}_f{self.fraction:g}_s{self.seed}"


def capped_imbalance(labels: np.ndarray, ratio: float, seed: int) -> np.ndarray:
    """Indices keeping at most ceil(ratio * n_min) random examples per class (n_min: the smallest class),
    so the largest/smallest class count is at most `ratio`; ratio 1 balances the classes. Sorted."""
    rng = np.random.default_rng(seed)
    counts = {c: np.flatnonzero(labels == c) for c in np.unique(labels)}
    cap = int(np.ceil(ratio * min(len(v) for v in counts.values())))
    return np.sort(np.concatenate([rng.permutation(v)[:cap] for v in counts.values()]))


def plan(pool_y: np.ndarray, fractions: list[float], imbalance: list[float], seeds: list[int]) -> list[Job]:
    """Every training subset of the grid: nested stratified fractions and capped-imbalance regimes, per seed."""
    jobs = []
    for seed in seeds:
        jobs += [Job("fractions", f, seed, idx) for f, idx in nested_fractions(pool_y, fractions, seed).items()]
        jobs += [Job(f"imbalance:{r:g}", 1.0, seed, capped_imbalance(pool_y, r, seed)) for r in imbalance]
    return jobs


def encoder_seed(init: str, seed: int, base_seed: int, *, per_seed: bool) -> int:
    """Seed of the encoder a cell of grid seed `seed` starts from: the random init is one draw per grid seed; a
    self-supervised init is pretrained with base_seed + seed when per_seed (so the seeds' spread carries the
    pretraining's own variance; grid seed 0 shares the champion's encoder), else once with base_seed for all seeds;
    ImageNet's weights are fixed (base_seed names them)."""
    if init == "random":
        return seed
    return base_seed + seed if per_seed and init != "imagenet" else base_seed


def kept(m: dict) -> dict:
    return {k: v for k, v in m.items() if k in SCORED or k.startswith("recall_")}


def make_cell(init: str, protocol: str, job: Job, sc: dict, **extra) -> dict:
    """sc: split -> metrics, with "train" (the cell's own training rows, eval mode) and "val"."""
    gap = {k: sc["train"][k] - sc["val"][k] for k in GAP}
    return {"init": init, "protocol": protocol, "regime": job.regime, "fraction": job.fraction, "seed": job.seed,
            "n_train": int(len(job.idx)), **{s: sc[s] for s in sc if s != "train"}, "train": sc["train"],
            "gap_accuracy": gap["accuracy"], "gap_balanced_accuracy": gap["balanced_accuracy"], **extra}


def predicted(probas: dict[str, torch.Tensor]) -> dict[str, int]:
    """split -> how many classes the model predicts (argmax) at least once: 1 marks a one-class predictor."""
    return {f"{s}_classes_predicted": int(len(torch.unique(pr.argmax(1)))) for s, pr in probas.items() if s != "train"}


def held_out(probas: dict[str, torch.Tensor], scored: list[str]) -> dict[str, np.ndarray]:
    """The probabilities the paired statistics resample: test (and shift), (N, C) float32 on the CPU."""
    return {s: probas[s].float().cpu().numpy() for s in scored if s != "val"}


def probe_cell(job: Job, feats: dict[str, torch.Tensor], data: CellData, *, init: str, protocol: str,
               grid) -> tuple[dict, dict[str, np.ndarray]]:
    """A frozen-feature cell. feats: split -> (N, D) features on one device, with "pool"; data: its labels.
    grid: the grid section (linear_c, linear_class_weight, knn_k). Scored on its own training rows and data.scored.
    Returns the cell and its held-out probabilities (held_out)."""
    y, scored, classes = data.y, data.scored, data.classes
    nc = len(classes)
    sel = torch.as_tensor(job.idx, device=feats["pool"].device)
    tr_x, tr_y = feats["pool"][sel], torch.as_tensor(y["pool"][job.idx], device=sel.device).long()
    ev = torch.cat([tr_x, *(feats[s] for s in scored)])
    if protocol == "linear":
        proba = linear_probe(tr_x, tr_y, ev, nc, grid.linear_c, grid.linear_class_weight)
    elif protocol == "knn":
        proba = knn_probe(tr_x, tr_y, ev, nc, grid.knn_k)
    else:
        raise ValueError(f"unknown frozen-feature protocol {protocol!r}")
    labels = {"train": y["pool"][job.idx], **{s: y[s] for s in scored}}
    parts = dict(zip(labels, torch.split(proba, [len(labels[s]) for s in labels])))
    cell = make_cell(init, protocol, job, {s: kept(scores(labels[s], part, classes)) for s, part in parts.items()},
                     **predicted(parts))
    return cell, held_out(parts, scored)


def finetune_cell(job: Job, model: torch.nn.Module, data: CellData, *, init: str, cfg, budget, select: str,
                  on_epoch=None) -> tuple[dict, FitResult, dict[str, np.ndarray]]:
    """A fine-tune cell: `model` (a Classifier built for this init and seed) trained on the job's subset, best
    epoch on validation `select`, then scored on the held-out splits. cfg: the finetune section.
    budget: the grid budget (epochs, steps: a fixed number of optimizer steps for every fraction, or null;
    max_eval); the train - val gap scores a fixed random part of the subset, max_eval (else
    cfg.train_eval_size) images, so a cell's cost follows its steps, not its subset's size.
    Returns the cell, the fit (curves) and the held-out probabilities."""
    x, y, scored, classes, device = data.x, data.y, data.scored, data.classes, data.device
    sel = torch.as_tensor(job.idx, device=device)
    tr_x, tr_y = x["pool"][sel], torch.as_tensor(y["pool"][job.idx], device=device).long()
    n_gap = budget.max_eval or cfg.train_eval_size
    sub = torch.as_tensor(np.random.default_rng(job.seed).permutation(len(job.idx))[:n_gap], device=device)
    fit = finetune(model, FitData(train=(tr_x, tr_y), val=(x["val"], y["val"]), sub=(tr_x[sub], tr_y[sub])),
                   FitSpec(cfg=cfg, epochs=budget.epochs, steps=budget.steps, select=select, classes=classes,
                           seed=job.seed, device=device),
                   desc=f"{init} {job.key}", on_epoch=on_epoch, quiet=True)  # the grid reports per cell
    model.load_state_dict(fit.state)
    # train subset and val were scored at the best epoch inside finetune; only the held-out splits remain
    probas = {s: predict_proba(model, x[s]) for s in scored if s != "val"}
    sc = {"train": kept(fit.train), "val": kept(fit.val), **{s: kept(scores(y[s], pr, classes)) for s, pr in probas.items()}}
    return make_cell(init, "finetune", job, sc, best_epoch=fit.best_epoch, **predicted(probas)), fit, held_out(probas, scored)
