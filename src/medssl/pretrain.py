"""Stage `pretrain@<method>`: self-supervised encoders trained on unlabelled train images only."""
from __future__ import annotations

import time
from pathlib import Path

import mlflow
import numpy as np
import torch
from torchvision.utils import make_grid
from tqdm import trange

from medssl import tracking
from medssl.config import Params
from medssl.data.prepare import load_prepared
from medssl.device import autocast, pick_device, prepare_model, seed_everything
from medssl.engine import augment, warmup_cosine
from medssl.io import save_torch, write_csv, write_json
from medssl.models.classifier import to_input
from medssl.models.vae import VAE, vae_loss


def encoder_path(method: str, root: Path = Path(".")) -> Path:
    return root / f"models/pretrain/{method}/encoder.pt"


def _grid(x: torch.Tensor, nrow: int) -> np.ndarray:
    """x: (N, 3, H, W) in [0, 1] -> (H', W', 3) uint8 image grid."""
    return (make_grid(x.float().cpu(), nrow=nrow, padding=1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def run_pretrain(p: Params, method: str, root: Path = Path("."), parent: str | None = None) -> dict:
    """Train the encoder of `method`; outputs under `root` (the project root for DVC, a trial folder for tuning)."""
    if method != "vae":
        raise ValueError(f"unknown pretraining method {method!r}; configured methods: {p.inits.ssl}")
    return _pretrain_vae(p, root, parent)


def _pretrain_vae(p: Params, root: Path, parent: str | None) -> dict:
    cfg, epochs = p.pretrain.vae, p.epochs.pretrain_epochs
    gen = seed_everything(p.seed)
    device = pick_device()
    splits, meta = load_prepared()
    images = torch.from_numpy(splits["train"].images).to(device)  # labels are never read here
    shown = torch.from_numpy(splits["val"].images[:8]).to(device)
    mean, std = (torch.tensor(meta[k], device=device) for k in ("mean", "std"))
    model = prepare_model(VAE(p.model.backbone, p.data.image_size, cfg.latent_dim), device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = epochs * -(-len(images) // p.pretrain.batch_size)
    sched = warmup_cosine(opt, steps // 10, steps)

    tags = {**tracking.base_tags(p, meta["raw_md5"]), "stage": "pretrain", "method": "vae", "init": "vae"}
    params = {"method": "vae", "epochs": epochs, "batch_size": p.pretrain.batch_size, **cfg.model_dump(),
              "backbone": p.model.backbone, "image_size": p.data.image_size, "n_unlabelled": len(images), "seed": p.seed}
    curves = []
    with tracking.model_run(p, "pretrain-vae", tags, params, parent) as run:
        t0 = time.time()
        for epoch in trange(1, epochs + 1, desc="pretrain vae", disable=None):
            model.train()
            order = torch.randperm(len(images), generator=gen).to(device)
            sums = np.zeros(3)
            for i in range(0, len(order), p.pretrain.batch_size):
                idx = order[i : i + p.pretrain.batch_size]
                if len(idx) < 2:
                    continue
                x8 = augment(images[idx], p.finetune.augment, gen)
                with autocast(device):
                    recon, mu, logvar = model(to_input(x8, mean, std).contiguous(memory_format=torch.channels_last))
                loss, rec, kl = vae_loss(recon, x8.permute(0, 3, 1, 2).float() / 255, mu.float(), logvar.float(), cfg.beta)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                sums += np.array([loss.item(), rec.item(), kl.item()]) * len(idx)
            row = {"epoch": epoch, **dict(zip(("loss", "recon", "kl"), (sums / len(images)).tolist()))}
            curves.append(row)
            mlflow.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=epoch)

            model.eval()
            with torch.no_grad():
                recon, _, _ = model(to_input(shown, mean, std))
                samples = model.decode(torch.randn(16, cfg.latent_dim, generator=gen).to(device))
            pair = torch.cat([shown.permute(0, 3, 1, 2).float() / 255, recon.float()])
            mlflow.log_image(_grid(pair, 8), artifact_file=f"vae/reconstructions_epoch{epoch:03d}.png")
            mlflow.log_image(_grid(samples, 8), artifact_file=f"vae/samples_epoch{epoch:03d}.png")

        encoder = {k: v.detach().cpu().clone() for k, v in model.encoder.state_dict().items()}
        save_torch({"backbone": p.model.backbone, "method": "vae", "state_dict": encoder}, encoder_path("vae", root))
        summary = {**curves[-1], "seconds": round(time.time() - t0, 1), "run_id": run.info.run_id}
        mlflow.log_metric("seconds", summary["seconds"])
    write_csv(root / "plots/pretrain/vae.csv", curves)
    write_json(root / "metrics/pretrain/vae.json", summary)
    return summary
