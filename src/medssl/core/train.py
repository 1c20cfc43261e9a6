"""Fine-tuning and self-supervised pretraining: both run core.engine.train_epoch, both return plain results.

Resumable: `on_epoch(epoch, row, checkpoint)` hands the caller a callable that returns the full training
state (model, optimiser, schedule, generator, best so far); passing that dict back as `resume` continues
after that epoch with the same result as an uninterrupted run.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from medssl.core.engine import Loop, augment, predict_proba, prepare_model, train_epoch, warmup_cosine
from medssl.core.progress import Progress
from medssl.core.rng import generator
from medssl.metric_names import CURVE
from medssl.metrics import classification_metrics, overfitting_gap

OnEpoch = Callable[[int, dict, Callable[[], dict]], None]


def scores(y: np.ndarray, proba: torch.Tensor, classes: list[str]) -> dict:
    """Metrics of device probabilities (N, C), in float64 but not renormalised: dividing by row sums that miss 1 in the
    last bit would split scores that tie (a saturated softmax's 1.0), which macro AUC counts one half."""
    return classification_metrics(y, proba.double().cpu().numpy(), classes)


def _copy(state: dict) -> dict:
    return {k: v.detach().cpu().clone() for k, v in state.items()}


def _state(model, loop: Loop, extra: dict) -> dict:
    return {"model": _copy(model.state_dict()), "optimizer": loop.optimizer.state_dict(),
            "scheduler": loop.scheduler.state_dict(), "generator": loop.gen.get_state(),
            **({"ema": _copy(loop.ema.state_dict())} if loop.ema is not None else {}), **extra}


def _restore(resume: dict | None, model, loop: Loop) -> int:
    if resume is None:
        return 0
    model.load_state_dict(resume["model"])
    loop.optimizer.load_state_dict(resume["optimizer"])
    loop.scheduler.load_state_dict(resume["scheduler"])
    loop.gen.set_state(resume["generator"])
    if loop.ema is not None:
        loop.ema.load_state_dict(resume["ema"])
    return int(resume["epoch"])


@dataclass(frozen=True)
class FitSpec:
    """How a classifier trains. cfg: the finetune section (lr, weight_decay, batch_size, label_smoothing,
    warmup_epochs, augment, class_weight, ema_window); epochs: evaluation points; steps: optimizer steps in all, whatever the
    size of the training set (a 70-image subset learns as long as a 7,000-image one), `epochs` then being points
    steps / epochs steps apart over fresh random orders of it; None: `epochs` passes over it. select: the
    validation metric that picks the best epoch. Every draw (order, augmentation, dropout) comes from one
    generator on `device` seeded with `seed`."""
    cfg: Any
    epochs: int
    select: str
    classes: list[str]
    seed: int
    device: torch.device
    steps: int | None = None


@dataclass(frozen=True)
class FitData:
    """train, sub: (images (N, S, S, 3) uint8 on the device, labels (N,) int64 on the device); `sub` is a train
    subset scored in eval mode like validation, so the train - val gap compares like with like.
    val: (images on the device, labels numpy)."""
    train: tuple
    val: tuple
    sub: tuple


@dataclass
class FitResult:
    best_epoch: int
    train: dict            # metrics of the train subset (eval mode) at the best epoch
    val: dict              # validation metrics at the best epoch
    gap: dict              # gap_<k> = train - val at the best epoch
    state: dict            # the best epoch's state_dict (a copy, on CPU)
    curves: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    ema_decay: float | None = None  # the scored and kept weights' moving-average decay; None: those of the last step


MIN_WINDOW = 10  # steps: a shorter "average" mostly mixes the untrained head of the first steps into the weights
                 # (a 20-step run on 160 images, window 5, shipped a one-class predictor)


def ema_decay(window: float) -> float | None:
    """The decay of a moving average over about its last `window` optimizer steps; None under MIN_WINDOW steps."""
    return None if window < MIN_WINDOW else 1 - 1 / window


def weight_average(model: torch.nn.Module, decay: float | None) -> torch.nn.Module | None:
    """An exponential moving average of `model`'s weights and BatchNorm statistics (None: none), updated after each
    step (core.engine.train_epoch). Averaging the end of a run smooths the noise of its last steps out of the weights."""
    if decay is None:
        return None
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


def epoch_steps(n: int, batch: int) -> int:
    """Optimizer steps in one pass over n examples at `batch` (a last batch of one is dropped: BatchNorm)."""
    batch = min(batch, n)
    return n // batch + (n % batch >= 2)


def champion_epochs(budget, batch_size: int, n_train: int) -> int:
    """budget.finetune_epochs (config.Budget), raised where its passes over n_train images at batch_size
    (finetune.batch_size) take fewer optimizer steps than one grid fine-tune cell on its whole labelled pool did
    (a few hundred images: 2 epochs of batch 128 are 4 steps): the champion trains at least as long as the cells
    that chose it."""
    b = budget.grid
    pool = min(n_train, b.max_train or n_train)
    cell = b.steps or b.epochs * epoch_steps(pool, b.batch_size or batch_size)
    return max(budget.finetune_epochs, -(-cell // epoch_steps(n_train, batch_size)))


def finetune(model: torch.nn.Module, data: FitData, spec: FitSpec, *, desc: str = "finetune",
             on_epoch: OnEpoch | None = None, resume: dict | None = None, quiet: bool = False) -> FitResult:
    """Train a Classifier (built by the caller, on CPU) on `data` as `spec` says; keep its best epoch on validation.
    Progress: a bar on a terminal, else a line per epoch on stderr (quiet: none, e.g. for the grid's short cells)."""
    t0 = time.time()
    (tr_x, tr_y), (va_x, va_y), (sub_x, sub_y) = data.train, data.val, data.sub
    cfg, epochs, steps, select, classes, device = spec.cfg, spec.epochs, spec.steps, spec.select, spec.classes, spec.device
    gen = generator(spec.seed, device)
    model = prepare_model(model, device)
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=cfg.lr, weight_decay=cfg.weight_decay)
    batch = min(cfg.batch_size, len(tr_y))
    per_epoch = len(tr_y) if steps is None else -(-steps // epochs) * batch  # examples drawn between evaluations
    steps_per_epoch = epoch_steps(per_epoch, batch)
    decay = ema_decay(cfg.ema_window * epochs * steps_per_epoch)
    ema = weight_average(model, decay)  # copied before the dropout generator is set
    model.set_generator(gen)
    loop = Loop(opt, warmup_cosine(opt, cfg.warmup_epochs * steps_per_epoch, epochs * steps_per_epoch), gen, device, batch,
                ema)
    scored = model if ema is None else ema.module  # what is validated, kept and returned
    sub_np = sub_y.cpu().numpy()
    nc = len(classes)
    weight = None
    if cfg.class_weight == "balanced":  # n / (k * n_class) over the k classes present, as the linear probe
        counts = torch.bincount(tr_y, minlength=nc).float()
        weight = torch.where(counts > 0, len(tr_y) / (int((counts > 0).sum()) * counts.clamp(min=1)), 0.0)

    order = [None]  # steps: this epoch's draws, positions in train (whole random orders, one after another)

    def step(idx):
        idx = idx if order[0] is None else order[0][idx]
        x = augment(tr_x[idx], cfg.augment, gen)
        x = x.permute(0, 3, 1, 2).float().div(255).contiguous(memory_format=torch.channels_last)
        return F.cross_entropy(model(x).float(), tr_y[idx], weight=weight, label_smoothing=cfg.label_smoothing), {}

    best, curves = (resume or {}).get("best"), list((resume or {}).get("curves", []))
    ref = (resume or {}).get("ref_loss")
    start = _restore(resume, model, loop)
    bar = Progress(desc, epochs, start, items=len(tr_y), quiet=quiet, leave=False)
    for epoch in bar:
        if steps is not None:
            reps = -(-per_epoch // len(tr_y))
            order[0] = torch.cat([torch.randperm(len(tr_y), generator=gen, device=gen.device)
                                  for _ in range(reps)])[:per_epoch].to(device)
        fit = train_epoch(model, step, per_epoch, loop, desc=desc, epoch=epoch, ref_loss=ref)
        ref = fit["first_step_loss"] if ref is None else ref
        proba = predict_proba(scored, torch.cat([sub_x, va_x]))  # one pass over both scored sets
        tr, va = scores(sub_np, proba[: len(sub_x)], classes), scores(va_y, proba[len(sub_x):], classes)
        row = {"epoch": epoch, **{f"train_{k}": tr[k] for k in CURVE}, **{f"val_{k}": va[k] for k in CURVE},
               "val_auc_macro": va["auc_macro"], f"val_{select}": va[select], **overfitting_gap(tr, va, CURVE)}
        curves.append(row)
        bar.set(f"val {select} {va[select]:.3f}")
        if best is None or va[select] > best["val"][select]:
            # copy the tensors: a reference to the live state_dict would keep changing
            best = {"epoch": epoch, "train": tr, "val": va, "state": _copy(scored.state_dict()),
                    "gap": {k: row[k] for k in row if k.startswith("gap_")}}
        if on_epoch is not None:
            on_epoch(epoch, row, lambda: _state(model, loop, {"epoch": epoch, "best": best, "curves": curves,
                                                              "ref_loss": ref}))
    bar.close()
    model.set_generator(None)
    return FitResult(best["epoch"], best["train"], best["val"], best["gap"], best["state"], curves,
                     round(time.time() - t0, 1), decay)


@dataclass
class PretrainResult:
    encoder: dict                      # the encoder's state_dict (CPU copy)
    curves: list[dict]                 # per epoch: loss and its parts
    trace: list[dict] = field(default_factory=list)  # per window of steps: step (optimizer steps done), epoch, loss, parts
    seconds: float = 0.0


TRACE_POINTS = 20  # loss points per epoch in PretrainResult.trace: a curve even from a one-epoch run


def trace_windows(values: list[list[float]], names: list[str], epoch: int, done: int) -> list[dict]:
    """Per-step values (loss, parts) of one epoch -> their means over ~TRACE_POINTS windows of consecutive steps,
    each row at the optimizer steps done by its end (`done`: steps before this epoch)."""
    w = max(1, -(-len(values) // TRACE_POINTS))
    rows = []
    for i in range(0, len(values), w):
        chunk = values[i : i + w]
        rows.append({"step": done + i + len(chunk), "epoch": epoch,
                     **{k: sum(v[j] for v in chunk) / len(chunk) for j, k in enumerate(names)}})
    return rows


@dataclass(frozen=True)
class PretrainSpec:
    """cfg: the method's section (lr, weight_decay); aug: the flips/rotations applied before the method's own views;
    `epochs` passes of `batch_size`, warm-up over the first tenth of the steps; every draw from one generator on
    `device` seeded with `seed`."""
    cfg: Any
    batch_size: int
    epochs: int
    aug: Any
    seed: int
    device: torch.device


def pretrain(method, images: torch.Tensor, spec: PretrainSpec, *, desc: str = "pretrain",
             on_epoch: OnEpoch | None = None, resume: dict | None = None) -> PretrainResult:
    """Train a core.methods method on unlabelled images (N, S, S, 3) uint8 on `spec.device`, as `spec` says.
    on_epoch's row: the epoch's mean loss and parts, and `points`, the epoch's rows of PretrainResult.trace."""
    t0 = time.time()
    gen = generator(spec.seed, spec.device)
    model = prepare_model(method.model, spec.device)
    opt = torch.optim.AdamW(model.parameters(), lr=spec.cfg.lr, weight_decay=spec.cfg.weight_decay)
    bs = min(spec.batch_size, len(images))
    steps = spec.epochs * (len(images) // bs + (len(images) % bs >= 2))
    loop = Loop(opt, warmup_cosine(opt, steps // 10, steps), gen, spec.device, bs)
    curves, trace = list((resume or {}).get("curves", [])), list((resume or {}).get("trace", []))
    ref = (resume or {}).get("ref_loss")
    start = _restore(resume, model, loop)
    steps_taken: list[torch.Tensor] = []  # this epoch's step values (loss, parts) on the device, read once per epoch

    def step(idx):
        loss, parts = method.loss(augment(images[idx], spec.aug, gen), gen)
        steps_taken.append(torch.stack([loss.detach().float(), *(v.detach().float() for v in parts.values())]))
        return loss, parts

    bar = Progress(desc, spec.epochs, start, items=len(images))
    for epoch in bar:
        steps_taken.clear()
        row = train_epoch(model, step, len(images), loop, desc=desc, epoch=epoch, ref_loss=ref)
        first = row.pop("first_step_loss")
        ref = first if ref is None else ref
        row = {"epoch": epoch, **row}
        curves.append(row)
        points = trace_windows(torch.stack(steps_taken).tolist(), [k for k in row if k != "epoch"], epoch,
                               trace[-1]["step"] if trace else 0)
        trace += points
        bar.set(f"loss {row['loss']:.4g}")
        if on_epoch is not None:
            model.eval()
            on_epoch(epoch, {**row, "points": points},
                     lambda: _state(model, loop, {"epoch": epoch, "curves": curves, "trace": trace, "ref_loss": ref}))
    bar.close()
    return PretrainResult(_copy(method.model.encoder.state_dict()), curves, trace, round(time.time() - t0, 1))
