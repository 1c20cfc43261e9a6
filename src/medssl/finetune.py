"""Stage `finetune`: the champion's classifier on all labelled train images (what `export` ships).

The champion init is chosen on validation, test metrics play no part. The grid's fine-tune cells at 100 % labels rank
the inits (mean over seeds of export.select_metric; ties go to macro AUC, then calibration). Their short, small-image
cells rank two close inits poorly, so the best budgets.<b>.finalists of them are each trained with the shipped recipe,
and the best on its own validation ships (with one finalist: the grid's best). Tuning trials call run_finetune for any
init.
Identical for every init: backbone architecture, head, optimiser, schedule, batch size, data and budget;
the backbone's starting weights differ, and so do the hyperparameters when `medssl tune` has chosen them per
init (the same search and trial budget for every init; tuned.yaml).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import medssl
from medssl import tracking
from medssl.checkpoints import build_classifier, load_classifier
from medssl.config import Params
from medssl.core.engine import pick_device, predict_proba
from medssl.core.train import FitData, FitSpec, champion_epochs, finetune, scores
from medssl.data.prepare import load_prepared
from medssl.errors import ConfigError
from medssl.guard import one_writer
from medssl.io import save_torch, write_csv, write_json
from medssl.layout import Layout
from medssl.models.classifier import with_views
from medssl.resume import Checkpointer, read_grid, resume_key


def ranked(scores: dict[str, dict], metric: str) -> list[str]:
    """Names best first by scores[name][metric]; a tie (easy data: several inits at 1.0) goes to the higher macro
    AUC, then the lower calibration error (ECE), then the dict's order (params.yaml's for the grid's inits, the
    grid's rank for the finalists); a missing or NaN score ranks last."""
    def get(name: str, key: str, missing: float) -> float:
        v = float(scores[name].get(key, np.nan))
        return missing if np.isnan(v) else v

    return sorted(scores, key=lambda n: (get(n, metric, -np.inf), get(n, "auc_macro", -np.inf), -get(n, "ece", np.inf)),
                  reverse=True)


def champion_of(cells: dict[str, list[dict]], metric: str) -> tuple[list[str], dict]:
    """The inits ranked by their grid fine-tune cells at 100 % labels (init -> cells, validation scores in
    cell["val"]): mean `metric` over seeds, ties as `ranked`; validation only. Returns them best first and
    init -> mean metric."""
    means = {i: {k: float(np.mean([c["val"].get(k, np.nan) for c in cells[i]])) for k in (metric, "auc_macro", "ece")}
             for i in cells}
    return ranked(means, metric), {i: means[i][metric] for i in cells}


def choose_champion(p: Params, lay: Layout = Layout()) -> tuple[list[str], dict]:
    """The inits best first by their grid fine-tune cells at 100 % labels, and init -> mean validation
    export.select_metric (champion_of)."""
    cells = {}
    for init in p.inits.all:
        cells[init] = [c for c in read_grid(p, init, lay)["cells"]
                       if c["protocol"] == "finetune" and c["regime"] == "fractions" and c["fraction"] == 1.0]
        if not cells[init]:
            raise ConfigError(f"{lay.grid_cells(init)}: no fine-tune cell at 100 % labels to select on (grid.protocols must list finetune)")
    return champion_of(cells, p.export.select_metric)


