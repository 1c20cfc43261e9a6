"""The comparison report: grid cells -> mean ± 95 % CI tables, plots, fusion, a generated summary.

Called by the `evaluate` stage; reads metrics/grid/<init>.json and models/grid/<init>/features.npz.
"""
from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from scipy import stats  # noqa: E402

from medssl.config import Params  # noqa: E402
import torch  # noqa: E402

from medssl.core.cells import Job, encoder_seed, probe_cell  # noqa: E402
from medssl.io import read_json, write_csv  # noqa: E402
from medssl.layout import Layout  # noqa: E402

PROTOCOL_NAMES = {"linear": "Linear probe (frozen encoder)", "finetune": "Fine-tune", "knn": "k-NN (frozen encoder)"}


def ci95(values) -> tuple[float, float]:
    """Mean and half-width of the two-sided 95 % Student-t interval over seeds."""
    v = np.asarray(values, float)
    if len(v) < 2:
        return float(v.mean()), float("nan")
    return float(v.mean()), float(stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v)))


def load_cells(p: Params, lay: Layout) -> tuple[list[dict], dict]:
    """Every init's cells, and the split sizes they were scored on (the same for every init)."""
    cells, sizes = [], {}
    for init in p.inits.all:
        path = lay.grid_cells(init)
        if not path.is_file():
            raise FileNotFoundError(f"{path} missing: run `medssl grid {init}` first")
        grid = read_json(path)
        cells += grid["cells"]
        sizes = grid["n"]
    return cells, sizes


def fusion_cells(p: Params, classes: list[str], lay: Layout) -> list[dict]:
    """Linear probe on concatenated frozen embeddings of each grid.fusion group, same fractions and seeds."""
    feats = {}
    for init in {i for group in p.grid.fusion for i in group}:
        with np.load(lay.grid_features(init)) as z:
            feats[init] = {k: z[k] for k in z.files}
    cells = []
    for group in p.grid.fusion:
        name = "+".join(group)
        first = feats[group[0]]
        y = {s[:-2]: first[s].astype(np.int64) for s in first if s.endswith("_y")}
        scored = [s for s in y if s != "pool"]
        for seed in p.grid.seeds:
            # the probe standardises every feature, so each encoder enters with unit-variance features;
            # a seeded encoder (random) contributes the draw its own cells of this seed probed
            x = {s: torch.from_numpy(np.concatenate([feats[i][f"{s}_x_s{encoder_seed(i, seed, p.seed)}"] for i in group], 1))
                 for s in y}
            for fraction in p.grid.fractions:
                job = Job("fractions", fraction, seed, first[f"subset_fractions_f{fraction:g}_s{seed}"])  # the single encoders' subset
                cell = probe_cell(name, "linear", job, x, y, scored, p.grid, classes)
                cells.append({**cell, "regime": "fusion"})
    return cells


def aggregate(cells: list[dict], split: str = "test") -> dict:
    """(regime, protocol, init, fraction) -> {metric: (mean, ci)} over seeds, + gap and n_seeds."""
    groups = defaultdict(list)
    for c in cells:
        groups[(c["regime"], c["protocol"], c["init"], c["fraction"])].append(c)
    out = {}
    for key, cs in groups.items():
        if split not in cs[0]:
            continue
        row = {k: ci95([c[split][k] for c in cs]) for k in cs[0][split]}
        row |= {"gap_accuracy": ci95([c["gap_accuracy"] for c in cs]), "n_seeds": len(cs), "n_train": int(np.mean([c["n_train"] for c in cs]))}
        out[key] = row
    return out


def _fmt(mc: tuple[float, float]) -> str:
    m, c = mc
    return f"{m:.3f} ± {c:.3f}" if np.isfinite(c) else f"{m:.3f}"


def _pct(f: float) -> str:
    return f"{100 * f:g} %"


def protocol_table(agg: dict, regime: str, protocol: str, inits: list[str], fractions: list[float]) -> str:
    head = "| init | " + " | ".join(_pct(f) for f in fractions) + " |\n|---|" + "---|" * len(fractions) + "\n"
    rows = []
    for init in inits:
        cells = []
        for f in fractions:
            r = agg.get((regime, protocol, init, f))
            cells.append("—" if r is None else f"{_fmt(r['balanced_accuracy'])}<br>AUC {_fmt(r['auc_macro'])}")
        rows.append(f"| {init} | " + " | ".join(cells) + " |")
    return head + "\n".join(rows) + "\n"


