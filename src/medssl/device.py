"""Device choice: CUDA with bf16 mixed precision when present, else CPU; channels_last on both."""
from __future__ import annotations

import contextlib
import random

import numpy as np
import torch


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def prepare_model(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    # channels_last: tensor cores on CUDA, ~1.7x faster oneDNN convolutions on AVX-512 CPUs
    return model.to(device).to(memory_format=torch.channels_last)


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)