@one_writer(lambda a: "finetune")
def run_finetune(p: Params, init: str | None = None, lay: Layout = Layout(), parent: str | None = None,
                 on_epoch=None, log_model: bool = True) -> dict:
    """Train the classifier of `init` (default: the champion on validation, among budgets.<b>.finalists of the
    grid's best) on all train images for budgets.<b>.finetune_epochs (core.train.champion_epochs) at the champion's resolution
    (Params.finetune_image_size); best epoch on validation. `on_epoch(epoch, val_value)` may raise to stop (pruning).
    log_model: the checkpoint as an MLflow logged model (tuning trials skip it)."""
    tracking.check_server()  # before any work, even where a finished finalist is kept: its run is the server's
    names, means = [init], None
    if init is None:
        order, means = choose_champion(p, lay)
        names = order[: p.run_budget.finalists]
    one = len(names) == 1
    # finalists to their own files; each one's resume state is kept until the winner is in place, so a stopped stage
    # trains none that finished again
    fits = {i: _fit(p, i, FitRun(lay.classifier if one else lay.finalist(i), lay, parent, on_epoch, log_model), means)
            for i in names}
    summary = fits[names[0]].summary
    if not one:
        select = p.export.select_metric
        best = ranked({i: f.summary["val"] for i, f in fits.items()}, select)[0]  # a full tie: the grid's order
        finalists = {i: f.summary["val"][select] for i, f in fits.items()}
        save_torch({**fits[best].weights, "finalists_val": finalists}, lay.classifier)
        summary = {**fits[best].summary, "finalists_val": finalists}
    write_csv(lay.finetune_curves, fits[summary["init"]].curves)
    write_json(lay.finetune_metrics, summary)
    for f in fits.values():
        f.ckpt.clear()
    return summary


@dataclass(frozen=True)
class FitRun:
    """How one fine-tune runs: the file it writes, the layout it reads, its parent MLflow run, what it calls after
    each epoch (pruning) and whether it logs its model."""
    path: Path
    lay: Layout
    parent: str | None = None
    on_epoch: Callable[[int, float | None], None] | None = None
    log_model: bool = True


@dataclass(frozen=True)
class Fitted:
    summary: dict
    curves: list[dict]
    weights: dict  # the checkpoint written to FitRun.path
    ckpt: Checkpointer  # its resume state, cleared by the caller once the result is in place


