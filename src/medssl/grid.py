"""Stage `grid@<init>`: the comparison cells of one init (the shell around core.cells).

For every seed in grid.seeds and label fraction in grid.fractions (nested, stratified subsets of
the labelled pool), three protocols with the same budget for every init:
  linear    class-balanced logistic regression on the frozen encoder's pooled features
  knn       cosine k-NN on the same features
  finetune  the whole classifier trained from the init (finetune.* hyperparameters, grid epochs)
plus the regimes: imbalance (classes capped to a largest/smallest ratio, at 100 % labels) and
domain shift (every cell also scored on a second source's test split when grid.shift is set).
Selection (best fine-tune epoch) is on validation; test and shift are only scored.
Seeds vary the label subset and the head/fine-tune run, and for the random init also the encoder itself
(each seed probes the draw it fine-tunes); a self-supervised init's encoder is pretrained once, or once per
seed under budgets.<budget>.pretrain_per_seed (checkpoints.encoder_seed_of).
Resumable: finished cells are kept in a state file, and a rerun with the same settings skips them.
"""
from __future__ import annotations

import os
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

import mlflow
import numpy as np
import torch

from medssl import tracking
from medssl.checkpoints import build_classifier, encoder_seed_of
from medssl.config import Params
from medssl.core.cells import CellData, Job, finetune_cell, plan, probe_cell
from medssl.core.engine import extract_features, one_torch_thread, pick_device, prepare_model
from medssl.core.progress import Progress
from medssl.data.prepare import load_prepared, stratified_subset
from medssl.data.shift import load_shift
from medssl.data.sources import Split
from medssl.guard import one_writer
from medssl.host import at_once
from medssl.io import save_npz, write_csv, write_json
from medssl.layout import Layout
from medssl.metric_names import BRIEF
from medssl.resume import Checkpointer, digests, inputs_key, resume_key


def save_grid_data(data: dict[str, Split], path) -> None:
    """The grid's splits (pool, val, test, shift) as one npz a shard on another machine reads by content hash."""
    save_npz(path, **{f"{s}_images": v.images for s, v in data.items()}, **{f"{s}_labels": v.labels for s, v in data.items()})


def load_grid_data(path) -> dict[str, Split]:
    with np.load(path) as z:
        splits = [k.removesuffix("_images") for k in z.files if k.endswith("_images")]
        return {s: Split(z[f"{s}_images"], z[f"{s}_labels"]) for s in splits}


def grid_data(p: Params, lay: Layout = Layout()) -> tuple[dict[str, Split], dict]:
    """Labelled pool (train, capped by the budget) and the val/test subsets every cell is scored on."""
    splits, meta = load_prepared(lay)
    b, seed = p.run_budget.grid, p.seed
    data = {"pool": stratified_subset(splits["train"], b.max_train, seed),
            "val": stratified_subset(splits["val"], b.max_eval, seed),
            "test": stratified_subset(splits["test"], b.max_eval, seed)}
    shift = load_shift(p, meta)
    if shift is not None:
        data["shift"] = shift
    return data, meta


def frozen_encoder(p: Params, init: str, meta: dict, device, seed: int, lay: Layout = Layout()) -> torch.nn.Module:
    """The backbone the frozen-feature protocols probe: the classifier's backbone fit() starts from at `seed`."""
    return prepare_model(build_classifier(p, init, meta, seed, lay, encoder=seed).backbone, device)


class Shard(dict):
    """One grid seed's results: features (`<split>_x_s<encoder seed>` -> (N, D) float32), cells (key -> cell),
    curves (per-epoch rows of its fine-tune cells), probas (key -> split -> (N, C)). Plain data, so it travels
    back from a worker; merged by write_grid."""


def grid_setup(p: Params, data: dict[str, Split], classes: list[str], device=None) -> tuple[CellData, list[Job]]:
    """The cells' data (images on `device`; None: labels only) and every job of the grid."""
    y = {s: v.labels.astype(np.int64) for s, v in data.items()}
    x = {} if device is None else {s: torch.from_numpy(v.images).to(device) for s, v in data.items()}
    cd = CellData(y=y, scored=[s for s in data if s != "pool"], classes=classes, x=x,  # val, test (, shift)
                  device=torch.device("cpu") if device is None else torch.device(device))
    return cd, plan(y["pool"], p.grid.fractions, p.grid.imbalance, p.grid.seeds)


