"""Epoch engines over device-resident uint8 tensors (no DataLoader: the data fits in memory)."""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from medssl.config import Augment
from medssl.device import autocast
from medssl.models.classifier import to_input


def augment(x: torch.Tensor, cfg: Augment, gen: torch.Generator) -> torch.Tensor:
    """Per-image random flips / 90-degree rotations. x: (N, H, W, 3) uint8, square images."""
    n = x.shape[0]

    def coin() -> torch.Tensor:
        return (torch.rand(n, generator=gen) < cfg.strength).to(x.device).view(n, 1, 1, 1)

    if cfg.hflip:
        x = torch.where(coin(), x.flip(2), x)
    if cfg.vflip:
        x = torch.where(coin(), x.flip(1), x)
    if cfg.rot90:
        x = torch.where(coin(), x.transpose(1, 2), x)  # with the flips this covers all 8 dihedral views
    return x


def train_one_epoch(model, images, labels, optimizer, scheduler, mean, std, batch_size, gen, aug: Augment | None,
                    label_smoothing: float = 0.0, desc: str = "train") -> float:
    """One pass in random order; returns the mean training loss. images: (N, S, S, 3) uint8 on device."""
    model.train()
    device = images.device
    order = torch.randperm(len(images), generator=gen).to(device)
    total, seen = 0.0, 0
    for i in tqdm(range(0, len(order), batch_size), desc=desc, leave=False, disable=None):
        idx = order[i : i + batch_size]
        if len(idx) < 2:  # BatchNorm needs two samples
            continue
        x = images[idx]
        if aug is not None:
            x = augment(x, aug, gen)
        x = to_input(x, mean, std).contiguous(memory_format=torch.channels_last)
        with autocast(device):
            loss = F.cross_entropy(model(x).float(), labels[idx], label_smoothing=label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        total += loss.item() * len(idx)
        seen += len(idx)
    return total / max(seen, 1)


@torch.no_grad()
def predict_proba(model, images, mean, std, batch_size: int = 512) -> np.ndarray:
    """images: (N, S, S, 3) uint8 on device -> probabilities (N, C) float64 numpy."""
    model.eval()
    out = []
    for i in range(0, len(images), batch_size):
        x = to_input(images[i : i + batch_size], mean, std).contiguous(memory_format=torch.channels_last)
        with autocast(images.device):
            out.append(model(x).float().softmax(1).cpu())
    proba = torch.cat(out).double()
    return (proba / proba.sum(1, keepdim=True)).numpy()  # exact row sums in float64 for the metrics


def warmup_cosine(opt: torch.optim.Optimizer, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up for `warmup` steps, then cosine decay to zero at `total` steps."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)
