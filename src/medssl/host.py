"""What this host has, seen without importing torch (2 s, ~500 MiB) on a CPU-only machine."""
from __future__ import annotations

from pathlib import Path


def has_nvidia_gpu() -> bool:
    """True when the NVIDIA driver lists a GPU (/proc/driver/nvidia/gpus/<bus id>); whether CUDA is usable
    is still torch's to say."""
    gpus = Path("/proc/driver/nvidia/gpus")
    return gpus.is_dir() and any(gpus.iterdir())
