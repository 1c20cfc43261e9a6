"""`medssl doctor`: what this host gives the stages — the device, ONNX Runtime's providers as a session really
loads them, a training step's throughput — and a one-line failure where a GPU is claimed but would not be used.

A host claims a GPU when the NVIDIA driver lists one or MEDSSL_DEVICE=cuda. Then every check must pass:
torch uses CUDA, an ONNX Runtime session on the CUDA provider keeps it (`get_providers()` of the session, not the
compiled-in `get_available_providers()`, which lists CUDA even when its libraries fail to load; or MEDSSL_ONNX_CPU=1
says the host's CPU build is meant), and a MobileNetV2
training step runs at GPU speed (at least GPU_MIN_IMAGES_S images/s at 32 px, batch 128; a 2-core CPU manages
~150-500) — never a silent CPU run.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

GPU_MIN_IMAGES_S = 2000.0  # an H100 does > 10,000 at this shape (launch-bound); a CPU core ~150-500
# 1: this GPU host's onnxruntime is the CPU build, and that is meant: ONNX Runtime only checks the exported model's
# parity and serves `medssl predict` / `serve`; no training or grid step uses it
ONNX_CPU_ENV = "MEDSSL_ONNX_CPU"


@dataclass
class Finding:
    name: str
    value: str
    ok: bool = True


@dataclass
class Report:
    gpu_claimed: bool
    findings: list[Finding] = field(default_factory=list)

    @property
    def failures(self) -> list[Finding]:
        return [f for f in self.findings if not f.ok]


def _onnx_session_providers(want_cuda: bool) -> tuple[list[str], list[str]]:
    """(compiled-in providers, providers of a real session on a one-node graph)."""
    import tempfile

    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from medssl.inference import onnx_providers

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "doctor",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = min(model.ir_version, 9)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "doctor.onnx")
        onnx.save(model, path)
        asked = onnx_providers(cuda=want_cuda or None)
        sess = ort.InferenceSession(path, providers=asked)
        return ort.get_available_providers(), sess.get_providers()


def onnx_finding(used: list[str], claimed: bool, cpu_ok: bool) -> Finding:
    """The ONNX Runtime check: on a host that claims a GPU, CUDA must be among a real session's providers, unless
    ONNX_CPU_ENV says the CPU build is meant; the failure names both ways out."""
    name, found = "onnxruntime session providers", ", ".join(used)
    if "CUDAExecutionProvider" in used or not claimed:
        return Finding(name, found)
    if cpu_ok:
        return Finding(name, f"{found} ({ONNX_CPU_ENV}=1: export's parity check and predict run ONNX Runtime on the CPU)")
    return Finding(name, f"{found}, no CUDA provider: install onnxruntime-gpu (docs/gpu.md), or set {ONNX_CPU_ENV}=1 "
                         f"to run ONNX Runtime on the CPU", False)


def training_throughput(device, steps: int = 6, batch: int = 128, size: int = 32) -> float:
    """Images per second of MobileNetV2 training steps (random weights, random images) on `device`, after warm-up."""
    import torch
    import torch.nn.functional as F

    from medssl.core.engine import autocast, prepare_model
    from medssl.models.classifier import Classifier

    model = prepare_model(Classifier("mobilenet_v2", 7, gen=torch.Generator().manual_seed(0)), device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.rand(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 7, (batch,), device=device)

    def run(n):
        for _ in range(n):
            with autocast(device):
                loss = F.cross_entropy(model(x).float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()

    run(2)
    t0 = time.perf_counter()
    run(steps)
    return steps * batch / (time.perf_counter() - t0)


def diagnose() -> Report:
    import torch

    from medssl.core.engine import DEVICE_ENV, pick_device
    from medssl.errors import DeviceUnavailable
    from medssl.host import has_nvidia_gpu

    want = os.environ.get(DEVICE_ENV, "").strip().lower()
    claimed = want == "cuda" or (want != "cpu" and has_nvidia_gpu())
    r = Report(claimed)
    add = lambda *a: r.findings.append(Finding(*a))
    add("torch", f"{torch.__version__} (CUDA {torch.version.cuda or 'none'}), {torch.get_num_threads()} threads")
    add("NVIDIA driver lists a GPU", str(has_nvidia_gpu()))
    try:
        device = pick_device()
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
        add("device", f"{device} ({name})", device.type == "cuda" or not claimed)
    except (DeviceUnavailable, ValueError) as e:
        add("device", str(e), False)
        return r
    try:
        available, used = _onnx_session_providers(claimed)
        add("onnxruntime providers (compiled in)", ", ".join(available))
        r.findings.append(onnx_finding(used, claimed, os.environ.get(ONNX_CPU_ENV, "").strip() == "1"))
    except Exception as e:  # a provider library that fails to load, a broken wheel
        add("onnxruntime session", f"{type(e).__name__}: {str(e).splitlines()[0][:200]}", False)
    rate = training_throughput(device)
    add("MobileNetV2 training step, 32 px, batch 128", f"{rate:,.0f} images/s",
        device.type != "cuda" or rate >= GPU_MIN_IMAGES_S)
    return r
