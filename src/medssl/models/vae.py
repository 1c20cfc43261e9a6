"""Variational autoencoder whose encoder is the classification backbone (random init)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from medssl.models.backbones import build_backbone, reinit_


def _up(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.ConvTranspose2d(cin, cout, 4, 2, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class VAE(nn.Module):
    """x: (N, C, S, S) in [0, 1] -> recon (N, C, S, S) in [0, 1], mu, logvar (N, latent_dim); C = len(mean).
    The reparameterisation noise comes from `self.generator` (set by the trainer)."""

    def __init__(self, backbone: str, image_size: int, latent_dim: int = 128, mean=(0.5,) * 3, std=(0.25,) * 3,
                 gen: torch.Generator | None = None):
        super().__init__()
        self.encoder, dim = build_backbone(backbone, mean, std, gen=gen)
        self.generator = None
        self.fc_mu = nn.Linear(dim, latent_dim)
        self.fc_logvar = nn.Linear(dim, latent_dim)
        self.latent_dim, self.s0 = latent_dim, image_size // 16
        self.fc_dec = nn.Linear(latent_dim, 256 * self.s0 * self.s0)
        self.decoder = nn.Sequential(_up(256, 128), _up(128, 64), _up(64, 32), nn.ConvTranspose2d(32, len(mean), 4, 2, 1))
        if gen is not None:
            for m in (self.fc_mu, self.fc_logvar, self.fc_dec, self.decoder):
                reinit_(m, gen)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.encoder(x)
        return self.fc_mu(h), self.fc_logvar(h).clamp(-10, 10)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.fc_dec(z)).view(-1, 256, self.s0, self.s0)
        return torch.sigmoid(self.decoder(h))

    def forward(self, x: torch.Tensor):
        mu, logvar = self.encode(x)
        noise = torch.randn(mu.shape, generator=self.generator, device=mu.device).to(mu.dtype)
        z = mu + noise * (0.5 * logvar).exp() if self.training else mu
        return self.decode(z), mu, logvar


def vae_loss(recon: torch.Tensor, target: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor, beta: float):
    """Per-image sums, batch means: (loss, reconstruction MSE, KL). target in [0, 1]."""
    rec = F.mse_loss(recon.float(), target, reduction="none").flatten(1).sum(1).mean()
    kl = (-0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(1)).mean()
    return rec + beta * kl, rec, kl
