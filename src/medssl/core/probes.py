"""Frozen-encoder protocols in torch, on the features' device: linear probe and k-NN.

linear_probe minimises scikit-learn's LogisticRegression objective (multinomial, L2 on the weights,
not the bias, class_weight "balanced" or none) on standardised features: on a CPU with scikit-learn itself
when rows >= features (its lbfgs on one core is 5-7x faster than torch's L-BFGS here, benchmarks/); with fewer
rows than features (the small label fractions' cells) and on a GPU, with full-batch torch L-BFGS on the device,
solved in the rows' span; tests/test_probes.py checks both against scikit-learn. knn_probe is scikit-learn's
KNeighborsClassifier(metric="cosine", weights="distance").
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def class_weights(y: torch.Tensor, num_classes: int, mode: str) -> torch.Tensor:
    """Per-example weights: "balanced" = n / (k * n_class) over the k classes present, "none" = 1. y: (N,) int64."""
    if mode == "none":
        return torch.ones(len(y), device=y.device)
    counts = torch.bincount(y, minlength=num_classes).float()
    k = int((counts > 0).sum())
    return (len(y) / (k * counts.clamp(min=1)))[y]


def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, eval_x: torch.Tensor, num_classes: int, c: float,
                 class_weight: str = "balanced", solver: str = "auto") -> torch.Tensor:
    """Multinomial logistic regression on standardised frozen features -> eval probabilities (M, C) float32.

    train_x: (N, D), train_y: (N,) int64, eval_x: (M, D), all on one device. Minimises
    sum_i w_i * CE_i + ||W||^2 / (2C) (scaled by 1/N). Columns of classes absent from train_y stay zero, as
    scikit-learn fits only the classes it sees. Deterministic: no random draws.
    solver: "sklearn" (LogisticRegression, lbfgs, its default tolerance), "torch" (L-BFGS on the device), or
    "auto": scikit-learn on a CPU when rows >= features, torch elsewhere."""
    present = torch.unique(train_y)
    if len(present) < 2:  # a single class: probability one, as scikit-learn would refuse to fit
        out = torch.zeros(len(eval_x), num_classes, device=eval_x.device)
        out[:, present] = 1.0
        return out
    if solver == "auto":  # fewer rows than features: torch solves in the rows' span (below), scikit-learn in all D
        solver = "sklearn" if train_x.device.type == "cpu" and len(train_x) >= train_x.shape[1] else "torch"
    if solver == "sklearn":
        return _sklearn_probe(train_x, train_y, eval_x, num_classes, c, class_weight)
    return _torch_probe(train_x, train_y, eval_x, num_classes, c, class_weight)


def _sklearn_probe(train_x, train_y, eval_x, num_classes, c, class_weight) -> torch.Tensor:
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits

    x, y = train_x.float().cpu().numpy(), train_y.cpu().numpy()
    mu, sd = x.mean(0), x.std(0)
    sd[sd == 0] = 1.0  # StandardScaler leaves constant columns unscaled
    # one BLAS thread: a probe runs on its grid shard's core, beside the other shards
    with threadpool_limits(1):
        m = LogisticRegression(C=c, max_iter=1000, class_weight=None if class_weight == "none" else "balanced")
        m.fit((x - mu) / sd, y)
        proba = m.predict_proba((eval_x.float().cpu().numpy() - mu) / sd)
    out = np.zeros((len(eval_x), num_classes), dtype=np.float32)
    out[:, m.classes_] = proba
    return torch.from_numpy(out).to(eval_x.device)


def _torch_probe(train_x, train_y, eval_x, num_classes, c, class_weight, max_iter: int = 500,
                 tol: float = 1e-6) -> torch.Tensor:
    dtype = torch.float32  # float64 matmuls are ~20x slower on 2 CPU threads, for no gain in the metrics
    mu = train_x.mean(0, dtype=dtype)
    sd = train_x.to(dtype).std(0, unbiased=False)
    sd = torch.where(sd > 0, sd, torch.ones_like(sd))  # StandardScaler leaves constant columns unscaled
    xs = (train_x.to(dtype) - mu) / sd
    present = torch.unique(train_y)
    remap = torch.full((num_classes,), -1, dtype=torch.long, device=train_y.device)
    remap[present] = torch.arange(len(present), device=train_y.device)
    y = remap[train_y]
    k = len(present)
    w = class_weights(train_y, num_classes, class_weight).to(dtype)
    n = len(y)
    basis = None
    if n < xs.shape[1]:
        # wider than tall: the optimal W lies in the row space of xs (the loss sees only xs @ W, and the
        # L2 term is smallest there), so solve in the n-dimensional basis of the SVD xs = U S Vh, W = Vh^T Z,
        # where ||W|| = ||Z||: the same minimiser at n/D of the cost per iteration
        u, sv, vh = torch.linalg.svd(xs, full_matrices=False)
        basis, xs = vh.T, u * sv
    # W gets columns up to a multiple of 16 that no logit reads, so their gradient is zero and they stay zero:
    # the same iterates, but MKL multiplies (N, D) by (D, 7) and its transpose by (N, 7) 3-8x slower than
    # with 16 columns (measured on 2-core AMD EPYC hosts, with and without AVX-512); cuBLAS does not mind
    W = torch.zeros(xs.shape[1], -(-k // 16) * 16, dtype=dtype, device=xs.device, requires_grad=True)
    b = torch.zeros(k, dtype=dtype, device=xs.device, requires_grad=True)
    opt = torch.optim.LBFGS([W, b], lr=1, max_iter=max_iter, tolerance_grad=tol, tolerance_change=tol * 1e-3,
                            history_size=50, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = (w * F.cross_entropy((xs @ W)[:, :k] + b, y, reduction="none")).sum() / n + (W * W).sum() / (2 * c * n)
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        W = W[:, :k] if basis is None else basis @ W[:, :k]
        proba = (((eval_x.to(dtype) - mu) / sd) @ W + b).softmax(1)
    out = torch.zeros(len(eval_x), num_classes, device=eval_x.device)
    out[:, present] = proba.float()
    return out


def knn_probe(train_x: torch.Tensor, train_y: torch.Tensor, eval_x: torch.Tensor, num_classes: int, k: int = 20,
              chunk: int = 4096) -> torch.Tensor:
    """Distance-weighted cosine k-NN -> eval probabilities (M, C) float32; weight 1 / (1 - cos), and a
    neighbour at distance zero takes all the weight (scikit-learn's rule).

    Rows are divided by one train-set scale first: cosine ignores it, and a randomly initialised encoder
    in eval mode emits features of ~1e-10, whose squared norms underflow float32."""
    scale = train_x.abs().max().clamp(min=torch.finfo(torch.float32).tiny)
    tr = F.normalize(train_x.float() / scale, dim=1)
    k = min(k, len(train_y))
    out = []
    for i in range(0, len(eval_x), chunk):
        ev = F.normalize(eval_x[i : i + chunk].float() / scale, dim=1)
        sim, nn_idx = (ev @ tr.T).topk(k, dim=1)
        d = (1 - sim).clamp(min=0)
        zero = d <= 1e-7
        wt = torch.where(zero.any(1, keepdim=True), zero.float(), 1 / d.clamp(min=1e-7))
        votes = torch.zeros(len(ev), num_classes, device=ev.device).scatter_add_(1, train_y[nn_idx], wt)
        out.append(votes / votes.sum(1, keepdim=True))
    return torch.cat(out)
