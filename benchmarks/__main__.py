"""`python -m benchmarks`: images per second of every hot loop, medssl's way and the naive way, in one run.

medssl's way (medssl.core): uint8 data resident on the device, augmentation on the device, channels_last,
bf16 autocast on CUDA, no host sync inside the step loop; probes in torch on the device.
Naive: a torch DataLoader over CPU tensors, a host-to-device copy per batch, fp32, NCHW, `.item()` every
step; probes in scikit-learn. Plus ONNX Runtime against eager PyTorch for batch inference.
Needs only PyTorch, torchvision, numpy, scikit-learn and onnxruntime (runs on a bare GPU host with
PYTHONPATH=src). Writes benchmarks/results/<device>_<date>_<commit>.{json,md} (device: cpu, cpu-avx512 or
cuda-<GPU name>).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace as NS

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.index import write_index
from medssl.core.engine import Loop, augment, extract_features, predict_proba, prepare_model, train_epoch
from medssl.core.methods import METHODS
from medssl.core.probes import knn_probe, linear_probe
from medssl.core.rng import generator
from medssl.models.classifier import Classifier, ExportModel, to_input

AUG = NS(hflip=True, vflip=True, rot90=True, strength=0.5)
CFG = {"vae": NS(latent_dim=128, beta=1.0), "simclr": NS(proj_dim=128, temperature=0.5, min_scale=0.2, jitter=0.1, grayscale=0.0),
       "mim": NS(patch=8, mask_ratio=0.6)}
MEAN, STD = [0.76, 0.54, 0.57], [0.14, 0.15, 0.17]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeat: int | None = None) -> float:
    """Median seconds per call of `repeat` timed calls after one warm-up call (default: 5 on CUDA, where a call
    is short and launch timing noisy; 1 on a CPU, where one call of the sizes below takes tens of seconds)."""
    fn()
    sync(device)
    times = []
    for _ in range(repeat or (5 if torch.device(device).type == "cuda" else 1)):
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def data(n: int, size: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 7, (n,), generator=g)
    return x, y


def make(kind: str, size: int):
    gen = generator(0)
    if kind == "finetune":
        return Classifier("mobilenet_v2", 7, mean=MEAN, std=STD, gen=gen)
    return METHODS[kind](CFG[kind], "mobilenet_v2", size, MEAN, STD, gen)


def train_fast(kind, x, y, bs, device):
    """One epoch of medssl's engine over device-resident uint8 images: images/s."""
    obj = make(kind, x.shape[1])
    model = prepare_model(obj if kind == "finetune" else obj.model, device)
    gen = generator(0, device)
    xd, yd = x.to(device), y.to(device)
    opt = torch.optim.AdamW(model.parameters(), 1e-3)
    if kind == "finetune":
        model.set_generator(gen)

        def step(idx):
            xb = augment(xd[idx], AUG, gen)
            return F.cross_entropy(model(to_input(xb).contiguous(memory_format=torch.channels_last)).float(), yd[idx]), {}
    else:
        def step(idx):
            return obj.loss(augment(xd[idx], AUG, gen), gen)
    return len(x) / timed(lambda: train_epoch(model, step, len(x), Loop(opt, None, gen, device, bs), desc=kind), device)


def train_naive(kind, x, y, bs, device):
    """One epoch the usual way: DataLoader over CPU tensors, per-batch copy, fp32, NCHW, .item() per step."""
    obj = make(kind, x.shape[1])
    model = (obj if kind == "finetune" else obj.model).to(device)
    gen = generator(0, device)
    opt = torch.optim.AdamW(model.parameters(), 1e-3)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=bs, shuffle=True, drop_last=True)

    def epoch():
        model.train()
        total = 0.0
        for xb, yb in loader:
            xb = augment(xb, AUG, torch.Generator().manual_seed(0)).to(device)
            yb = yb.to(device)
            if kind == "finetune":
                loss = F.cross_entropy(model(to_input(xb).contiguous()), yb)  # NCHW (to_input's permute alone is NHWC in memory)
            else:
                loss, _ = obj.loss(xb, gen)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item()
        return total

    return len(loader) * bs / timed(epoch, device)


