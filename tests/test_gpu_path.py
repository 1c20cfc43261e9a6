"""Faults of the CUDA path that a CPU can catch: tensors a training step makes off the model's device, host syncs
inside the step loop, bf16 where the loss needs fp32, scoring under autocast, a GPU host that would train on the
CPU without saying so."""
from types import SimpleNamespace as NS

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from medssl.core import engine
from medssl.core.engine import Loop, augment, pick_device, train_epoch, warmup_cosine
from medssl.core.methods import METHODS
from medssl.core.train import FitData, FitSpec, finetune
from medssl.errors import DeviceUnavailable
from medssl.models.classifier import Classifier
from medssl.models.simclr import nt_xent

FACTORIES = {torch.arange, torch.rand, torch.randn, torch.randint, torch.randperm, torch.zeros, torch.ones, torch.full,
             torch.empty, torch.tensor, torch.eye, torch.linspace, torch.as_tensor}
SYNCS = {"item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__", "nonzero"}
AUG = NS(hflip=True, vflip=True, rot90=True, strength=0.5)
CFGS = {"vae": NS(latent_dim=16, beta=1.0, lr=1e-3, weight_decay=0.0),
        "simclr": NS(proj_dim=16, temperature=0.5, min_scale=0.2, jitter=0.1, grayscale=0.0, lr=1e-3, weight_decay=0.0),
        "mim": NS(patch=8, mask_ratio=0.6, lr=1e-3, weight_decay=0.0)}


class Recorder(TorchFunctionMode):
    """Every torch factory called without a device (on CUDA: made on the CPU, copied to the GPU every step) and every
    device-to-host read (a sync that stalls the GPU's queue), by the line of medssl code that made it."""

    def __init__(self):
        super().__init__()
        self.off_device, self.syncs = [], []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        where = _caller()
        if where and func in FACTORIES and "device" not in kwargs and not (func in (torch.tensor, torch.as_tensor)
                                                                           and isinstance(args[0], torch.Tensor)):
            self.off_device.append(f"{func.__name__} at {where}")
        if where and getattr(func, "__name__", "") in SYNCS:
            self.syncs.append(f"{func.__name__} at {where}")
        return func(*args, **kwargs)


def _caller() -> str | None:
    """'file:line' of the medssl code that called torch directly, or None when the call came from inside torch (an
    optimizer reading its CPU step counter is no GPU sync) or from this test."""
    import traceback

    for f in reversed(traceback.extract_stack()[:-2]):
        if "/torch/" in f.filename:
            return None
        if "/medssl/" in f.filename and "/tests/" not in f.filename:
            return f"{f.filename.split('/medssl/')[-1]}:{f.lineno}"
        if f.filename != __file__:
            return None
    return None


def images(n=16, size=32, seed=0):
    return torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", sorted(METHODS))
def test_pretraining_step_loop_makes_every_tensor_on_the_device_and_syncs_once_an_epoch(name):
    gen = torch.Generator().manual_seed(0)
    method = METHODS[name](CFGS[name], "mobilenet_v2", 32, [0.5] * 3, [0.25] * 3, gen)
    x = images()
    opt = torch.optim.AdamW(method.model.parameters(), lr=1e-3)
    rec = Recorder()
    with rec:
        train_epoch(method.model, lambda idx: method.loss(augment(x[idx], AUG, gen), gen), len(x),
                    Loop(opt, warmup_cosine(opt, 1, 2), gen, torch.device("cpu"), 8))
    assert rec.off_device == [], f"{name}: tensors made off the model's device inside the step: {rec.off_device}"
    assert rec.syncs == [f"tolist at core/engine.py:{_line_of('*means, first, peak, weight')}"], rec.syncs


def _line_of(text: str) -> int:
    src = engine.__file__
    return next(i for i, line in enumerate(open(src), 1) if text in line)