class SharedFeatures:
    """Frozen features per encoder seed, extracted once and shared by every shard that probes that encoder (ImageNet,
    and SSL inits pretrained once, serve all grid seeds): linear, k-NN and, from the saved array, fusion cells."""

    def __init__(self):
        self.lock, self.locks, self.feats = threading.Lock(), {}, {}

    def get(self, es: int, extract) -> dict[str, torch.Tensor]:
        with self.lock:
            key_lock = self.locks.setdefault(es, threading.Lock())
        with key_lock:  # a shard that needs it waits for the one extracting it
            if es not in self.feats:
                self.feats[es] = extract()
            return self.feats[es]


@dataclass
class InitGrid:
    """An init's grid in this process. p: its values (Params.for_init); data, meta: the grid's splits and the
    prepared metadata; lay: where its encoder is (Layout.encoder) and its outputs go; run_id: its grid MLflow run,
    the parent of its fine-tune cells' runs (None: no parent); features: frozen features its shards share."""
    p: Params
    init: str
    data: dict[str, Split]
    meta: dict
    lay: Layout
    device: torch.device
    run_id: str | None = None
    features: SharedFeatures = field(default_factory=SharedFeatures)


def run_shard(ig: InitGrid, seed: int, *, done: dict | None = None, on_cell=None,
              stop: threading.Event | None = None) -> Shard:
    """Every cell of grid seed `seed` (all protocols, regimes, fractions), nested MLflow runs under ig.run_id.

    Randomness comes from the cell's own seeds, so a shard gives the same cells wherever and in whatever order it
    runs. done: cells already finished (resume; read only); on_cell(key, cell, curve_rows, probas) after each new
    cell; stop: set by the caller to end the shard before its next cell (a sibling shard failed)."""
    p, init, g = ig.p, ig.init, ig.p.grid
    cd, jobs = grid_setup(p, ig.data, ig.meta["classes"], ig.device)
    jobs = [j for j in jobs if j.seed == seed]
    done = done or {"cells": {}, "curves": [], "probas": {}}
    cells, probas = dict(done["cells"]), dict(done["probas"])
    curves = [r for r in done["curves"] if r["seed"] == seed]
    es = encoder_seed_of(p, init, seed)

    def extract():
        enc = frozen_encoder(p, init, ig.meta, ig.device, es, ig.lay)
        return {s: extract_features(enc, cd.x[s]) for s in cd.x}

    feats = ig.features.get(es, extract)
    todo = [(job, protocol) for job in jobs for protocol in g.protocols if f"{protocol}_{job.key}" not in cells]
    total = len(jobs) * len(g.protocols)
    bar = Progress(f"grid {init} seed {seed}", total, total - len(todo), unit="cell")
    for _, (job, protocol) in zip(bar, todo):  # the bar first: it reports a cell when the next is asked for
        if stop is not None and stop.is_set():
            break
        key = f"{protocol}_{job.key}"
        bar.set(key)
        rows = []
        if protocol == "finetune":
            cells[key], rows, probas[key] = _finetune_cell(ig, cd, job)
            curves += rows
        else:
            cells[key], probas[key] = probe_cell(job, feats, cd, init=init, protocol=protocol, grid=g)
        if on_cell is not None:
            on_cell(key, cells[key], rows, probas[key])
    bar.close()
    keys = [f"{pr}_{j.key}" for j in jobs for pr in g.protocols]
    if stop is not None and stop.is_set():
        raise Stopped(f"grid {init} seed {seed}: stopped after {len(cells)} cells")
    return Shard(seed=seed, features={f"{s}_x_s{es}": f.cpu().numpy() for s, f in feats.items()},
                 cells={k: cells[k] for k in keys}, probas={k: probas[k] for k in keys}, curves=curves)


def grid_tags(p: Params, init: str, meta: dict, n_pool: int) -> tuple[dict, dict]:
    """Tags and params of an init's grid run (the parent of its fine-tune cells' runs)."""
    g, b = p.grid, p.run_budget.grid
    tags = {**tracking.base_tags(p, meta["raw_md5"]), "stage": "grid", "init": init, "method": init,
            "tuned": str(init in p.tuned), tracking.LEVEL_TAG: "init"}
    params = {"init": init, **g.model_dump(exclude={"shift", "fusion"}), **b.model_dump(), "shift": bool(g.shift),
              "n_pool": n_pool, "backbone": p.model.backbone, "image_size": p.image_size,
              **tracking.flat_params({"finetune": p.grid_finetune.model_dump()})}
    return tags, params