def infer(x, bs, device, features: bool):
    """Evaluation / feature extraction: medssl's way vs DataLoader + per-batch copy + fp32 NCHW + .cpu() per batch."""
    clf = Classifier("mobilenet_v2", 7, mean=MEAN, std=STD, gen=generator(0))
    fast_m = prepare_model(Classifier("mobilenet_v2", 7, mean=MEAN, std=STD, gen=generator(0)), device).eval()
    naive_m = clf.to(device).eval()
    xd = x.to(device)
    fast = (lambda: extract_features(fast_m.backbone, xd, bs)) if features else (lambda: predict_proba(fast_m, xd, bs))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), batch_size=bs)

    @torch.no_grad()
    def naive():
        out = []
        for (xb,) in loader:
            xb = to_input(xb.to(device)).contiguous()  # NCHW in memory
            out.append((naive_m.backbone(xb) if features else naive_m(xb).softmax(1)).cpu())
        return torch.cat(out)

    return len(x) / timed(fast, device), len(x) / timed(naive, device)


def features(n: int, d: int, device, seed: int = 0):
    """Features like a CNN encoder's (N, D): non-negative, correlated (64 latent factors with weak class structure,
    through a ReLU), so the probe's problem is as ill-conditioned as on real features; DermaMNIST's class shares."""
    rng = np.random.default_rng(seed)
    y = rng.choice(7, n, p=[0.033, 0.051, 0.11, 0.011, 0.111, 0.669, 0.015])
    z = rng.normal(size=(7, 64))[y] * 0.3 + rng.normal(size=(n, 64))
    x = np.maximum(z @ rng.normal(size=(64, d)), 0) + 0.05 * rng.normal(size=(n, d))
    return x.astype(np.float32), y


def grid_cell(x, y, device, fraction: float):
    """One grid fine-tune cell on `fraction` of the pool, scored on a 1,024-image validation set: medssl's (a fixed
    number of optimizer steps, the train-val gap on a fixed 256-image part) against the naive one (epochs over the
    subset, the whole subset scored after each). Seconds per cell."""
    from medssl.core.train import FitData, FitSpec, finetune

    n = max(32, int(len(x) * fraction))
    tr = (x[:n].to(device), y[:n].to(device))
    val = (x[:1024].to(device), y[:1024].numpy())
    cfg = NS(lr=1e-3, weight_decay=1e-4, batch_size=32, label_smoothing=0.0, warmup_epochs=0, class_weight="balanced",
             augment=AUG, ema_window=0.0)
    classes = [str(i) for i in range(7)]
    run = lambda sub, epochs, steps: finetune(
        make("finetune", x.shape[1]), FitData(train=tr, val=val, sub=sub),
        FitSpec(cfg=cfg, epochs=epochs, steps=steps, select="balanced_accuracy", classes=classes, seed=0, device=device),
        quiet=True)
    fast = timed(lambda: run((tr[0][:256], tr[1][:256]), 3, 96), device)
    naive = timed(lambda: run(tr, 3, None), device)
    return fast, naive


def shard_features(x, device, shards: int = 3):
    """Frozen features of one encoder for `shards` grid seeds: extracted once and shared (medssl) vs once per shard."""
    enc = prepare_model(make("finetune", x.shape[1]).backbone, device)
    xd = x.to(device)
    return timed(lambda: extract_features(enc, xd), device), timed(lambda: [extract_features(enc, xd) for _ in range(shards)], device)


def probes(n_train: int, n_eval: int, d: int, device):
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.preprocessing import StandardScaler

    x, y = features(n_train + n_eval, d, device)
    tx, ty, ex = torch.from_numpy(x[:n_train]).to(device), torch.from_numpy(y[:n_train]).to(device), torch.from_numpy(x[n_train:]).to(device)
    out = {}
    out["linear_torch"] = (timed(lambda: linear_probe(tx, ty, ex, 7, 1.0, "balanced", "torch"), device),
                           timed(lambda: LogisticRegression(C=1.0, max_iter=2000, class_weight="balanced").fit(
                               StandardScaler().fit_transform(x[:n_train]), y[:n_train]), device))
    out["linear"] = (timed(lambda: linear_probe(tx, ty, ex, 7, 1.0, "balanced"), device),
                     timed(lambda: LogisticRegression(C=1.0, max_iter=2000, class_weight="balanced").fit(
                         StandardScaler().fit_transform(x[:n_train]), y[:n_train]), device))
    out["knn"] = (timed(lambda: knn_probe(tx, ty, ex, 7, 20), device),
                  timed(lambda: KNeighborsClassifier(20, metric="cosine", weights="distance").fit(x[:n_train], y[:n_train])
                        .predict_proba(x[n_train:]), device))
    return out


