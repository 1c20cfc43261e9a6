"""Stage `pretrain@<init>`: a self-supervised encoder trained on unlabelled train images only (from random
weights, or from ImageNet weights for the imagenet-<method> hybrids), with the values tuned for that init.

The shell around core.train.pretrain: data from the Layout, MLflow logging per epoch (loss, parts,
diagnostic images), a resumable per-epoch checkpoint, the encoder and its curves on disk.
"""
from __future__ import annotations

import sys
from pathlib import Path

import mlflow
import torch

from medssl import tracking
from medssl.checkpoints import encoder_file, encoder_seeds
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
    weights) with the values tuned for it; outputs under the Layout (the project for DVC, a trial folder for tuning).
    Under budgets.<budget>.pretrain_per_seed, also one encoder per grid seed (checkpoints.encoder_seeds), each its
    own MLflow run; the metrics and curves files are params.yaml seed's, with every encoder's loss and run. A rerun
    with the same inputs keeps each encoder already finished (a stage stopped between seeds carries on from the
    next one) and resumes the one it was training from its last epoch."""
    if init not in SSL_INITS:
        raise UsageError(f"unknown pretraining init {init!r}; known: {list(SSL_INITS)}")
    p = p.for_init(init)
    tracking.check_server()  # before any work, even where every encoder is kept: its runs are the server's
    runs = {s: _pretrain_seed(p, init, lay, parent, s) for s in encoder_seeds(p, init)}
    summary, trace = runs[p.seed]
    if len(runs) > 1:
        summary["encoders"] = {f"s{s}": {k: r[k] for k in ("loss", "seconds", "run_id")} for s, (r, _) in runs.items()}
    write_csv(lay.pretrain_curves(init), trace)  # by optimizer step: a curve even from one epoch
    write_json(lay.pretrain_metrics(init), summary)
    return summary


def _pretrain_seed(p: Params, init: str, lay: Layout, parent: str | None, seed: int) -> tuple[dict, list[dict]]:
    """One encoder of `init` pretrained with `seed` into checkpoints.encoder_file, as an MLflow run (`pretrain-<init>`
    for params.yaml's seed, else `pretrain-<init>-s<seed>`); -> its summary and loss trace."""
    out = encoder_file(p, init, seed, lay)
    name = f"pretrain-{init}" if seed == p.seed else f"pretrain-{init}-s{seed}"
    p = p.model_copy(update={"seed": seed})
    method = method_of(init)
    cfg, epochs, bs = getattr(p.pretrain, method), p.run_budget.pretrain_epochs, p.pretrain.batch_size
    device = pick_device()
    splits, meta = load_prepared(lay)
    images = torch.from_numpy(splits["train"].images).to(device)  # labels are never read here
    shown = torch.from_numpy(splits["val"].images[:8]).to(device)
    m = METHODS[method](cfg, p.model.backbone, p.image_size, meta["mean"], meta["std"], generator(p.seed))
    start = "imagenet" if init in HYBRIDS else "random"
    if start == "imagenet":  # continue from the supervised ImageNet weights (the method's head stays random)
        m.model.encoder.load_state_dict(build_backbone(p.model.backbone, meta["mean"], meta["std"], imagenet=True)[0].state_dict())
    ckpt = Checkpointer(lay.resume(name), resume_key(p, "pretrain", init, meta, lay, device))
    done = _finished(out, ckpt.key_digest)
    if done is not None:
        return done

    tags = {**tracking.base_tags(p, meta["raw_md5"]), "stage": "pretrain", "method": method, "init": init,
            "tuned": str(init in p.tuned)}
    params = {"method": method, "start": start, "epochs": epochs, "batch_size": bs, **cfg.model_dump(),
              "backbone": p.model.backbone, "image_size": p.image_size, "n_unlabelled": len(images), "seed": p.seed}
    with tracking.stage_run(p, name, tags, params, parent, system_metrics=True) as run:
        tracking.log_datasets(p, meta, {"train": len(images)}, lay.raw(p.data.path))
        diag_gen = generator(seed_of("diagnostics", init, p.seed), device)

        def on_epoch(epoch, row, state):
            tracking.log_curves(row["points"], "pretrain", x="step")  # pretrain/<loss|part> by optimizer step
            for img_name, img in m.diagnostics(shown, diag_gen).items():
                mlflow.log_image(img, artifact_file=f"{init}/{img_name}_epoch{epoch:03d}.png")
            ckpt.save(state)

        with one_torch_thread(device):  # the same encoder whatever the cores (stages side by side get one each)
            spec = PretrainSpec(cfg=cfg, batch_size=bs, epochs=epochs, aug=p.finetune.augment, seed=p.seed, device=device)
            res = pretrain(m, images, spec, desc=f"pretrain {name[len('pretrain-'):]}", on_epoch=on_epoch, resume=ckpt.load())
        summary = {**res.curves[-1], "first_loss": res.curves[0]["loss"], "seconds": res.seconds, "run_id": run.info.run_id}
        save_torch({"backbone": p.model.backbone, "method": method, "init": init, "seed": p.seed, "state_dict": res.encoder,
                    "inputs": ckpt.key_digest, "summary": summary, "trace": res.trace}, out)
        tracking.log_summary({"seconds": res.seconds, "first_loss": res.curves[0]["loss"], "last_loss": res.curves[-1]["loss"]})
        tracking.log_curves_figure(res.trace, name)
    ckpt.clear()
    return summary, res.trace


def _finished(out: Path, inputs: str) -> tuple[dict, list[dict]] | None:
    """The summary and loss trace of the encoder at `out` when it was pretrained from these inputs (the resume key's
    digest), else None (missing, unreadable, of earlier code or other inputs: pretrain it)."""
    try:
        saved = torch.load(out, map_location="cpu", weights_only=True)
    except Exception:  # missing, torn or of another format: trained again, never trusted
        return None
    if not isinstance(saved, dict) or saved.get("inputs") != inputs:
        return None
    print(f"{out}: pretrained from the same inputs, kept", file=sys.stderr, flush=True)
    return saved["summary"], saved["trace"]