def test_finetune_step_loop_makes_every_tensor_on_the_device(monkeypatch):
    import medssl.core.train as train

    rec = Recorder()

    def recorded(*a, **k):
        with rec:
            return train_epoch(*a, **k)

    monkeypatch.setattr(train, "train_epoch", recorded)
    x, y = images(24), torch.arange(24) % 3
    cfg = NS(lr=1e-3, weight_decay=0.0, batch_size=8, label_smoothing=0.0, warmup_epochs=0, class_weight="balanced",
             augment=AUG, ema_window=1.0)  # the weight average's update inside the loop too (10 steps)
    model = Classifier("mobilenet_v2", 3, mean=[0.5] * 3, std=[0.25] * 3, gen=torch.Generator().manual_seed(0))
    finetune(model, FitData(train=(x, y), val=(x[:6], y[:6].numpy()), sub=(x[:6], y[:6])),
             FitSpec(cfg=cfg, epochs=2, steps=10, select="balanced_accuracy", classes=["a", "b", "c"], seed=0,
                     device=torch.device("cpu")), quiet=True)
    assert rec.off_device == [], rec.off_device
    assert len(rec.syncs) == 2 and all(s.startswith("tolist at core/engine.py") for s in rec.syncs), rec.syncs


def test_nt_xent_stays_fp32_under_bf16_autocast():
    """The step runs under autocast on CUDA; CPU autocast casts matmul to bf16 the same way. The loss must be the
    fp32 one (1e-6), not bf16's: with views that agree (late in training) at temperature 0.1 the logits near 10 have a
    bf16 spacing of 0.06, and the loss moves by ~5e-4."""
    g = torch.Generator().manual_seed(0)
    z1 = F.normalize(torch.randn(64, 128, generator=g), dim=1)
    z2 = F.normalize(z1 + 0.1 * torch.randn(64, 128, generator=g), dim=1)
    fp32 = nt_xent(z1, z2, 0.1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = nt_xent(z1, z2, 0.1)
        z = torch.cat([z1, z2])
        naive = F.cross_entropy((z @ z.T / 0.1).fill_diagonal_(float("-inf")), (torch.arange(128) + 64) % 128)
    assert mixed.dtype == torch.float32 and abs(mixed.item() - fp32.item()) < 1e-6
    assert abs(naive.item() - fp32.item()) > 2e-4  # what the check guards against: bf16 logits move the loss


def test_simclr_step_under_bf16_autocast_matches_fp32():
    """One SimCLR loss of the same views and weights, fp32 vs bf16 autocast (what CUDA runs): within 2 %."""
    losses = []
    for amp in (False, True):
        gen = torch.Generator().manual_seed(0)
        m = METHODS["simclr"](CFGS["simclr"], "mobilenet_v2", 32, [0.5] * 3, [0.25] * 3, gen)
        m.model.train()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            losses.append(m.loss(images(32), torch.Generator().manual_seed(1))[0].item())
    assert losses[1] == pytest.approx(losses[0], rel=0.02), losses


def test_scores_and_features_are_fp32_whatever_the_device(monkeypatch):
    """forward_all runs outside autocast: were CUDA's bf16 autocast in force, features would be bf16-rounded."""
    monkeypatch.setattr(engine, "autocast", lambda device: torch.autocast("cpu", dtype=torch.bfloat16))
    enc = Classifier("mobilenet_v2", 3, mean=[0.5] * 3, std=[0.25] * 3, gen=torch.Generator().manual_seed(0)).backbone.eval()
    x = images(8)
    feats = engine.extract_features(enc, x)
    with torch.no_grad():
        ref = enc(engine.to_input(x).contiguous(memory_format=torch.channels_last))
    assert feats.dtype == torch.float32 and torch.equal(feats, ref)


def test_a_gpu_host_that_cannot_use_cuda_fails_in_one_line(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("MEDSSL_DEVICE", "cuda")
    with pytest.raises(DeviceUnavailable, match="MEDSSL_DEVICE=cuda but torch .* MEDSSL_DEVICE=cpu trains on the CPU"):
        pick_device()
    monkeypatch.delenv("MEDSSL_DEVICE")
    monkeypatch.setattr("medssl.host.has_nvidia_gpu", lambda: True)
    with pytest.raises(DeviceUnavailable, match="the NVIDIA driver lists a GPU but"):
        pick_device()
    monkeypatch.setenv("MEDSSL_DEVICE", "cpu")
    assert pick_device().type == "cpu"
    monkeypatch.setenv("MEDSSL_DEVICE", "tpu")
    with pytest.raises(ValueError, match="MEDSSL_DEVICE='tpu': expected cpu or cuda"):
        pick_device()


def test_doctor_on_this_host_and_on_a_claimed_gpu(tmp_path):
    import os
    import subprocess
    import sys

    run = lambda env: subprocess.run([sys.executable, "-m", "medssl.cli", "doctor"], capture_output=True, text=True,
                                     env={**os.environ, "OMP_NUM_THREADS": "1", **env}, timeout=300)
    if torch.cuda.is_available():
        r = run({})
        assert r.returncode == 0 and "CUDAExecutionProvider" in r.stderr, r.stderr
        return
    r = run({"MEDSSL_DEVICE": "cpu"})
    assert r.returncode == 0, r.stderr
    assert "onnxruntime session providers: CPUExecutionProvider" in r.stderr and "images/s" in r.stderr
    assert "CPU host: the stages run on cpu (CPU)" in r.stderr
    r = run({"MEDSSL_DEVICE": "cuda"})
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1].startswith("error: a GPU is claimed but would not be used: device: MEDSSL_DEVICE=cuda")


def test_a_gpu_host_with_the_cpu_build_of_onnxruntime_fails_naming_both_ways_out():
    """A GPU host whose onnxruntime is the CPU build (as a stock PyTorch image has) failed `medssl doctor` with no way
    to say that is meant, so `benchmarks/gpu_host.sh` stopped before any training."""
    from medssl.doctor import ONNX_CPU_ENV, onnx_finding

    cpu, both = ["CPUExecutionProvider"], ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert onnx_finding(both, claimed=True, cpu_ok=False).ok and onnx_finding(cpu, claimed=False, cpu_ok=False).ok
    refused = onnx_finding(cpu, claimed=True, cpu_ok=False)
    assert not refused.ok and "install onnxruntime-gpu" in refused.value and f"{ONNX_CPU_ENV}=1" in refused.value
    meant = onnx_finding(cpu, claimed=True, cpu_ok=True)
    assert meant.ok and meant.value.startswith("CPUExecutionProvider (MEDSSL_ONNX_CPU=1")


def test_a_state_a_cuda_run_left_is_discarded_on_the_cpu_never_restored(tmp_path, capsys):
    """A CUDA generator's state (16 bytes: seed and offset) set into a CPU generator raises: the resume key's device
    keeps such a state from ever reaching `set_state`, and the stage starts over with one line saying why."""
    from medssl.core.train import _restore
    from medssl.resume import Checkpointer

    cuda_gen_state = torch.tensor(list(range(16)), dtype=torch.uint8)  # what torch.Generator("cuda").get_state() holds
    with pytest.raises(RuntimeError):
        torch.Generator().set_state(cuda_gen_state)
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters())
    sched = warmup_cosine(opt, 1, 4)
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
             "generator": cuda_gen_state, "epoch": 1}
    with pytest.raises(RuntimeError):
        _restore(state, model, Loop(opt, sched, torch.Generator(), torch.device("cpu"), 1))
    key = {"stage": "finetune", "init": "imagenet", "data": "d"}
    Checkpointer(tmp_path / "finetune-imagenet.pt", {**key, "device": "cuda"}).save(state)
    capsys.readouterr()
    assert Checkpointer(tmp_path / "finetune-imagenet.pt", {**key, "device": "cpu"}).load() is None
    line = capsys.readouterr().err.strip()
    assert line.endswith("left by a run with other device; starting over"), line
    again = Checkpointer(tmp_path / "finetune-imagenet.pt", {**key, "device": "cuda"}).load()  # on its own device: resumed
    assert torch.equal(again["generator"], cuda_gen_state)


