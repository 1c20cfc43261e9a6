"""Stage `finetune@<init>`: one classifier per init under identical conditions.

Identical for every init: backbone architecture, head, optimiser, schedule, epochs,
augmentation, batch size, seed and data. Only the backbone's starting weights differ.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

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


def checkpoint_path(init: str, root: Path = Path(".")) -> Path:
    return root / f"models/finetune/{init}/model.pt"


def val_metrics_path(init: str, root: Path = Path(".")) -> Path:
    return root / f"metrics/finetune/{init}.json"


def backbone_blocks(backbone: torch.nn.Module) -> list[torch.nn.Module]:
    """The backbone's stages in input-to-output order (what `finetune.frozen_blocks` counts)."""
    if hasattr(backbone, "features"):  # mobilenet_v2, efficientnet_b0
        return list(backbone.features.children())
    return [torch.nn.Sequential(backbone.conv1, backbone.bn1), backbone.layer1, backbone.layer2, backbone.layer3, backbone.layer4]


def freeze_blocks(model: Classifier, k: int) -> None:
    """Fix the weights and BatchNorm statistics of the first k blocks."""
    blocks = backbone_blocks(model.backbone)
    if k > len(blocks):
        raise ValueError(f"finetune.frozen_blocks={k} but the backbone has {len(blocks)} blocks")
    for block in blocks[:k]:
        block.requires_grad_(False)
        for m in block.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.momentum = 0.0  # running statistics stay as initialised/pretrained


def build_classifier(p: Params, init: str, num_classes: int, root: Path = Path(".")) -> Classifier:
    """Classifier with the backbone weights of `init`; SSL inits load their pretrained encoder."""
    if init not in p.inits.all:
        raise ValueError(f"init {init!r} is not configured; inits are {p.inits.all}")
    model = Classifier(p.model.backbone, num_classes, p.model.dropout, imagenet=init == "imagenet")
    if init in p.inits.ssl:
        path = encoder_path(init, root)
        if not path.is_file():
            raise FileNotFoundError(f"{path} missing: run `medssl pretrain {init}` first")
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        if ckpt["backbone"] != p.model.backbone:
            raise ValueError(f"{path}: encoder is a {ckpt['backbone']}, params.yaml model.backbone is {p.model.backbone}")
        model.backbone.load_state_dict(ckpt["state_dict"])
    return model


