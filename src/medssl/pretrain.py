"""Stage `pretrain@<method>`: a self-supervised encoder trained on unlabelled train images only.

The shell around core.train.pretrain: data from the Layout, MLflow logging per epoch (loss, parts,
diagnostic images), a resumable per-epoch checkpoint, the encoder and its curves on disk.
"""
from __future__ import annotations

import mlflow
import torch

from medssl import tracking
from medssl.config import Params
from medssl.core.engine import pick_device
from medssl.core.methods import METHODS
from medssl.core.rng import generator, seed_of
from medssl.core.train import pretrain
from medssl.data.prepare import load_prepared
from medssl.io import save_torch, write_csv, write_json
from medssl.guard import one_writer
from medssl.layout import Layout
from medssl.resume import Checkpointer


@one_writer(lambda a: f"pretrain-{a['method']}")
def run_pretrain(p: Params, method: str, lay: Layout = Layout(), parent: str | None = None) -> dict:
    """Train the encoder of `method`; outputs under the Layout (the project for DVC, a trial folder for tuning)."""
    if method not in METHODS:
        raise ValueError(f"unknown pretraining method {method!r}; known: {sorted(METHODS)}")
    cfg, epochs, bs = getattr(p.pretrain, method), p.epochs.pretrain_epochs, p.pretrain.batch_size
    device = pick_device()
    splits, meta = load_prepared(lay)
    images = torch.from_numpy(splits["train"].images).to(device)  # labels are never read here
    shown = torch.from_numpy(splits["val"].images[:8]).to(device)
    m = METHODS[method](cfg, p.model.backbone, p.data.image_size, meta["mean"], meta["std"], generator(p.seed))
    ckpt = Checkpointer(lay.resume(f"pretrain-{method}"), {"method": method, "cfg": cfg.model_dump(), "epochs": epochs,
                                                           "bs": bs, "seed": p.seed, "md5": meta["raw_md5"]})

    tags = {**tracking.base_tags(p, meta["raw_md5"]), "stage": "pretrain", "method": method, "init": method}
    params = {"method": method, "epochs": epochs, "batch_size": bs, **cfg.model_dump(), "backbone": p.model.backbone,
              "image_size": p.data.image_size, "n_unlabelled": len(images), "seed": p.seed}
    with tracking.model_run(p, f"pretrain-{method}", tags, params, parent) as run:
        diag_gen = generator(seed_of("diagnostics", method, p.seed), device)

        def on_epoch(epoch, row, state):
            mlflow.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=epoch)
            for name, img in m.diagnostics(shown, diag_gen).items():
                mlflow.log_image(img, artifact_file=f"{method}/{name}_epoch{epoch:03d}.png")
            ckpt.save(state)

        res = pretrain(m, images, cfg, bs, epochs, p.finetune.augment, p.seed, device, desc=f"pretrain {method}",
                       on_epoch=on_epoch, resume=ckpt.load())
        save_torch({"backbone": p.model.backbone, "method": method, "state_dict": res.encoder}, lay.encoder(method))
        summary = {**res.curves[-1], "first_loss": res.curves[0]["loss"], "seconds": res.seconds, "run_id": run.info.run_id}
        mlflow.log_metric("seconds", res.seconds)
    write_csv(lay.pretrain_curves(method), res.curves)
    write_json(lay.pretrain_metrics(method), summary)
    ckpt.clear()
    return summary