def winners(agg: dict, protocols: list[str], inits: list[str], fractions: list[float]) -> list[str]:
    """One generated sentence per protocol: which init leads at each label fraction, and by how much."""
    lines = []
    for protocol in protocols:
        parts, ssl_wins = [], 0
        for f in fractions:
            ranked = sorted(((agg[("fractions", protocol, i, f)]["balanced_accuracy"], i) for i in inits
                             if ("fractions", protocol, i, f) in agg), reverse=True)
            if not ranked:
                continue
            (m1, c1), top = ranked[0]
            tie = len(ranked) > 1 and m1 - c1 <= ranked[1][0][0] + ranked[1][0][1]
            parts.append(f"{_pct(f)}: **{top}** {m1:.3f}" + (f" (CI overlaps {ranked[1][1]})" if tie else ""))
            ssl_wins += top not in ("random", "imagenet")
        lines.append(f"- {PROTOCOL_NAMES[protocol]}: " + "; ".join(parts)
                     + f". A self-supervised init leads at {ssl_wins} of {len(parts)} label fractions.")
    return lines


def plot_vs_fraction(agg: dict, protocols: list[str], inits: list[str], fractions: list[float], path: Path,
                     metric: str = "balanced_accuracy") -> None:
    fig, axes = plt.subplots(1, len(protocols), figsize=(4.6 * len(protocols), 3.8), squeeze=False, sharey=True)
    for ax, protocol in zip(axes[0], protocols):
        for init in inits:
            pts = [(f, *agg[("fractions", protocol, init, f)][metric]) for f in fractions if ("fractions", protocol, init, f) in agg]
            if not pts:
                continue
            f, m, c = map(np.array, zip(*pts))
            ax.plot(f, m, "o-", label=init)
            ax.fill_between(f, m - np.nan_to_num(c), m + np.nan_to_num(c), alpha=0.15)
        ax.set(xscale="log", xlabel="label fraction", title=PROTOCOL_NAMES[protocol])
        ax.set_xticks(fractions, [_pct(f) for f in fractions], fontsize=7)
    axes[0][0].set_ylabel(f"test {metric} (mean ± 95 % CI)")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_gap_curves(inits: list[str], fractions: list[float], path: Path, lay: Layout) -> None:
    """Fine-tune train - val accuracy gap per epoch, mean over seeds, one panel per init."""
    fig, axes = plt.subplots(1, len(inits), figsize=(3.6 * len(inits), 3.2), squeeze=False, sharey=True)
    for ax, init in zip(axes[0], inits):
        file = lay.grid_curves(init)
        rows = list(csv.DictReader(file.read_text().splitlines())) if file.is_file() else []
        for f in fractions:
            by_epoch = defaultdict(list)
            for r in rows:
                if float(r["fraction"]) == f:
                    by_epoch[int(float(r["epoch"]))].append(float(r["gap_accuracy"]))
            if by_epoch:
                ep = sorted(by_epoch)
                ax.plot(ep, [np.mean(by_epoch[e]) for e in ep], "o-", ms=3, label=_pct(f))
        ax.axhline(0, color="grey", lw=0.8)
        ax.set(title=init, xlabel="epoch")
    axes[0][0].set_ylabel("gap (train - val accuracy)")
    axes[0][-1].legend(fontsize=7, title="labels")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def comparison(p: Params, classes: list[str], out: Path, lay: Layout) -> tuple[str, dict]:
    """Markdown section + a flat summary for `dvc metrics`; plots and CSVs written under `out`/plots."""
    g = p.grid
    cells, n_pool = load_cells(p, lay)
    fused = fusion_cells(p, classes, lay) if g.fusion else []
    agg = aggregate(cells + fused)
    inits, fr = p.inits.all, g.fractions
    seeds = sorted({c["seed"] for c in cells})
    plot_vs_fraction(agg, g.protocols, inits, fr, out / "balanced_accuracy_vs_fraction.png")
    plot_vs_fraction(agg, g.protocols, inits, fr, out / "auc_vs_fraction.png", "auc_macro")
    if "finetune" in g.protocols:
        plot_gap_curves(inits, fr, out / "gap_curves.png", lay)
    md = [f"## Comparison: {len(inits)} inits × {len(g.protocols)} protocols × {len(fr)} label fractions × "
          f"{len(seeds)} seeds (seeds {seeds})", "",
          f"Labelled pool {n_pool['pool']} train images (fractions are nested, stratified subsets of it, every class "
          f"kept); scored on {n_pool['test']} test images; fine-tune cells: {p.epochs.grid.epochs} epochs, best epoch "
          "on validation. Cells: test balanced accuracy, then macro AUC, as mean ± 95 % CI (Student t over seeds). "
          "Encoders are pretrained once; seeds vary the label subset and the head / fine-tune run, and draw the "
          f"random init's encoder. Linear probe: logistic regression, C = {g.linear_c:g}, class weights "
          f"{g.linear_class_weight}.", "",
          "### Summary", "", *winners(agg, g.protocols, inits, fr), ""]
    for protocol in g.protocols:
        md += [f"### {PROTOCOL_NAMES[protocol]}", "", protocol_table(agg, "fractions", protocol, inits, fr)]
    md += ["![balanced accuracy vs label fraction](balanced_accuracy_vs_fraction.png)", "",
           "![macro AUC vs label fraction](auc_vs_fraction.png)", ""]
    if "finetune" in g.protocols:
        md += ["### Overfitting gap", "", "Train − val accuracy at the best epoch (fine-tune, mean ± CI):", "",
               "| init | " + " | ".join(_pct(f) for f in fr) + " |", "|---|" + "---|" * len(fr)]
        md += [f"| {i} | " + " | ".join(_fmt(agg[("fractions", "finetune", i, f)]["gap_accuracy"]) for f in fr) + " |"
               for i in inits]
        md += ["", "![gap curves](gap_curves.png)", ""]
    md += _imbalance_section(agg, g, inits, classes)
    if "shift" in n_pool:
        shift = aggregate(cells, "shift")
        md += [f"### Domain shift: trained on {p.data.name}, scored on `{g.shift.name}` ({n_pool['shift']} test images)",
               "", "Balanced accuracy at 100 % labels, in-domain test vs shifted source:", "",
               "| init | " + " | ".join(f"{pr} (test → shift)" for pr in g.protocols) + " |", "|---|" + "---|" * len(g.protocols)]
        md += [f"| {i} | " + " | ".join(f"{_fmt(agg[('fractions', pr, i, 1.0)]['balanced_accuracy'])} → "
                                       f"{_fmt(shift[('fractions', pr, i, 1.0)]['balanced_accuracy'])}" for pr in g.protocols)
               + " |" for i in inits] + [""]
    if fused:
        names = ["+".join(gr) for gr in g.fusion]
        singles = sorted({i for gr in g.fusion for i in gr}, key=inits.index)
        md += ["### Embedding fusion (linear probe on concatenated frozen embeddings)", "",
               protocol_table({(("fractions" if k[0] == "fusion" else k[0]),) + k[1:]: v for k, v in agg.items()},
                              "fractions", "linear", singles + names, fr)]
    summary = {protocol: {init: {_pct(f): round(agg[("fractions", protocol, init, f)]["balanced_accuracy"][0], 4)
                                 for f in fr} for init in inits} for protocol in g.protocols}
    for protocol in g.protocols:  # dvc plots: test balanced accuracy vs label fraction, one column per init
        write_csv(lay.report_plots / f"{protocol}.csv",
                  [{"fraction": f, **{i: agg[("fractions", protocol, i, f)]["balanced_accuracy"][0] for i in inits}} for f in fr])
    return "\n".join(md), summary