def fit(p: Params, init: str, train: tuple, val: tuple, sub: tuple, epochs: int, seed: int, mean, std,
        classes: list[str], root: Path = Path("."), desc: str = "", on_epoch: Callable[[int, float], None] | None = None
        ) -> tuple[dict, list[dict]]:
    """Fine-tune a classifier from `init` and keep its best epoch on validation (logged to the active MLflow run).

    train, val, sub: (images (N, S, S, 3) uint8 on device, labels); `sub` is a train subset scored in eval
    mode like validation, so the train - val gap compares like with like. Returns (best, per-epoch curves);
    best = {epoch, train-subset and val metrics, gap at that epoch, state_dict copy}.
    """
    cfg = p.finetune
    gen = seed_everything(seed)
    (tr_x, tr_y), (va_x, va_y), (sub_x, sub_y) = train, val, sub
    clf = build_classifier(p, init, len(classes), root)
    freeze_blocks(clf, cfg.frozen_blocks)
    model = prepare_model(clf, tr_x.device)
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=cfg.lr, weight_decay=cfg.weight_decay)
    batch = min(cfg.batch_size, len(tr_y))
    steps_per_epoch = -(-len(tr_y) // batch)
    sched = warmup_cosine(opt, cfg.warmup_epochs * steps_per_epoch, epochs * steps_per_epoch)
    select = p.export.select_metric
    best, curves = None, []
    for epoch in trange(1, epochs + 1, desc=desc or f"finetune {init}", disable=None, leave=False):
        train_one_epoch(model, tr_x, tr_y, opt, sched, mean, std, batch, gen, cfg.augment,
                        cfg.label_smoothing, desc=f"{init} epoch {epoch}")
        tr = classification_metrics(sub_y, predict_proba(model, sub_x, mean, std), classes)
        va = classification_metrics(va_y, predict_proba(model, va_x, mean, std), classes)
        row = {"epoch": epoch, **{f"train_{k}": tr[k] for k in CURVE_KEYS}, **{f"val_{k}": va[k] for k in CURVE_KEYS},
               **overfitting_gap(tr, va, CURVE_KEYS)}
        curves.append(row)
        mlflow.log_metrics({k: v for k, v in row.items() if k != "epoch"} | {"val_auc_macro": va["auc_macro"]}, step=epoch)
        if best is None or va[select] > best["val"][select]:
            # copy the tensors: a reference to the live state_dict would keep changing
            state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            best = {"epoch": epoch, "train": tr, "val": va, "gap": {k: row[k] for k in row if k.startswith("gap_")},
                    "state": state}
        if on_epoch is not None:
            on_epoch(epoch, va[select])
    return best, curves


def run_finetune(p: Params, init: str, root: Path = Path("."), parent: str | None = None,
                 on_epoch: Callable[[int, float], None] | None = None) -> dict:
    """Train the full-label classifier of `init` (the export candidate); outputs under `root`.
    `on_epoch(epoch, val_value)` may raise to stop (pruning)."""
    cfg, epochs = p.finetune, p.epochs.finetune_epochs
    device = pick_device()
    splits, meta = load_prepared()
    classes = meta["classes"]
    tr_x, tr_y = (torch.from_numpy(a).to(device) for a in (splits["train"].images, splits["train"].labels))
    va_x = torch.from_numpy(splits["val"].images).to(device)
    sub = torch.from_numpy(np.random.default_rng(p.seed).permutation(len(tr_y))[: cfg.train_eval_size]).to(device)
    mean, std = (torch.tensor(meta[k], device=device) for k in ("mean", "std"))

    tags = {**tracking.base_tags(p, meta["raw_md5"]), "stage": "finetune", "init": init, "method": init,
            "protocol": "finetune", "fraction": "1.0", "seed": str(p.seed)}
    params = {"init": init, "epochs": epochs, **cfg.model_dump(), "backbone": p.model.backbone,
              "image_size": p.data.image_size, "n_train": len(tr_y), "seed": p.seed}
    with tracking.model_run(p, f"finetune-{init}", tags, params, parent) as run:
        t0 = time.time()
        best, curves = fit(p, init, (tr_x, tr_y), (va_x, splits["val"].labels), (tr_x[sub], tr_y[sub].cpu().numpy()),
                           epochs, p.seed, mean, std, classes, root, on_epoch=on_epoch)
        seconds = round(time.time() - t0, 1)
        save_torch({"init": init, "backbone": p.model.backbone, "num_classes": len(classes), "dropout": p.model.dropout,
                    "classes": classes, "mean": meta["mean"], "std": meta["std"], "image_size": p.data.image_size,
                    "raw_image_size": meta["raw_image_size"], "best_epoch": best["epoch"], "state_dict": best["state"]},
                   checkpoint_path(init, root))
        summary = {"init": init, "best_epoch": best["epoch"], "select_metric": p.export.select_metric, "val": best["val"],
                   "gap_at_best": best["gap"], "seconds": seconds, "run_id": run.info.run_id}
        mlflow.log_metrics({"best_epoch": best["epoch"], "seconds": seconds,
                            **{f"best_val_{k}": v for k, v in best["val"].items()}})
        mlflow.log_artifact(str(checkpoint_path(init, root)), artifact_path="checkpoint")
    write_csv(root / f"plots/finetune/{init}.csv", curves)
    write_json(val_metrics_path(init, root), summary)
    return summary