def test_predictor_doctor_and_the_benchmark_ask_onnx_runtime_for_cuda_one_way(monkeypatch):
    """`medssl doctor` and the benchmark asked for CUDA without first loading the CUDA libraries torch's wheels carry
    (Predictor did), so on a GPU doctor could report the provider missing where Predictor loads it, or the reverse.
    All three ask through inference.onnx_providers; where CUDA does not load (this host), the benchmark says it
    skipped instead of timing the CPU as CUDA."""
    import onnxruntime as ort

    from benchmarks.__main__ import onnx_vs_eager
    from medssl import doctor, inference

    loads, asked, session = [], [], ort.InferenceSession
    preload = getattr(ort, "preload_dlls", lambda *a, **k: None)
    monkeypatch.setattr(ort, "preload_dlls", lambda *a, **k: (loads.append(1), preload(*a, **k)), raising=False)
    monkeypatch.setattr(ort, "InferenceSession", lambda *a, providers, **k: (asked.append(providers), session(*a, providers=providers, **k))[1])
    both = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert inference.onnx_providers(cuda=False) == ["CPUExecutionProvider"] and not loads
    assert inference.onnx_providers(cuda=True) == both and len(loads) == 1
    _, used = doctor._onnx_session_providers(want_cuda=True)
    assert len(loads) == 2 and asked == [both]
    res = onnx_vs_eager(torch.device("cuda"), batches=(1,))
    assert len(loads) == 3 and asked == [both, both]
    if "CUDAExecutionProvider" not in used:
        assert list(res) == ["skipped"] and res["skipped"].startswith("CUDAExecutionProvider did not load"), res
    else:
        assert res[1]["onnx_images_per_s"] > 0


