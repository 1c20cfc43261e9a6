"""Stage `pretrain@<init>`: a self-supervised encoder trained on unlabelled train images only (from random
weights, or from ImageNet weights for the imagenet-<method> hybrids), with the values tuned for that init.

The shell around core.train.pretrain: data from the Layout, MLflow logging per epoch (loss, parts,
diagnostic images), a resumable per-epoch checkpoint, the encoder and its curves on disk.
"""
from __future__ import annotations

import mlflow
import torch

from medssl import tracking
from medssl.config import HYBRIDS, SSL_INITS, Params, method_of
from medssl.core.engine import one_torch_thread, pick_device
from medssl.core.methods import METHODS
from medssl.core.rng import generator, seed_of
from medssl.core.train import PretrainSpec, pretrain
from medssl.data.prepare import load_prepared
from medssl.errors import UsageError
from medssl.guard import one_writer
from medssl.io import save_torch, write_csv, write_json
from medssl.layout import Layout
from medssl.models.backbones import build_backbone
from medssl.resume import Checkpointer, resume_key


@one_writer(lambda a: f"pretrain-{a['init']}")
def run_pretrain(p: Params, init: str, lay: Layout = Layout(), parent: str | None = None) -> dict:
    """Train the encoder of SSL init `init` (a method, or imagenet-<method>: the method started from ImageNet
    weights) with the values tuned for it; outputs under the Layout (the project for DVC, a trial folder for tuning)."""
    if init not in SSL_INITS:
        raise UsageError(f"unknown pretraining init {init!r}; known: {list(SSL_INITS)}")
    p, method = p.for_init(init), method_of(init)
    cfg, epochs, bs = getattr(p.pretrain, method), p.run_budget.pretrain_epochs, p.pretrain.batch_size
    device = pick_device()
    splits, meta = load_prepared(lay)
    images = torch.from_numpy(splits["train"].images).to(device)  # labels are never read here
    shown = torch.from_numpy(splits["val"].images[:8]).to(device)
    m = METHODS[method](cfg, p.model.backbone, p.image_size, meta["mean"], meta["std"], generator(p.seed))
    start = "imagenet" if init in HYBRIDS else "random"
    if start == "imagenet":  # continue from the supervised ImageNet weights (the method's head stays random)
        m.model.encoder.load_state_dict(build_backbone(p.model.backbone, meta["mean"], meta["std"], imagenet=True)[0].state_dict())
    ckpt = Checkpointer(lay.resume(f"pretrain-{init}"), resume_key(p, "pretrain", init, meta, lay, device))

    tags = {**tracking.base_tags(p, meta["raw_md5"]), "stage": "pretrain", "method": method, "init": init,
            "tuned": str(init in p.tuned)}
    params = {"method": method, "start": start, "epochs": epochs, "batch_size": bs, **cfg.model_dump(),
              "backbone": p.model.backbone, "image_size": p.image_size, "n_unlabelled": len(images), "seed": p.seed}
    with tracking.stage_run(p, f"pretrain-{init}", tags, params, parent, system_metrics=True) as run:
        tracking.log_datasets(p, meta, {"train": len(images)}, lay.raw(p.data.path))
        diag_gen = generator(seed_of("diagnostics", init, p.seed), device)

        def on_epoch(epoch, row, state):
            tracking.log_curves(row["points"], "pretrain", x="step")  # pretrain/<loss|part> by optimizer step
            for name, img in m.diagnostics(shown, diag_gen).items():
                mlflow.log_image(img, artifact_file=f"{init}/{name}_epoch{epoch:03d}.png")
            ckpt.save(state)

        with one_torch_thread(device):  # the same encoder whatever the cores (stages side by side get one each)
            spec = PretrainSpec(cfg=cfg, batch_size=bs, epochs=epochs, aug=p.finetune.augment, seed=p.seed, device=device)
            res = pretrain(m, images, spec, desc=f"pretrain {init}", on_epoch=on_epoch, resume=ckpt.load())
        save_torch({"backbone": p.model.backbone, "method": method, "init": init, "state_dict": res.encoder}, lay.encoder(init))
        summary = {**res.curves[-1], "first_loss": res.curves[0]["loss"], "seconds": res.seconds, "run_id": run.info.run_id}
        tracking.log_summary({"seconds": res.seconds, "first_loss": res.curves[0]["loss"], "last_loss": res.curves[-1]["loss"]})
        tracking.log_curves_figure(res.trace, f"pretrain-{init}")
    write_csv(lay.pretrain_curves(init), res.trace)  # by optimizer step: a curve even from one epoch
    write_json(lay.pretrain_metrics(init), summary)
    ckpt.clear()
    return summary
