"""The one epoch loop (pretraining and fine-tuning alike) over device-resident uint8 tensors.

No DataLoader (the data fits in device memory), no host sync inside the step loop: losses are summed
on the device and read once per epoch.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm import tqdm

from medssl.errors import DataError, DeviceUnavailable, Diverged, UsageError
from medssl.models.classifier import to_input

# step(idx) -> (loss, {name: scalar tensor}); idx: (B,) int64 positions on the data's device
Step = Callable[[torch.Tensor], tuple[torch.Tensor, dict[str, torch.Tensor]]]


def autocast(device: torch.device):
    """bf16 mixed precision on CUDA; full precision on CPU (bf16 is slower than fp32 on most CPUs)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def prepare_model(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    # channels_last: tensor cores on CUDA, faster oneDNN convolutions on CPUs
    return model.to(device).to(memory_format=torch.channels_last)


def augment(x: torch.Tensor, cfg, gen: torch.Generator) -> torch.Tensor:
    """Per-image random flips / 90-degree rotations on the data's device. x: (N, H, W, 3) uint8, square images;
    cfg: hflip, vflip, rot90, strength (probability of each); gen lives on x's device."""
    n = x.shape[0]

    def coin() -> torch.Tensor:
        return (torch.rand(n, generator=gen, device=gen.device) < cfg.strength).to(x.device).view(n, 1, 1, 1)

    if cfg.hflip:
        x = torch.where(coin(), x.flip(2), x)
    if cfg.vflip:
        x = torch.where(coin(), x.flip(1), x)
    if cfg.rot90:
        x = torch.where(coin(), x.transpose(1, 2), x)  # with the flips this covers all 8 dihedral views
    return x


def batches(n: int, batch_size: int, gen: torch.Generator | None, device: torch.device):
    """Index batches of a random (gen) or sequential (None) order; a last batch of one is dropped (BatchNorm)."""
    order = torch.randperm(n, generator=gen, device=gen.device).to(device) if gen is not None \
        else torch.arange(n, device=device)
    for i in range(0, n, batch_size):
        idx = order[i : i + batch_size]
        if gen is None or len(idx) >= 2:
            yield idx


EXPLODE = 1e4       # a step loss this many times the run's first step loss counts as exploding
MAX_WEIGHT = 1e6    # so does a parameter of this magnitude (trained weights stay within ~1e2)


@dataclass
class Loop:
    """What one epoch steps with: the optimiser, its per-step schedule (or None), the generator of every draw (on
    the data's device), the device and the batch size; `ema`, an exponential moving average of the weights
    (torch.optim.swa_utils.AveragedModel) updated after every step, or None."""
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler | None
    gen: torch.Generator
    device: torch.device
    batch_size: int
    ema: torch.nn.Module | None = None


def train_epoch(model: torch.nn.Module, step: Step, n: int, loop: Loop, *, desc: str = "train", epoch: int = 1,
                ref_loss: float | None = None) -> dict[str, float]:
    """One pass over n examples in random order; returns the example-weighted mean of the loss and its parts,
    and `first_step_loss` (the reference for later epochs' `ref_loss`).

    Raises Diverged ("diverged at epoch N (loss ...)") when a step loss is non-finite or exceeds EXPLODE x the
    reference (`ref_loss`, else this epoch's first step), or a weight exceeds MAX_WEIGHT; read in the one sync."""
    model.train()
    sums, seen, first, peak = None, 0, None, None
    for idx in tqdm(list(batches(n, loop.batch_size, loop.gen, loop.device)), desc=desc, leave=False, disable=None):
        with autocast(loop.device):
            loss, parts = step(idx)
        loop.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        loop.optimizer.step()
        if loop.scheduler is not None:
            loop.scheduler.step()
        if loop.ema is not None:
            loop.ema.update_parameters(model)
        vals = torch.stack([loss.detach().float(), *(v.detach().float() for v in parts.values())]) * len(idx)
        sums = vals if sums is None else sums + vals
        step_loss = loss.detach().float()
        first = step_loss if first is None else first
        peak = step_loss if peak is None else torch.maximum(peak, step_loss.nan_to_num(nan=float("inf")))
        seen += len(idx)
    if sums is None:
        raise DataError(f"{desc}: {n} examples make no batch of two")
    weight = torch.stack([q.detach().abs().max().float() for q in model.parameters()]).max()
    *means, first, peak, weight = torch.cat([sums / seen, torch.stack([first, peak, weight])]).tolist()  # the one sync
    ref = first if ref_loss is None else ref_loss
    out = dict(zip(["loss", *parts], means))
    if not (math.isfinite(peak) and math.isfinite(weight) and all(map(math.isfinite, means))) \
            or abs(peak) > EXPLODE * max(abs(ref), 1e-3) or weight > MAX_WEIGHT:
        raise Diverged(f"{desc}: diverged at epoch {epoch} (loss {out['loss']:.3g}, largest step loss {peak:.3g} vs "
                       f"first {ref:.3g}, largest weight {weight:.3g}); lower the learning rate")
    return {**out, "first_step_loss": first}


@torch.no_grad()
def forward_all(fn: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """fn over images (N, S, S, 3) uint8 in batches, as float in [0, 1] -> (N, ...) float32 on the device.

    In fp32 on every device, never under autocast: frozen features and scored probabilities are what the probes,
    k-NN, selection and reports read, and bf16 rounding (8 bits of mantissa) would make a GPU's scores differ from
    a CPU's by more than rounding. Scoring is a small part of a run; training steps keep bf16 on CUDA."""
    out = []
    for idx in batches(len(images), batch_size, None, images.device):
        out.append(fn(to_input(images[idx]).contiguous(memory_format=torch.channels_last)).float())
    return torch.cat(out)


def predict_proba(model: torch.nn.Module, images: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """images: (N, S, S, 3) uint8 on the model's device -> probabilities (N, C) float32 on that device."""
    model.eval()
    return forward_all(lambda x: model(x).float().softmax(1), images, batch_size)


def extract_features(encoder: torch.nn.Module, images: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """images: (N, S, S, 3) uint8 -> (N, D) float32 pooled features of the frozen encoder (eval mode), on the device."""
    encoder.eval()
    return forward_all(encoder, images, batch_size)


def warmup_cosine(opt: torch.optim.Optimizer, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up for `warmup` steps, then cosine decay to zero at `total` steps."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


DEVICE_ENV = "MEDSSL_DEVICE"  # cpu | cuda: the device a stage must run on; unset: CUDA when usable, else the CPU


def pick_device() -> torch.device:
    """The device the stages train on. Never a silent CPU run on a GPU host: when the NVIDIA driver lists a GPU
    (or MEDSSL_DEVICE=cuda) but torch cannot use CUDA, a one-line error says so; MEDSSL_DEVICE=cpu runs on the
    CPU on purpose. On CUDA, cuDNN picks its fastest kernels for the run's fixed shapes (cudnn.benchmark)."""
    import os

    from medssl.host import has_nvidia_gpu

    want = os.environ.get(DEVICE_ENV, "").strip().lower()
    if want not in ("", "cpu", "cuda"):
        raise UsageError(f"{DEVICE_ENV}={want!r}: expected cpu or cuda (unset: CUDA when usable, else the CPU)")
    if want == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True
        return torch.device("cuda")
    if want == "cuda" or has_nvidia_gpu():
        why = f"torch {torch.__version__} built without CUDA" if torch.version.cuda is None \
            else f"torch {torch.__version__} (CUDA {torch.version.cuda}) cannot initialise the GPU (driver too old, or CUDA_VISIBLE_DEVICES empty)"
        src = f"{DEVICE_ENV}=cuda" if want == "cuda" else "the NVIDIA driver lists a GPU"
        raise DeviceUnavailable(f"{src} but {why}; `medssl doctor` says more, {DEVICE_ENV}=cpu trains on the CPU")
    return torch.device("cpu")


@contextlib.contextmanager
def one_torch_thread(device):
    """On a CPU, one torch thread for the block (restored afterwards): what a unit of work computes then does not
    depend on how many cores it was given (the reduction order of a multi-threaded backward pass does), and units
    side by side, one per core (grid shards, stages under `medssl pipeline`), never oversubscribe the cores."""
    if torch.device(device).type == "cuda":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
