"""Self-supervised methods as small parts (model + loss on a uint8 batch + a diagnostic image), one interface:

    m = METHODS[name](cfg, backbone, image_size, mean, std, gen)   # weights drawn from gen (CPU)
    loss, parts = m.loss(x8, gen)        # x8: (B, S, S, 3) uint8 on the device; gen: that device's generator
    images = m.diagnostics(x8, gen)      # {name: (H, W, 3) uint8 numpy}
    m.model.encoder                      # the backbone every protocol uses afterwards
"""
from __future__ import annotations

import numpy as np
import torch
from torchvision.utils import make_grid

from medssl.models.classifier import to_input
from medssl.models.mim import MIM, masked_mse, random_patch_mask
from medssl.models.simclr import SimCLR, nt_xent, random_view
from medssl.models.vae import VAE, vae_loss


def image_grid(x: torch.Tensor, nrow: int) -> np.ndarray:
    """x: (N, 3, H, W) in [0, 1] -> (H', W', 3) uint8 image grid."""
    return (make_grid(x.float().clamp(0, 1).cpu(), nrow=nrow, padding=1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def _cl(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last)


class VAEMethod:
    """Reconstruction + beta * KL; images: reconstructions and prior samples."""

    def __init__(self, cfg, backbone: str, image_size: int, mean, std, gen: torch.Generator):
        self.cfg = cfg
        self.model = VAE(backbone, image_size, cfg.latent_dim, mean, std, gen)

    def loss(self, x8: torch.Tensor, gen: torch.Generator):
        self.model.generator = gen
        x = to_input(x8)
        recon, mu, logvar = self.model(_cl(x))
        loss, rec, kl = vae_loss(recon, x, mu.float(), logvar.float(), self.cfg.beta)
        return loss, {"recon": rec, "kl": kl}

    @torch.no_grad()
    def diagnostics(self, x8: torch.Tensor, gen: torch.Generator) -> dict[str, np.ndarray]:
        x = to_input(x8)
        recon, _, _ = self.model(_cl(x))
        z = torch.randn(16, self.cfg.latent_dim, generator=gen, device=gen.device).to(x.device)
        return {"reconstructions": image_grid(torch.cat([x, recon.float()]), len(x8)),
                "samples": image_grid(self.model.decode(z), 8)}


class SimCLRMethod:
    """NT-Xent between two random views; image: pairs of views."""

    def __init__(self, cfg, backbone: str, image_size: int, mean, std, gen: torch.Generator):
        self.cfg = cfg
        self.model = SimCLR(backbone, cfg.proj_dim, mean=mean, std=std, gen=gen)

    def _views(self, x8: torch.Tensor, gen: torch.Generator):
        x, c = to_input(x8), self.cfg
        return [random_view(x, gen, (c.min_scale, 1.0), c.jitter, c.grayscale) for _ in range(2)]

    def loss(self, x8: torch.Tensor, gen: torch.Generator):
        v1, v2 = self._views(x8, gen)
        z = self.model(_cl(torch.cat([v1, v2])))  # one pass over both views: BatchNorm sees 2B images
        return nt_xent(*z.chunk(2), self.cfg.temperature), {}

    @torch.no_grad()
    def diagnostics(self, x8: torch.Tensor, gen: torch.Generator) -> dict[str, np.ndarray]:
        v1, v2 = self._views(x8, gen)
        return {"views": image_grid(torch.cat([to_input(x8), v1, v2]), len(x8))}


class MIMMethod:
    """Masked-patch reconstruction; image: original / masked / reconstructed."""

    def __init__(self, cfg, backbone: str, image_size: int, mean, std, gen: torch.Generator):
        self.cfg, self.size = cfg, image_size
        self.model = MIM(backbone, image_size, mean, std, gen)

    def _masked(self, x8: torch.Tensor, gen: torch.Generator):
        x = to_input(x8)
        mask = random_patch_mask(len(x8), self.size, self.cfg.patch, self.cfg.mask_ratio, gen).to(x.device)
        return x, mask, self.model(_cl(x), mask)

    def loss(self, x8: torch.Tensor, gen: torch.Generator):
        x, mask, recon = self._masked(x8, gen)
        return masked_mse(recon, self.model.encoder.normalize(x), mask), {}

    @torch.no_grad()
    def diagnostics(self, x8: torch.Tensor, gen: torch.Generator) -> dict[str, np.ndarray]:
        x, mask, recon = self._masked(x8, gen)
        enc = self.model.encoder
        filled = (recon.float() * enc.std + enc.mean) * mask + x * (1 - mask)  # visible pixels kept as they are
        return {"masked_reconstructions": image_grid(torch.cat([x, x * (1 - mask), filled]), len(x8))}


METHODS = {"vae": VAEMethod, "simclr": SimCLRMethod, "mim": MIMMethod}
