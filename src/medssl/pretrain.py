"""Stage `pretrain@<method>`: self-supervised encoders trained on unlabelled train images only.

A method = model + loss on a uint8 batch + a diagnostic image; one loop trains them all.
"""
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
from medssl.models.mim import MIM, masked_mse, random_patch_mask
from medssl.models.simclr import SimCLR, nt_xent, random_view
from medssl.models.vae import VAE, vae_loss


def encoder_path(method: str, root: Path = Path(".")) -> Path:
    return root / f"models/pretrain/{method}/encoder.pt"


def _grid(x: torch.Tensor, nrow: int) -> np.ndarray:
    """x: (N, 3, H, W) in [0, 1] -> (H', W', 3) uint8 image grid."""
    return (make_grid(x.float().clamp(0, 1).cpu(), nrow=nrow, padding=1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def _cl(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last)


class VAEMethod:
    """Reconstruction + beta * KL; images: reconstructions and prior samples."""

    def __init__(self, p: Params, mean, std, gen):
        self.cfg, self.mean, self.std, self.gen = p.pretrain.vae, mean, std, gen
        self.model = VAE(p.model.backbone, p.data.image_size, self.cfg.latent_dim)

    def loss(self, x8: torch.Tensor):
        recon, mu, logvar = self.model(_cl(to_input(x8, self.mean, self.std)))
        loss, rec, kl = vae_loss(recon, x8.permute(0, 3, 1, 2).float() / 255, mu.float(), logvar.float(), self.cfg.beta)
        return loss, {"recon": rec, "kl": kl}

    @torch.no_grad()
    def diagnostics(self, x8: torch.Tensor) -> dict[str, np.ndarray]:
        recon, _, _ = self.model(_cl(to_input(x8, self.mean, self.std)))
        samples = self.model.decode(torch.randn(16, self.cfg.latent_dim, generator=self.gen).to(x8.device))
        return {"reconstructions": _grid(torch.cat([x8.permute(0, 3, 1, 2).float() / 255, recon.float()]), len(x8)),
                "samples": _grid(samples, 8)}


class SimCLRMethod:
    """NT-Xent between two random views; image: pairs of views."""

    def __init__(self, p: Params, mean, std, gen):
        self.cfg, self.mean, self.std, self.gen = p.pretrain.simclr, mean, std, gen
        self.model = SimCLR(p.model.backbone, self.cfg.proj_dim)

    def _views(self, x8: torch.Tensor):
        x = x8.permute(0, 3, 1, 2).float() / 255
        c = self.cfg
        view = lambda: random_view(x, self.gen, (c.min_scale, 1.0), c.jitter, c.grayscale)  # noqa: E731
        return view(), view()

    def _norm(self, v: torch.Tensor) -> torch.Tensor:
        return _cl((v - self.mean.view(1, 3, 1, 1)) / self.std.view(1, 3, 1, 1))

    def loss(self, x8: torch.Tensor):
        v1, v2 = self._views(x8)
        loss = nt_xent(self.model(self._norm(v1)), self.model(self._norm(v2)), self.cfg.temperature)
        return loss, {}

    @torch.no_grad()
    def diagnostics(self, x8: torch.Tensor) -> dict[str, np.ndarray]:
        v1, v2 = self._views(x8)
        return {"views": _grid(torch.cat([x8.permute(0, 3, 1, 2).float() / 255, v1, v2]), len(x8))}


class MIMMethod:
    """Masked-patch reconstruction; image: original / masked / reconstructed."""

    def __init__(self, p: Params, mean, std, gen):
        self.cfg, self.mean, self.std, self.gen = p.pretrain.mim, mean, std, gen
        self.size = p.data.image_size
        self.model = MIM(p.model.backbone, self.size)

    def _masked(self, x8: torch.Tensor):
        x = to_input(x8, self.mean, self.std)
        mask = random_patch_mask(len(x8), self.size, self.cfg.patch, self.cfg.mask_ratio, self.gen).to(x.device)
        return x, mask, self.model(_cl(x), mask)

    def loss(self, x8: torch.Tensor):
        x, mask, recon = self._masked(x8)
        return masked_mse(recon, x, mask), {}

    @torch.no_grad()
    def diagnostics(self, x8: torch.Tensor) -> dict[str, np.ndarray]:
        x, mask, recon = self._masked(x8)
        m, s = self.mean.view(1, 3, 1, 1), self.std.view(1, 3, 1, 1)
        orig = x * s + m
        shown = torch.cat([orig, orig * (1 - mask), (recon.float() * mask + x * (1 - mask)) * s + m])
        return {"masked_reconstructions": _grid(shown, len(x8))}


METHODS = {"vae": VAEMethod, "simclr": SimCLRMethod, "mim": MIMMethod}


def run_pretrain(p: Params, method: str, root: Path = Path("."), parent: str | None = None) -> dict:
    """Train the encoder of `method`; outputs under `root` (the project root for DVC, a trial folder for tuning)."""
    if method not in METHODS:
        raise ValueError(f"unknown pretraining method {method!r}; known: {sorted(METHODS)}")
    cfg, epochs, bs = getattr(p.pretrain, method), p.epochs.pretrain_epochs, p.pretrain.batch_size
    gen = seed_everything(p.seed)
    device = pick_device()
    splits, meta = load_prepared()
    images = torch.from_numpy(splits["train"].images).to(device)  # labels are never read here
    shown = torch.from_numpy(splits["val"].images[:8]).to(device)
    mean, std = (torch.tensor(meta[k], device=device) for k in ("mean", "std"))
    m = METHODS[method](p, mean, std, gen)
    model = prepare_model(m.model, device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = epochs * -(-len(images) // bs)
    sched = warmup_cosine(opt, steps // 10, steps)

    tags = {**tracking.base_tags(p, meta["raw_md5"]), "stage": "pretrain", "method": method, "init": method}
    params = {"method": method, "epochs": epochs, "batch_size": bs, **cfg.model_dump(), "backbone": p.model.backbone,
              "image_size": p.data.image_size, "n_unlabelled": len(images), "seed": p.seed}
    curves = []
    with tracking.model_run(p, f"pretrain-{method}", tags, params, parent) as run:
        t0 = time.time()
        for epoch in trange(1, epochs + 1, desc=f"pretrain {method}", disable=None):
            model.train()
            order = torch.randperm(len(images), generator=gen).to(device)
            sums: dict[str, float] = {}
            seen = 0
            for i in range(0, len(order), bs):
                idx = order[i : i + bs]
                if len(idx) < 2:
                    continue
                with autocast(device):
                    loss, parts = m.loss(augment(images[idx], p.finetune.augment, gen))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                for k, v in {"loss": loss, **parts}.items():
                    sums[k] = sums.get(k, 0.0) + v.item() * len(idx)
                seen += len(idx)
            row = {"epoch": epoch, **{k: v / seen for k, v in sums.items()}}
            curves.append(row)
            mlflow.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=epoch)
            model.eval()
            for name, img in m.diagnostics(shown).items():
                mlflow.log_image(img, artifact_file=f"{method}/{name}_epoch{epoch:03d}.png")

        encoder = {k: v.detach().cpu().clone() for k, v in m.model.encoder.state_dict().items()}
        save_torch({"backbone": p.model.backbone, "method": method, "state_dict": encoder}, encoder_path(method, root))
        summary = {**curves[-1], "first_loss": curves[0]["loss"], "seconds": round(time.time() - t0, 1),
                   "run_id": run.info.run_id}
        mlflow.log_metric("seconds", summary["seconds"])
    write_csv(root / f"plots/pretrain/{method}.csv", curves)
    write_json(root / f"metrics/pretrain/{method}.json", summary)
    return summary