def _imbalance_section(agg: dict, g, inits: list[str], classes: list[str]) -> list[str]:
    regimes = [f"imbalance:{r:g}" for r in g.imbalance]
    if not regimes:
        return []
    md = ["### Class imbalance (100 % labels, classes capped to largest/smallest ratio)", "",
          "Test balanced accuracy (mean ± CI); natural = the pool's own ratio:", "",
          "| init | protocol | " + " | ".join(f"ratio {r:g}" for r in g.imbalance) + " | natural |",
          "|---|---|" + "---|" * (len(regimes) + 1)]
    for init in inits:
        for pr in g.protocols:
            keys = [(rg, pr, init, 1.0) for rg in regimes] + [("fractions", pr, init, 1.0)]
            md.append(f"| {init} | {pr} | " + " | ".join(_fmt(agg[k]["balanced_accuracy"]) if k in agg else "—" for k in keys) + " |")
    md += ["", f"Per-class test recall at ratio {g.imbalance[0]:g} (mean over seeds):", "",
           "| init | protocol | " + " | ".join(classes) + " |", "|---|---|" + "---|" * len(classes)]
    for init in inits:
        for pr in g.protocols:
            r = agg.get((regimes[0], pr, init, 1.0))
            if r:
                md.append(f"| {init} | {pr} | " + " | ".join(f"{r[f'recall_{c}'][0]:.2f}" for c in classes) + " |")
    return md + [""]
