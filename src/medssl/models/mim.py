"""Masked image modelling for CNNs (SimMIM/SparK-style): mask patches, reconstruct them from the
encoder's feature map with a linear decoder, loss on masked patches only."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from medssl.models.backbones import build_backbone, reinit_


class MIM(nn.Module):
    """x: (N, C, S, S) in [0, 1], mask (N, 1, S, S) 1 = hidden -> reconstruction (N, C, S, S) in the encoder's
    normalised space (compare with `self.encoder.normalize(x)`).

    SimMIM's light decoder: one 1x1 convolution maps each cell of the encoder's (N, D, S/32, S/32)
    feature map to the pixels of its r x r block (pixel shuffle), so the reconstruction has to come
    from the encoder's last features, the ones every protocol uses.
    """

    def __init__(self, backbone: str, image_size: int, mean=(0.5,) * 3, std=(0.25,) * 3, gen: torch.Generator | None = None):
        super().__init__()
        self.encoder, _ = build_backbone(backbone, mean, std, gen=gen)
        with torch.no_grad():
            c = len(mean)
            fmap = self.encoder.eval().feature_map(torch.zeros(1, c, image_size, image_size))
        self.size, r = image_size, -(-image_size // fmap.shape[-1])  # block side; crop when S/32 rounds up
        self.mask_token = nn.Parameter(torch.full((1, c, 1, 1), 0.5))  # learnt fill for hidden pixels, in [0, 1]
        self.decoder = nn.Sequential(nn.Conv2d(fmap.shape[1], c * r * r, 1), nn.PixelShuffle(r))
        if gen is not None:
            reinit_(self.decoder, gen)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x * (1 - mask) + self.mask_token * mask
        return self.decoder(self.encoder.feature_map(x))[..., : self.size, : self.size]


def random_patch_mask(n: int, size: int, patch: int, ratio: float, gen: torch.Generator) -> torch.Tensor:
    """(n, 1, size, size) float mask, exactly round(ratio * patches) patches hidden per image."""
    g = size // patch
    k = int(round(ratio * g * g))
    order = torch.rand(n, g * g, generator=gen, device=gen.device).argsort(1)
    m = torch.zeros(n, g * g, device=gen.device)
    m.scatter_(1, order[:, :k], 1.0)
    return m.view(n, 1, g, g).repeat_interleave(patch, 2).repeat_interleave(patch, 3)


def masked_mse(recon: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error over hidden pixels only."""
    err = F.mse_loss(recon.float(), target, reduction="none").mean(1, keepdim=True)
    return (err * mask).sum() / mask.sum().clamp(min=1)
