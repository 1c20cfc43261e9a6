"""Classifier = backbone + linear head, and the exportable uint8-in / probabilities-out wrapper."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from medssl.models.backbones import build_backbone


def to_input(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, size: int | None = None) -> torch.Tensor:
    """x: (N, H, W, 3) uint8 -> (N, 3, size, size) float32, normalised. The single preprocessing path."""
    x = x.permute(0, 3, 1, 2).float().div(255.0)
    if size is not None and tuple(x.shape[-2:]) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return (x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)


class Classifier(nn.Module):
    """x: (N, 3, H, W) normalised float -> logits (N, num_classes). Same head for every init."""

    def __init__(self, backbone: str, num_classes: int, dropout: float = 0.2, imagenet: bool = False):
        super().__init__()
        self.backbone, dim = build_backbone(backbone, imagenet=imagenet)
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(dim, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


class ExportModel(nn.Module):
    """Raw images in, probabilities out: x (N, h, w, 3) uint8 -> (N, num_classes) float32."""

    def __init__(self, classifier: Classifier, mean: list[float], std: list[float], image_size: int):
        super().__init__()
        self.classifier = classifier
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32))
        self.image_size = image_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(to_input(x, self.mean, self.std, self.image_size)).softmax(dim=1)