def test_resume_keys_of_the_stages_name_the_device(tmp_path):
    """The stages' own key (not a hand-made one) differs between devices, so a CUDA run's state never reaches a CPU
    run's `set_state` (test above)."""
    from medssl.config import load_params
    from medssl.layout import Layout
    from medssl.resume import resume_key

    p, lay, meta = load_params("params.yaml"), Layout(tmp_path), {"prepared_digest": "d", "n": {"train": 7007}}
    for stage, init in (("pretrain", "simclr"), ("finetune", "imagenet"), ("grid", "random")):
        cpu, cuda = (resume_key(p.for_init(init), stage, init, meta, lay, d) for d in ("cpu", torch.device("cuda", 0)))
        assert cpu.pop("device") == "cpu" and cuda.pop("device") == "cuda" and cpu == cuda


def test_the_benchmarks_naive_baseline_feeds_nchw(monkeypatch):
    """The naive loops' inputs are NCHW in memory (to_input's permute alone is NHWC in memory, which made the
    'naive NCHW' baseline channels_last and its ratio to medssl's channels_last meaningless); medssl's are
    channels_last."""
    import benchmarks.__main__ as bm

    nchw = []

    class Recording(bm.Classifier):
        def forward(self, x):
            nchw.append(x.is_contiguous())
            return super().forward(x)

    monkeypatch.setattr(bm, "Classifier", Recording)
    x, y = bm.data(8, 32)
    bm.train_naive("finetune", x, y, 4, torch.device("cpu"))
    assert nchw and all(nchw)
    nchw.clear()
    bm.infer(x, 4, torch.device("cpu"), features=False)  # medssl's way, then the naive one
    assert nchw[:2] == [False, False] and nchw[-2:] == [True, True], nchw