def onnx_vs_eager(device, batches=(1, 64, 256), raw: int = 28, size: int = 64):
    """ExportModel (uint8 in, probabilities out) in eager PyTorch vs ONNX Runtime, same device."""
    import onnxruntime as ort

    from medssl.core.onnx import export_onnx
    from medssl.inference import onnx_providers

    model = ExportModel(Classifier("mobilenet_v2", 7, mean=MEAN, std=STD, gen=generator(0)), size).eval()
    x = data(max(batches), raw)[0].numpy()
    providers = onnx_providers(cuda=device.type == "cuda")  # as Predictor and `medssl doctor` ask for them
    sess = ort.InferenceSession(export_onnx(model, x[:2]).SerializeToString(), providers=providers)
    if providers[0] not in sess.get_providers():  # compiled in is not loaded: ORT falls back to the CPU
        return {"skipped": f"{providers[0]} did not load in an onnxruntime session (it has {sess.get_providers()}); "
                           f"`medssl doctor` says why"}
    m = model.to(device)
    rows = {}
    for b in batches:
        xb = x[:b]
        xt = torch.from_numpy(xb).to(device)
        with torch.no_grad():
            eager = timed(lambda: m(xt).cpu(), device, repeat=20 if b == 1 else 5)
        onnx = timed(lambda: sess.run(None, {"images": xb}), device, repeat=20 if b == 1 else 5)
        rows[b] = {"eager_images_per_s": b / eager, "onnx_images_per_s": b / onnx, "speedup": eager / onnx}
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=64, help="image side (px); MobileNetV2 throughout")
    ap.add_argument("--n", type=int, default=None, help="images per training epoch (default: 1024 on CPU, 7168 on GPU)")
    ap.add_argument("--batch", type=int, default=128, help="training batch (params.yaml's pretrain and finetune batch_size)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    ap.add_argument("--stem-file", type=Path, default=None, help="also write the results' path, less .json/.md, here")
    ap.add_argument("--only", nargs="*", default=None,
                    help="subset of: finetune vae simclr mim eval features cells shared probes onnx")
    a = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    n = a.n or (7168 if device.type == "cuda" else 1024)
    bs = a.batch
    want = set(a.only or ["finetune", "vae", "simclr", "mim", "eval", "features", "cells", "shared", "probes", "onnx"])
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    x, y = data(n, a.size)
    rows, res = [], {}
    for kind in ("finetune", "vae", "simclr", "mim"):
        if kind in want:
            fast, naive = train_fast(kind, x, y, bs, device), train_naive(kind, x, y, bs, device)
            res[f"train_{kind}"] = {"fast_images_per_s": fast, "naive_images_per_s": naive}
            rows.append((f"{kind} training step (batch {bs})", fast, naive, "images/s"))
            print(rows[-1], flush=True)
    for kind in ("eval", "features"):
        if kind in want:
            fast, naive = infer(x, 1024, device, kind == "features")
            res[kind] = {"fast_images_per_s": fast, "naive_images_per_s": naive}
            rows.append((f"{'evaluation (probabilities)' if kind == 'eval' else 'feature extraction'} (batch 1024)", fast, naive, "images/s"))
            print(rows[-1], flush=True)
    if "cells" in want:
        for f in (0.01, 1.0):
            fast, naive = grid_cell(x, y, device, f)
            res[f"grid_cell_f{f:g}"] = {"fast_seconds": fast, "naive_seconds": naive}
            rows.append((f"grid fine-tune cell at {100 * f:g} % of {n} images (96 steps of batch 32, gap on 256; naive: "
                         f"3 epochs, the whole subset scored each)", fast, naive, "seconds"))
            print(rows[-1], flush=True)
    if "shared" in want:
        fast, naive = shard_features(x, device)
        res["shard_features"] = {"fast_seconds": fast, "naive_seconds": naive}
        rows.append((f"frozen features of one encoder for 3 grid seeds, {n} images (shared; naive: per shard)", fast,
                     naive, "seconds"))
        print(rows[-1], flush=True)
    if "probes" in want:
        for name, (fast, naive) in probes(7007, 2005, 1280, device).items():
            res[f"probe_{name}"] = {"fast_seconds": fast, "naive_seconds": naive}
            what = {"linear": "linear probe as the grid runs it (scikit-learn on a CPU, torch L-BFGS on a GPU; naive: "
                              "scikit-learn lbfgs, default tol 1e-4)",
                    "linear_torch": "linear probe, torch L-BFGS to gradient 1e-6 (naive: scikit-learn lbfgs, default tol 1e-4)",
                    "knn": "k-NN probe, k = 20 cosine (naive: scikit-learn)"}[name]
            rows.append((f"{what}, 7,007 x 1,280 train, 2,005 eval", fast, naive, "seconds"))
            print(rows[-1], flush=True)
    if "onnx" in want:
        res["onnx_vs_eager"] = onnx_vs_eager(device)
        print(res["onnx_vs_eager"], flush=True)

    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    meta = {"date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "device": str(device),
            "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None, "cpu": cpu,
            "avx512": " avx512f" in flags, "threads": torch.get_num_threads(), "python": sys.version.split()[0],
            "torch": torch.__version__, "image_size": a.size, "n": n, "batch": bs, "model": "mobilenet_v2"}
    host = "cuda-" + meta["gpu"].replace(" ", "-") if meta["gpu"] else "cpu-avx512" if meta["avx512"] else "cpu"
    meta["commit"] = commit()
    tag = f"{host}_{meta['date'][:10]}_{meta['commit']}"  # CPUs with and without AVX-512 differ several-fold: separate files
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / f"{tag}.json").write_text(json.dumps({"meta": meta, "results": res}, indent=2) + "\n")
    md = [f"# medssl benchmark: {meta['gpu'] or cpu} ({device}), {meta['date']}", "",
          f"torch {meta['torch']}, Python {meta['python']}, {meta['threads']} threads, AVX-512 {meta['avx512']}; "
          f"MobileNetV2 at {a.size} px, {n} images per epoch, synthetic uint8 data.", "",
          "| hot loop | medssl | naive | ratio |", "|---|---|---|---|"]
    for name, fast, naive, unit in rows:
        ratio = fast / naive if unit == "images/s" else naive / fast
        md.append(f"| {name} | {fast:,.1f} {unit} | {naive:,.1f} {unit} | {ratio:.2f}x |")
    if isinstance(res.get("onnx_vs_eager"), dict) and "skipped" not in res["onnx_vs_eager"]:
        md += ["", "| batch inference (uint8 28 px in, resized to 64 px) | eager PyTorch | ONNX Runtime | ratio |", "|---|---|---|---|"]
        md += [f"| batch {b} | {r['eager_images_per_s']:,.0f} images/s | {r['onnx_images_per_s']:,.0f} images/s | {r['speedup']:.2f}x |"
               for b, r in res["onnx_vs_eager"].items()]
    elif "onnx_vs_eager" in res:
        md += ["", f"ONNX Runtime: {res['onnx_vs_eager']['skipped']}"]
    (a.out / f"{tag}.md").write_text("\n".join(md) + "\n")
    write_index(a.out)  # README.md: the latest result per host
    if a.stem_file:
        a.stem_file.write_text(f"{a.out / tag}\n")
    print("\n".join(md))


def commit() -> str:
    """The checkout's short commit (with -dirty when tracked files differ from it), or 'nogit' (a copy without .git)."""
    import subprocess

    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
                             cwd=Path(__file__).parent).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True,
                               cwd=Path(__file__).parent).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "nogit"


if __name__ == "__main__":
    main()
