"""What this host has, seen without importing torch (2 s, ~500 MiB) on a CPU-only machine."""
from __future__ import annotations

from pathlib import Path


ON_GPU = 4  # stages (medssl pipeline, the Prefect flow) or grid shards at once sharing one GPU


def at_once(gpu: bool, cores: int) -> int:
    """How many stages or shards run side by side: ON_GPU on a GPU (kernels of several keep it busy), else one per
    CPU core (each with one torch thread)."""
    return ON_GPU if gpu else max(1, cores)


def has_nvidia_gpu() -> bool:
    """True when the NVIDIA driver lists a GPU (/proc/driver/nvidia/gpus/<bus id>); whether CUDA is usable
    is still torch's to say."""
    gpus = Path("/proc/driver/nvidia/gpus")
    return gpus.is_dir() and any(gpus.iterdir())