def write_grid(ig: InitGrid, shards: list[Shard], seconds: float) -> dict:
    """The shards of ig.init (one per grid seed) -> metrics/grid/<init>.json, the features, the held-out
    probabilities and the curves, as `dvc repro` writes them; logged to the active MLflow run ig.run_id.
    Every cell exactly once: a seed missing or given twice is an error."""
    p, init, lay, data, meta, run_id, g = ig.p, ig.init, ig.lay, ig.data, ig.meta, ig.run_id, ig.p.grid
    seeds = sorted(s["seed"] for s in shards)
    if seeds != sorted(g.seeds):
        raise ValueError(f"grid {init}: shards for seeds {seeds}, expected each of {sorted(g.seeds)} once")
    shards = sorted(shards, key=lambda s: g.seeds.index(s["seed"]))
    cd, jobs = grid_setup(p, data, meta["classes"])
    y, scored = cd.y, cd.scored
    tracking.log_datasets(p, meta, {("train" if s == "pool" else s): len(v) for s, v in y.items() if s != "shift"},
                          lay.raw(p.data.path))
    features = {}
    for s in shards:
        features.update(s["features"])  # an encoder shared by seeds is the same array
    # features for fusion, labels, and every cell's training subset (recorded: pool positions);
    # float32 as probed: a randomly initialised MobileNetV2 in eval mode emits features of ~1e-10
    save_npz(lay.grid_features(init), **dict(sorted(features.items())), **{f"{s}_y": v for s, v in y.items()},
             **{f"subset_{j.key}": j.idx for j in jobs})
    mlflow.log_artifact(str(lay.grid_features(init)), "grid")
    by_key = {k: c for s in shards for k, c in s["cells"].items()}
    probas = {k: pr for s in shards for k, pr in s["probas"].items()}
    cells = [by_key[f"{pr}_{j.key}"] for j in jobs for pr in g.protocols]
    tracking.log_table({k: [c[k] for c in cells] for k in ("protocol", "regime", "fraction", "seed", "n_train")}
                       | {f"{s}_{k}": [c[s][k] for c in cells] for s in scored for k in BRIEF}
                       | {"gap_accuracy": [c["gap_accuracy"] for c in cells]}, "grid/cells.json")
    main = [c for c in cells if c["regime"] == "fractions"]
    means = {f"test_balanced_accuracy_{protocol}_f{f:g}": float(np.mean(
        [c["test"]["balanced_accuracy"] for c in main if c["protocol"] == protocol and c["fraction"] == f]))
        for protocol in g.protocols for f in g.fractions}
    tracking.log_summary({"seconds": seconds, **means})
    mlflow.log_metrics(means)  # sortable columns and charts that set the inits side by side in MLflow's views
    result = {"init": init, "n_pool": int(len(y["pool"])), "n": {s: int(len(v)) for s, v in y.items()},
              "seconds": seconds, "run_id": run_id, "inputs": digests(inputs_key(p, "grid", init, meta, lay)),
              "cells": cells}
    save_npz(lay.grid_probas(init), **{f"{s}_y": y[s] for s in scored if s != "val"},
             **{f"{s}/{key}": pr for key in (f"{pr}_{j.key}" for j in jobs for pr in g.protocols)
                for s, pr in probas[key].items()})
    write_json(lay.grid_cells(init), result)
    mlflow.log_artifact(str(lay.grid_cells(init)), "grid")
    write_csv(lay.grid_curves(init), [r for s in shards for r in s["curves"]])
    return result


class Stopped(Exception):
    """A shard ended early because a sibling shard failed."""


class Slots:
    """At most cap() shards at once; cap is read again while a shard waits, so cores given to the stage while it
    runs (medssl.repro hands idle cores to a running stage) start the next shard at once."""

    def __init__(self, cap):
        self.cap, self.n, self.cv = cap, 0, threading.Condition()

    def __enter__(self):
        with self.cv:
            while self.n >= max(1, self.cap()):
                self.cv.wait(timeout=0.5)
            self.n += 1

    def __exit__(self, *exc):
        with self.cv:
            self.n -= 1
            self.cv.notify()


def shards_at_once(device) -> int:
    """Shards computed at once (medssl.host.at_once): up to 4 on a GPU (kernels of several shards keep it busy; `medssl grid` has one
    shard per grid seed, 3 at the defaults, so all of them), one per core this thread may run on on a CPU (one
    torch thread each). On CUDA the shards' threads share the default stream: their kernels queue behind one
    another, and overlap only where one shard's host-side work (probes, metrics) runs beside another's."""
    return at_once(torch.device(device).type == "cuda", len(os.sched_getaffinity(0)))


