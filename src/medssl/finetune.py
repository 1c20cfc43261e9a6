"""Stage `finetune@<init>`: one classifier per init under identical conditions.

Identical for every init: backbone architecture, head, optimiser, schedule, epochs,
augmentation, batch size, seed and data. Only the backbone's starting weights differ.
"""
from __future__ import annotations

import time
from pathlib import Path

import mlflow
import numpy as np
import torch
from tqdm import trange

from medssl import tracking
from medssl.config import Params
from medssl.data.prepare import load_prepared
from medssl.device import pick_device, prepare_model, seed_everything
from medssl.engine import predict_proba, train_one_epoch, warmup_cosine
from medssl.io import save_torch, write_csv, write_json
from medssl.metrics import classification_metrics, overfitting_gap
from medssl.models.classifier import Classifier
from medssl.pretrain import encoder_path

CURVE_KEYS = ("loss", "accuracy", "balanced_accuracy")


def checkpoint_path(init: str) -> Path:
    return Path(f"models/finetune/{init}/model.pt")


def val_metrics_path(init: str) -> Path:
    return Path(f"metrics/finetune/{init}.json")


def build_classifier(p: Params, init: str, num_classes: int) -> Classifier:
    """Classifier with the backbone weights of `init`; SSL inits load their pretrained encoder."""
    if init not in p.inits.all:
        raise ValueError(f"init {init!r} is not configured; inits are {p.inits.all}")
    model = Classifier(p.model.backbone, num_classes, p.model.dropout, imagenet=init == "imagenet")
    if init in p.inits.ssl:
        path = encoder_path(init)
        if not path.is_file():
            raise FileNotFoundError(f"{path} missing: run `medssl pretrain {init}` first")
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        if ckpt["backbone"] != p.model.backbone:
            raise ValueError(f"{path}: encoder is a {ckpt['backbone']}, params.yaml model.backbone is {p.model.backbone}")
        model.backbone.load_state_dict(ckpt["state_dict"])
    return model


def run_finetune(p: Params, init: str) -> dict:
    cfg, epochs = p.finetune, p.epochs.finetune_epochs
    gen = seed_everything(p.seed)
    device = pick_device()
    splits, meta = load_prepared()
    classes = meta["classes"]
    tr_x, tr_y = (torch.from_numpy(a).to(device) for a in (splits["train"].images, splits["train"].labels))
    va_x = torch.from_numpy(splits["val"].images).to(device)
    va_y = splits["val"].labels
    # A fixed train subset scored in eval mode, like validation, so the gap compares like with like.
    sub = np.random.default_rng(p.seed).permutation(len(tr_y))[: cfg.train_eval_size]
    mean, std = (torch.tensor(meta[k], device=device) for k in ("mean", "std"))

    model = prepare_model(build_classifier(p, init, len(classes)), device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = -(-len(tr_y) // cfg.batch_size)
    sched = warmup_cosine(opt, cfg.warmup_epochs * steps_per_epoch, epochs * steps_per_epoch)

    tags = {**tracking.base_tags(p, meta["raw_md5"]), "stage": "finetune", "init": init, "method": init,
            "protocol": "finetune", "fraction": "1.0"}
    params = {"init": init, "epochs": epochs, **cfg.model_dump(), "backbone": p.model.backbone,
              "image_size": p.data.image_size, "n_train": len(tr_y), "seed": p.seed}
    select = p.export.select_metric
    best, curves = None, []
    with tracking.model_run(p, f"finetune-{init}", tags, params) as run:
        t0 = time.time()
        for epoch in trange(1, epochs + 1, desc=f"finetune {init}", disable=None):
            train_one_epoch(model, tr_x, tr_y, opt, sched, mean, std, cfg.batch_size, gen, cfg.augment,
                            cfg.label_smoothing, desc=f"{init} epoch {epoch}")
            tr = classification_metrics(tr_y[sub].cpu().numpy(), predict_proba(model, tr_x[sub], mean, std), classes)
            va = classification_metrics(va_y, predict_proba(model, va_x, mean, std), classes)
            row = {"epoch": epoch, **{f"train_{k}": tr[k] for k in CURVE_KEYS}, **{f"val_{k}": va[k] for k in CURVE_KEYS},
                   **overfitting_gap(tr, va, CURVE_KEYS)}
            curves.append(row)
            mlflow.log_metrics({k: v for k, v in row.items() if k != "epoch"} | {"val_auc_macro": va["auc_macro"]}, step=epoch)
            if best is None or va[select] > best["val"][select]:
                # copy the tensors: a reference to the live state_dict would keep changing
                state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
                best = {"epoch": epoch, "val": va, "gap": {k: row[k] for k in row if k.startswith("gap_")}, "state": state}
        seconds = round(time.time() - t0, 1)
        save_torch({"init": init, "backbone": p.model.backbone, "num_classes": len(classes), "dropout": p.model.dropout,
                    "classes": classes, "mean": meta["mean"], "std": meta["std"], "image_size": p.data.image_size,
                    "raw_image_size": meta["raw_image_size"], "best_epoch": best["epoch"], "state_dict": best["state"]},
                   checkpoint_path(init))
        summary = {"init": init, "best_epoch": best["epoch"], "select_metric": select, "val": best["val"],
                   "gap_at_best": best["gap"], "seconds": seconds, "run_id": run.info.run_id}
        mlflow.log_metrics({"best_epoch": best["epoch"], "seconds": seconds,
                            **{f"best_val_{k}": v for k, v in best["val"].items()}})
        mlflow.log_artifact(str(checkpoint_path(init)), artifact_path="checkpoint")
    write_csv(Path(f"plots/finetune/{init}.csv"), curves)
    write_json(val_metrics_path(init), summary)
    return summary
