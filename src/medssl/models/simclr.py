"""SimCLR: two augmented views, projection head, NT-Xent (Chen et al. 2020)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import roi_align

from medssl.models.backbones import build_backbone, reinit_


class SimCLR(nn.Module):
    """x: (N, 3, S, S) in [0, 1] -> projections z (N, proj_dim), L2-normalised."""

    def __init__(self, backbone: str, proj_dim: int = 128, hidden: int = 512, mean=(0.5,) * 3, std=(0.25,) * 3,
                 gen: torch.Generator | None = None):
        super().__init__()
        self.encoder, dim = build_backbone(backbone, mean, std, gen=gen)
        self.projector = nn.Sequential(nn.Linear(dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True), nn.Linear(hidden, proj_dim))
        if gen is not None:
            reinit_(self.projector, gen)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.projector(self.encoder(x)), dim=1)


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """Normalised temperature-scaled cross entropy over 2N views; z1, z2: (N, D) unit vectors.

    In fp32 even inside an autocast region (the training step runs in one on CUDA): there `.float()` alone would
    not stop `z @ z.T` from being computed in bf16, whose spacing near 1 / temperature (~0.008 at 0.5) is as wide
    as the differences the loss learns from. The targets are made on z's device (no host-to-device copy a step)."""
    n = z1.shape[0]
    with torch.autocast(z1.device.type, enabled=False):
        z = torch.cat([z1, z2]).float()
        sim = z @ z.T / temperature
        sim.fill_diagonal_(float("-inf"))  # a view is not its own positive
        target = (torch.arange(2 * n, device=z.device) + n) % (2 * n)  # view i's positive: i + n, and n + i's: i
        return F.cross_entropy(sim, target)


def random_view(x: torch.Tensor, gen: torch.Generator, scale: tuple[float, float], jitter: float,
                grayscale: float) -> torch.Tensor:
    """Per-image random resized crop, brightness/contrast/saturation jitter and grayscale. x: (N, C, S, S) in [0, 1]
    -> same shape.

    pretrain.simclr's defaults keep colour nearly intact: in dermoscopy colour is diagnostic, and views that differ
    in colour teach the encoder to discard it. Grey data (C = 1) gets no colour jitter: its saturation and
    grayscale steps are the identity (the image is its own grey), only brightness and contrast vary. The same
    random numbers are drawn either way, so a view depends on the seed only."""
    n, _, s, _ = x.shape
    r = lambda *shape: torch.rand(*shape, generator=gen, device=gen.device).to(x.device)
    area = scale[0] + (scale[1] - scale[0]) * r(n)
    side = (area.sqrt() * s).clamp(4, s)
    x0, y0 = r(n) * (s - side), r(n) * (s - side)
    boxes = torch.stack([torch.arange(n, device=x.device, dtype=x.dtype), x0, y0, x0 + side, y0 + side], 1)
    v = roi_align(x, boxes.to(x.dtype), output_size=(s, s), aligned=True)
    b = 1 + jitter * (2 * r(n, 1, 1, 1) - 1)
    c = 1 + jitter * (2 * r(n, 1, 1, 1) - 1)
    sat = 1 + jitter * (2 * r(n, 1, 1, 1) - 1)
    mean = v.mean((1, 2, 3), keepdim=True)
    v = ((v * b - mean) * c + mean).clamp(0, 1)
    gray = v.mean(1, keepdim=True)
    v = (gray + (v - gray) * sat).clamp(0, 1)
    return torch.where(r(n, 1, 1, 1) < grayscale, gray.expand_as(v), v)
