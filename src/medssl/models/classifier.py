"""Classifier = encoder (normalisation inside) + linear head, and the exportable uint8-in / probabilities-out wrapper."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from medssl.models.backbones import build_backbone, reinit_


def to_input(x: torch.Tensor, size: int | None = None) -> torch.Tensor:
    """x: (N, H, W, C) uint8 -> (N, C, size, size) float32 in [0, 1]. The single preprocessing path;
    normalisation lives in the model (Encoder)."""
    x = x.permute(0, 3, 1, 2).float().div(255.0)
    if size is not None and tuple(x.shape[-2:]) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x


class Dropout(nn.Module):
    """nn.Dropout whose mask is drawn from `self.generator` (set by the trainer; None = torch's default),
    so training draws no process-wide random numbers. Identity in eval mode and in the exported graph."""

    def __init__(self, p: float):
        super().__init__()
        self.p, self.generator = p, None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        keep = torch.rand(x.shape, generator=self.generator, device=x.device) >= self.p
        return x * keep.to(x.dtype) / (1 - self.p)


class Classifier(nn.Module):
    """x: (N, C, H, W) float in [0, 1] -> logits (N, num_classes), C = len(mean). Same head for every init."""

    def __init__(self, backbone: str, num_classes: int, dropout: float = 0.2, imagenet: bool = False,
                 mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), gen: torch.Generator | None = None):
        super().__init__()
        self.backbone, dim = build_backbone(backbone, mean, std, imagenet=imagenet, gen=gen)
        self.head = nn.Sequential(Dropout(dropout), nn.Linear(dim, num_classes))
        if gen is not None:
            reinit_(self.head, gen)

    def set_generator(self, gen: torch.Generator | None) -> None:
        self.head[0].generator = gen

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


class ExportModel(nn.Module):
    """Raw images in, probabilities out: x (N, h, w, C) uint8 -> (N, num_classes) float32."""

    def __init__(self, classifier: nn.Module, image_size: int):
        super().__init__()
        self.classifier = classifier
        self.image_size = image_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(to_input(x, self.image_size)).softmax(dim=1)


class ViewAverage(nn.Module):
    """A classifier scored on each image's 8 flips/transposes (the group the training augmentation draws from),
    probabilities averaged: x (N, C, S, S) -> the log of the mean probabilities (N, num_classes), so that softmax
    (as every caller applies to logits) gives the mean. One forward per view: memory as for one view."""

    def __init__(self, classifier: Classifier):
        super().__init__()
        self.classifier = classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        views = [x, x.flip(3), x.flip(2), x.flip(2).flip(3)]
        proba = sum(self.classifier(v).float().softmax(1) for v in views + [v.transpose(2, 3) for v in views])
        return (proba / 8).log()


def with_views(classifier: Classifier, views: int) -> nn.Module:
    """The classifier as it is scored and shipped: itself (views 1) or ViewAverage (views 8; finetune.views)."""
    return ViewAverage(classifier) if views == 8 else classifier