@one_writer(lambda a: f"grid-{a['init']}")
def run_grid(p: Params, init: str, lay: Layout = Layout(), parent: str | None = None, workers: int | None = None) -> dict:
    """All cells of `init`: its shards (one per grid seed) on threads, as the Prefect flow's threads runner runs
    them (on a CPU, one torch thread per shard, so both entry points compute the same cells). Writes
    metrics/grid/<init>.json, its fine-tune curves, frozen features and the cells' held-out probabilities.
    Fine-tune cells use the values tuned for `init` (tuned.yaml), else params.yaml's. Resumable cell by cell.
    workers: shards at once (default shards_at_once; 1: one cell after another)."""
    p = p.for_init(init)
    g = p.grid
    device = pick_device()
    data, meta = grid_data(p, lay)
    state = Checkpointer(lay.resume(f"grid-{init}"), resume_key(p, "grid", init, meta, lay, device))
    done = state.load() or {"cells": {}, "curves": [], "probas": {}}
    lock, stop = threading.Lock(), threading.Event()

    def on_cell(key, cell, rows, probas):  # every finished cell into the state file, one writer at a time
        with lock:
            done["cells"][key], done["probas"][key] = cell, probas
            done["curves"] += rows
            state.save(done)

    tags, params = grid_tags(p, init, meta, len(data["pool"].labels))
    with tracking.stage_run(p, f"grid-{init}", tags, params, parent, system_metrics=True) as run:
        t0 = time.time()
        slots = Slots((lambda: workers) if workers else (lambda: shards_at_once(device)))
        ig = InitGrid(p=p, init=init, data=data, meta=meta, lay=lay, device=device, run_id=run.info.run_id)

        def shard(seed):
            with slots:
                return run_shard(ig, seed, done=done, on_cell=on_cell, stop=stop)

        with one_torch_thread(device), ThreadPoolExecutor(len(g.seeds)) as pool:
            futures = [pool.submit(shard, seed) for seed in g.seeds]
            try:
                wait(futures, return_when=FIRST_EXCEPTION)
            finally:  # a shard failed or the stage was interrupted: the others end at their next cell
                stop.set()
            errors = [f.exception() for f in futures if f.exception() is not None]  # (waits for every shard)
            if errors:
                raise next((e for e in errors if not isinstance(e, Stopped)), errors[0])
            shards = [f.result() for f in futures]
        result = write_grid(ig, shards, round(time.time() - t0, 1))
    state.clear()
    return result


def _finetune_cell(ig: InitGrid, cd: CellData, job: Job) -> tuple[dict, list[dict], dict]:
    """One fine-tune cell as a nested MLflow run with its per-epoch curves; best epoch on validation."""
    p, init = ig.p, ig.init
    b = p.run_budget.grid
    tags = {**tracking.base_tags(p), "stage": "grid", tracking.LEVEL_TAG: "cell", "init": init, "protocol": "finetune", "regime": job.regime,
            "fraction": str(job.fraction), "seed": str(job.seed)}
    name = f"grid-{init}-{job.regime}-f{job.fraction:g}-s{job.seed}"
    cfg = p.grid_finetune  # the last step's weights: finetune.ema_window is the shipped model's recipe
    with tracking.stage_run(p, name, tags, {"n_train": len(job.idx), "epochs": b.epochs, "steps": b.steps,
                                            "seed": job.seed, "batch_size": cfg.batch_size}, ig.run_id):
        es = encoder_seed_of(p, init, job.seed)
        model = build_classifier(p, init, ig.meta, job.seed, ig.lay, encoder=es)
        cell, fit, probas = finetune_cell(job, model, cd, init=init, cfg=cfg, budget=b, select=p.export.select_metric)
        tracking.log_curves(fit.curves)
        for split in cd.scored:
            tracking.log_scores(split, cell[split])
        tracking.log_summary({"best_epoch": fit.best_epoch})
        tracking.log_curves_figure(fit.curves, name)
    rows = []
    if job.regime == "fractions":
        rows = [{"fraction": job.fraction, "seed": job.seed, "epoch": r["epoch"], "val_balanced_accuracy": r["val_balanced_accuracy"],
                 "train_loss": r["train_loss"], "val_loss": r["val_loss"], "gap_accuracy": r["gap_accuracy"],
                 "gap_loss": r["gap_loss"]} for r in fit.curves]
    return cell, rows, probas