@pytest.mark.parametrize("codes, calls, rc", [([124, 124, 0], 3, 0), ([1], 1, 1), ([124, 137], 2, 137), ([3], 1, 3)])
def test_the_full_budget_recipe_retries_after_a_time_out_only(tmp_path, codes, calls, rc):
    """docs/gpu.md's `run` (the full budget in slices): its first form retried forever on a real failure (out of
    memory, a bad value). Run as written there, over a stand-in `medssl` that exits with `codes` in turn."""
    import subprocess
    from pathlib import Path

    doc = Path("docs/gpu.md").read_text().splitlines()
    start = next(i for i, line in enumerate(doc) if line.startswith("run() {"))
    end = next(i for i in range(start, len(doc)) if doc[i].rstrip().endswith("; }"))
    (tmp_path / ".venv/bin").mkdir(parents=True)
    stub = tmp_path / ".venv/bin/medssl"
    stub.write_text(f'#!/bin/bash\nn=$(($(cat n 2>/dev/null || echo 0) + 1)); echo $n > n\ncodes=({" ".join(map(str, codes))})\n'
                    f'echo "$@" >> args\nexit ${{codes[$((n - 1))]}}\n')
    stub.chmod(0o755)
    r = subprocess.run(["bash", "-c", "\n".join(doc[start : end + 1]) + "\nrun grid imagenet"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == rc and (tmp_path / "args").read_text() == "grid imagenet\n" * calls, r


def test_fusion_probes_run_on_the_picked_device(tmp_path, monkeypatch):
    """The 36 fusion probes ran on the CPU whatever the device; their features now go to pick_device()'s (here a
    stand-in device, `meta`, that only a deliberate move reaches)."""
    import numpy as np

    from medssl import fusion
    from medssl.config import load_params
    from medssl.checkpoints import encoder_seed_of
    from medssl.layout import Layout

    p, lay = load_params("params.yaml"), Layout(tmp_path)
    rng = np.random.default_rng(0)
    y = {s: np.arange(n) % 7 for s, n in (("pool", 14), ("val", 7), ("test", 7))}
    for init in {i for group in p.grid.fusion for i in group}:
        arrays = {f"{s}_x_s{encoder_seed_of(p, init, seed)}": rng.random((len(v), 4), dtype=np.float32)
                  for s, v in y.items() for seed in p.grid.seeds}
        arrays |= {f"{s}_y": v for s, v in y.items()}
        arrays |= {f"subset_fractions_f{f:g}_s{seed}": np.arange(14) for f in p.grid.fractions for seed in p.grid.seeds}
        lay.grid_features(init).parent.mkdir(parents=True)
        np.savez(lay.grid_features(init), **arrays)
    devices = []
    monkeypatch.setattr(fusion, "read_grid", lambda *a: None)  # features only here: no grid records to check

    def probe(job, x, data, **kw):
        devices.extend(v.device.type for v in x.values())
        return {}, {}

    monkeypatch.setattr(fusion, "pick_device", lambda: torch.device("meta"))
    monkeypatch.setattr(fusion, "probe_cell", probe)
    cells, _ = fusion.fusion_cells(p, [str(c) for c in range(7)], lay)
    assert len(cells) == len(p.grid.fusion) * len(p.grid.seeds) * len(p.grid.fractions)
    assert devices and set(devices) == {"meta"}


def test_the_one_gpu_command_runs_in_the_projects_venv_without_a_bundle(tmp_path):
    """`benchmarks/gpu_host.sh` needed `make gpu-bundle`'s .gpu/ even on a workstation whose .venv has everything
    (`make gpu-run`): without .gpu/ it now runs in .venv, and with neither it says both ways in one line. A
    one-second slice stops it before doctor, after the params are validated in .venv's Python."""
    import os
    import subprocess

    from conftest import ROOT, project_copy

    proj = project_copy(tmp_path / "proj")
    call = lambda: subprocess.run(["bash", "benchmarks/gpu_host.sh", "budget=demo"], cwd=proj, capture_output=True,
                                  text=True, timeout=300, env={**os.environ, "MEDSSL_SLICE": "1"})
    r = call()
    assert r.returncode == 2 and r.stderr.strip() == ("neither .gpu/whl nor .venv: run `make gpu-bundle` where PyPI is "
                                                      "reachable and carry .gpu, or `make env weights` here"), r.stderr
    # .venv/bin/python: the project's interpreter behind a wrapper that records each call
    (proj / ".venv/bin").mkdir(parents=True)
    wrapper = proj / ".venv/bin/python"
    wrapper.write_text(f'#!/bin/bash\necho "$@" >> "{proj}/calls"\nexec {ROOT}/.venv/bin/python "$@"\n')
    wrapper.chmod(0o755)
    r = call()
    assert r.returncode == 4, r.stderr
    assert r.stderr.startswith(f"running in {wrapper} ") and "budget demo at 32 px" in r.stderr, r.stderr
    assert (proj / "calls").read_text().startswith("- .medssl/gpu_host/params.yaml budget=demo")  # the params check
    (proj / "calls").unlink()
    (proj / ".gpu/whl").mkdir(parents=True)  # a bundle present: `make gpu-run` (MEDSSL_PYTHON) still uses .venv
    r = subprocess.run(["make", "-s", "-o", "weights", "gpu-run", "ARGS=budget=demo", f"BIN={proj}/.venv/bin"], cwd=proj,
                       capture_output=True, text=True, timeout=300, env={**os.environ, "MEDSSL_SLICE": "1"})
    assert "running in " + str(wrapper) in r.stderr and "budget demo at 32 px" in r.stderr, r.stderr
    assert (proj / "calls").read_text().startswith("- .medssl/gpu_host/params.yaml budget=demo")