def _fit(p: Params, init: str, out: FitRun, candidates: dict | None = None) -> Fitted:
    """One init's classifier on all train images (one MLflow run, `finetune-<init>`) -> out.path. Its resume state
    ends as the finished result (checkpoint, summary, curves): called again with the same inputs before the caller
    clears it, it writes that result again and opens no run."""
    lay, on_epoch = out.lay, out.on_epoch
    p = p.for_init(init)  # the values tuned for this init (tuned.yaml), else params.yaml's
    cfg, select = p.finetune, p.export.select_metric
    device = pick_device()
    size = p.finetune_image_size  # the champion's resolution, prepared beside the comparison's
    splits, meta = load_prepared(lay, size)
    classes = meta["classes"]
    tr_x, tr_y = (torch.from_numpy(a).to(device) for a in (splits["train"].images, splits["train"].labels.astype(np.int64)))
    va_x = torch.from_numpy(splits["val"].images).to(device)
    epochs = champion_epochs(p.run_budget, cfg.batch_size, len(tr_y))
    sub = torch.from_numpy(np.random.default_rng(p.seed).permutation(len(tr_y))[: cfg.train_eval_size]).to(device)
    ckpt = Checkpointer(lay.resume(f"finetune-{init}"), resume_key(p, "finetune", init, meta, lay, device))
    state = ckpt.load()
    if state is not None and "done" in state:  # finished; the grid's means as they are now
        done = {**state["done"], "candidates_val": candidates}
        save_torch(done, out.path)
        return Fitted({**state["summary"], "candidates_val": candidates}, state["curves"], done, ckpt)

    tags = {**tracking.base_tags(p, meta["raw_md5"]), "stage": "finetune", "init": init, "method": init,
            "protocol": "finetune", "fraction": "1.0", "seed": str(p.seed), "tuned": str(init in p.tuned)}
    params = {"init": init, "epochs": epochs, **cfg.model_dump(), "backbone": p.model.backbone,
              "image_size": size, "n_train": len(tr_y), "seed": p.seed,
              **({f"candidate_val_{i}": v for i, v in candidates.items()} if candidates else {})}
    with tracking.stage_run(p, f"finetune-{init}", tags, params, out.parent, system_metrics=True) as run:
        tracking.log_datasets(p, meta, {"train": len(tr_y), "val": len(va_x)}, lay.raw(p.data.path), size)
        def logged(epoch, row, state):
            tracking.log_epoch(row)
            ckpt.save(state)
            if on_epoch is not None:
                on_epoch(epoch, row[f"val_{select}"] if f"val_{select}" in row else None)

        model = build_classifier(p, init, meta, p.seed, lay)
        fit = finetune(model,
                       FitData(train=(tr_x, tr_y), val=(va_x, splits["val"].labels), sub=(tr_x[sub], tr_y[sub])),
                       FitSpec(cfg=cfg, epochs=epochs, select=select, classes=classes, seed=p.seed, device=device),
                       desc=f"finetune {init}", on_epoch=logged, resume=state)
        model.load_state_dict(fit.state)  # the best epoch; averaged over its views only where validation says so
        views, val = 1, fit.val
        if cfg.views == 8:
            val8 = scores(splits["val"].labels, predict_proba(with_views(model, 8), va_x), classes)
            if val8[select] > fit.val[select]:  # else (e.g. a weak model averaged into one class) one view
                views, val = 8, val8
        done = {"init": init, "backbone": p.model.backbone, "num_classes": len(classes), "dropout": p.model.dropout,
                "classes": classes, "mean": meta["mean"], "std": meta["std"], "image_size": size,
                "channels": meta.get("channels", 3), "task": meta.get("task", "multiclass"), "positive": meta.get("positive"),
                "raw_image_size": meta["raw_image_size"], "epochs": epochs, "best_epoch": fit.best_epoch, "state_dict": fit.state,
                "views": views, "ema_decay": fit.ema_decay,
                # provenance, read by evaluate and export from the weights themselves (never from a file beside
                # them that a killed stage can leave stale)
                "run_id": run.info.run_id, "select_metric": select, "val": val, "val_one_view": fit.val, "gap_at_best": fit.gap,
                "candidates_val": candidates, "data_md5": meta["raw_md5"], "config_digest": ckpt.key_digest}
        save_torch(done, out.path)
        summary = {"init": init, "epochs": epochs, "best_epoch": fit.best_epoch, "select_metric": select, "views": views,
                   "ema_decay": fit.ema_decay, "val": val,
                   "val_one_view": fit.val, "gap_at_best": fit.gap, "seconds": fit.seconds, "run_id": run.info.run_id,
                   "candidates_val": candidates}
        tracking.log_summary({"best_epoch": fit.best_epoch, "seconds": fit.seconds, **{f"best_val_{k}": v for k, v in fit.val.items()},
                              **{f"shipped_val_{k}": v for k, v in val.items()},
                              **{f"at_best_{k}": v for k, v in fit.gap.items()}})
        tracking.log_curves_figure(fit.curves, f"finetune-{init}")
        if out.log_model:
            summary["logged_model_id"] = log_checkpoint(out.path, f"classifier-{init}")
    ckpt.save({"done": done, "summary": summary, "curves": fit.curves})
    return Fitted(summary, fit.curves, done, ckpt)


def log_checkpoint(path: Path, name: str) -> str:
    """The trained checkpoint as an MLflow logged model of the active run (flavor pytorch; raw uint8 images
    (N, h, w, C) in, probabilities out, as the ONNX export), the .pt file inside it. Returns the model id."""
    import mlflow.pytorch
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    from medssl.models.classifier import ExportModel

    model, ckpt = load_classifier(path, torch.device("cpu"))
    wrapped = ExportModel(model, ckpt["image_size"]).eval()
    signature = ModelSignature(Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1, len(ckpt["mean"])))]),  # any h, w
                               Schema([TensorSpec(np.dtype(np.float32), (-1, ckpt["num_classes"]))]))
    info = mlflow.pytorch.log_model(wrapped, name=name, signature=signature, serialization_format="pickle",
                                    extra_files=[str(path)], code_paths=[str(Path(medssl.__file__).parent)],
                                    pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "torchvision"])
    return info.model_id
