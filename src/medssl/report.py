"""The comparison report: grid cells -> the verdict, paired differences, mean ± 95 % CI tables, plots, fusion,
overfitting, imbalance and shift sections.

Called by the `evaluate` stage; reads metrics/grid/<init>.json and models/grid/<init>/{features,probas}.npz.
"""
from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.ticker import MaxNLocator
import numpy as np
from scipy import stats


from medssl import compare
from medssl.config import BASELINE_INITS, Params, flatten
from medssl.io import read_json, write_csv
from medssl.layout import Layout
from medssl.resume import read_grid

PROTOCOL_NAMES = compare.PROTOCOL_WORDS


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
        grid = read_grid(p, init, lay)
        cells += grid["cells"]
        sizes = grid["n"]
    return cells, sizes


def load_probas(p: Params, lay: Layout) -> tuple[dict, dict]:
    """(init, protocol, regime, fraction, seed, split) -> (N, C) held-out probabilities of every grid cell; split -> labels."""
    probas, labels = {}, {}
    for init in p.inits.all:
        with np.load(lay.grid_probas(init)) as z:
            for k in z.files:
                if k.endswith("_y"):
                    labels[k[:-2]] = z[k]
                    continue
                split, key = k.split("/")
                protocol, regime, f, s = key.split("_")
                probas[(init, protocol, regime, float(f[1:]), int(s[1:]), split)] = z[k]
    return probas, labels


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
        row |= {"gap_accuracy": ci95([c["gap_accuracy"] for c in cs]), "n_seeds": len(cs), "n_train": int(np.mean([c["n_train"] for c in cs])),
                "one_class": sum(c.get(f"{split}_classes_predicted", 2) == 1 for c in cs)}  # seeds whose model predicts one class
        out[key] = row
    return out


def _fmt(mc: tuple[float, float]) -> str:
    m, c = mc
    return f"{m:.3f} ± {c:.3f}" if np.isfinite(c) else f"{m:.3f}"


def one_class(r: dict) -> str:
    """The mark of a cell whose model predicts a single class on test in some seeds (its balanced accuracy is
    1 / number of classes: it learnt nothing)."""
    return f"<br>**one class** ({r['one_class']} of {r['n_seeds']} seeds)" if r.get("one_class") else ""


def protocol_table(agg: dict, regime: str, protocol: str, inits: list[str], fractions: list[float]) -> str:
    head = "| init | " + " | ".join(compare.pct(f) for f in fractions) + " |\n|---|" + "---|" * len(fractions) + "\n"
    rows = []
    for init in inits:
        cells = []
        for f in fractions:
            r = agg.get((regime, protocol, init, f))
            cells.append("—" if r is None else f"{_fmt(r['balanced_accuracy'])}<br>AUC {_fmt(r['auc_macro'])}{one_class(r)}")
        rows.append(f"| {init} | " + " | ".join(cells) + " |")
    return head + "\n".join(rows) + "\n"


def task_section(agg: dict, meta: dict, protocols: list[str], inits: list[str], fractions: list[float]) -> list[str]:
    """What the task asks for first: quadratic κ for ordinal grades; the positive class's sensitivity and
    specificity beside AUC for binary tasks. Multi-class tasks: nothing more than the tables below."""
    task, classes = meta.get("task", "multiclass"), meta["classes"]
    if task == "ordinal":
        md = ["### Quadratic κ (ordinal task: the primary metric)", "",
              "Grades are ordered, so a miss by one grade costs less than a miss by four: test quadratic-weighted "
              "Cohen's κ, mean ± 95 % CI over seeds; the champion is chosen on validation quadratic κ.", ""]
        for protocol in protocols:
            md += [f"{PROTOCOL_NAMES[protocol]}:", "", metric_table(agg, protocol, inits, fractions, ("kappa_quadratic",)), ""]
        return md
    if task == "binary" and meta.get("positive") is not None:
        pos, neg = classes[meta["positive"]], classes[1 - meta["positive"]]
        md = [f"### Binary task: positive class `{pos}`", "",
              f"Test AUC of `{pos}` (one ROC curve, not a macro over two mirror images), sensitivity (recall of `{pos}`) "
              f"and specificity (recall of `{neg}`), mean ± 95 % CI over seeds.", ""]
        keys = ("auc_macro", f"recall_{pos}", f"recall_{neg}")
        for protocol in protocols:
            md += [f"{PROTOCOL_NAMES[protocol]} (AUC / sensitivity / specificity):", "",
                   metric_table(agg, protocol, inits, fractions, keys), ""]
        return md
    return []


def metric_table(agg: dict, protocol: str, inits: list[str], fractions: list[float], keys: tuple[str, ...]) -> str:
    head = "| init | " + " | ".join(compare.pct(f) for f in fractions) + " |\n|---|" + "---|" * len(fractions) + "\n"
    rows = []
    for init in inits:
        cells = [(lambda r: "—" if r is None else " / ".join(_fmt(r[k]) for k in keys))(agg.get(("fractions", protocol, init, f)))
                 for f in fractions]
        rows.append(f"| {init} | " + " | ".join(cells) + " |")
    return head + "\n".join(rows) + "\n"


def plot_vs_fraction(agg: dict, protocols: list[str], inits: list[str], fractions: list[float], path: Path,
                     metric: str = "balanced_accuracy") -> None:
    """One panel per protocol, test `metric` against the label fraction (log axis), one colour per init; the inits'
    points are dodged sideways (a few % of the fraction) so that their intervals do not hide one another."""
    fig, axes = plt.subplots(1, len(protocols), figsize=(5.2 * len(protocols), 4.4), squeeze=False, sharey=True)
    colours = {init: plt.get_cmap("tab10")(i % 10) for i, init in enumerate(inits)}
    dodge = {init: 1.09 ** (i - (len(inits) - 1) / 2) for i, init in enumerate(inits)}
    for ax, protocol in zip(axes[0], protocols):
        for init in inits:
            pts = [(f, *agg[("fractions", protocol, init, f)][metric]) for f in fractions if ("fractions", protocol, init, f) in agg]
            if not pts:
                continue
            f, m, c = map(np.array, zip(*pts))
            ax.errorbar(f * dodge[init], m, yerr=np.nan_to_num(c), fmt="o-", ms=4, capsize=2, lw=1.2, elinewidth=1,
                        color=colours[init], label=init)
        ax.set(xscale="log", xlabel="label fraction", title=PROTOCOL_NAMES[protocol])
        ax.set_xticks(fractions, [compare.pct(f) for f in fractions])
        ax.minorticks_off()
        ax.tick_params(labelsize=9)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(f"test {metric} (mean ± 95 % CI)")
    axes[0][-1].legend(fontsize=9, loc="upper left", bbox_to_anchor=(1.02, 1))  # beside the panels, over no point
    fig.tight_layout()
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def grid_curves(init: str, lay: Layout, fraction: float = 1.0) -> dict[int, list[dict]]:
    """seed -> per-epoch rows of the grid's fine-tune cells at `fraction` (plots/grid/<init>.csv)."""
    file = lay.grid_curves(init)
    rows = list(csv.DictReader(file.read_text().splitlines())) if file.is_file() else []
    out = defaultdict(list)
    for r in rows:
        if float(r["fraction"]) == fraction:
            out[int(float(r["seed"]))].append({k: float(v) for k, v in r.items()})
    return {s: sorted(v, key=lambda r: r["epoch"]) for s, v in out.items()}


def overfitting(inits: list[str], lay: Layout) -> dict:
    """Per init, fine-tune cells at 100 % labels: the train - val gap curve (mean and 95 % CI over seeds per epoch),
    the epoch where validation loss stops improving (its minimum, per seed) and the gap at that epoch."""
    out = {}
    for init in inits:
        by_seed = grid_curves(init, lay)
        if not by_seed:
            continue
        epochs = sorted({int(r["epoch"]) for rows in by_seed.values() for r in rows})
        curve = {e: ci95([r["gap_accuracy"] for rows in by_seed.values() for r in rows if int(r["epoch"]) == e]) for e in epochs}
        stop = {s: min(rows, key=lambda r: r["val_loss"]) for s, rows in by_seed.items()}
        out[init] = {"epochs": epochs, "gap_curve": curve,
                     "stop_epoch": ci95([r["epoch"] for r in stop.values()]),
                     "gap_at_stop": ci95([r["gap_accuracy"] for r in stop.values()]),
                     "gap_loss_at_stop": ci95([r["gap_loss"] for r in stop.values()])}
    return out


def plot_gap_curves(over: dict, path: Path, columns: int = 4) -> None:
    """Train - val accuracy gap per epoch (fine-tune, 100 % labels), mean ± 95 % CI over seeds, one panel per init
    (rows of `columns`, each panel large enough to read); the dashed line: mean epoch where validation loss stops
    improving."""
    inits = list(over)
    cols = min(columns, len(inits))
    rows = -(-len(inits) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.8 * cols, 3.3 * rows), squeeze=False, sharey=True)
    for ax, init in zip(axes.flat, inits):
        o = over[init]
        m, c = zip(*(o["gap_curve"][e] for e in o["epochs"]))
        ax.errorbar(o["epochs"], m, yerr=np.nan_to_num(c), fmt="o-", ms=3, capsize=3)
        ax.axvline(o["stop_epoch"][0], color="tab:red", ls="--", lw=1)
        ax.axhline(0, color="grey", lw=0.8)
        ax.set(title=init, xlabel="epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.tick_params(labelsize=9)
    for ax in list(axes.flat)[len(inits):]:
        ax.set_visible(False)
    for r in range(rows):
        axes[r][0].set_ylabel("train − val accuracy\n(mean ± 95 % CI)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def tuning_section(p: Params) -> list[str]:
    """The tuning budget and the values each init trains with."""
    md = ["### Tuning", ""]
    if not p.tuned:
        return md + ["No init was tuned: every init trains with params.yaml's values (`medssl tune` searches each init "
                     "with the same space and trial budget and writes tuned.yaml).", ""]
    md += [f"`medssl tune` ran one Optuna study per init with the same search space and trial budget; selection on "
           f"validation `{p.export.select_metric}`. Inits without an entry train with params.yaml's values.", "",
           "| init | trials (complete / pruned / failed) | best val | values |", "|---|---|---|---|"]
    for init in p.inits.all:
        t = p.tuned.get(init)
        if t is None:
            md.append(f"| {init} | not tuned | — | params.yaml |")
            continue
        st = t.study
        values = ", ".join(f"`{k}` {float(v):.3g}" if isinstance(v, float) else f"`{k}` {v}"
                           for k, v in flatten(dict(finetune=t.finetune, pretrain=t.pretrain)).items())
        best = next((v for k, v in st.items() if k.startswith("best_val_")), None)
        md.append(f"| {init} | {st.get('trials', '?')} ({st.get('complete', '?')} / {st.get('pruned', '?')} / "
                  f"{st.get('fail', '?')}) | {'—' if best is None else f'{best:.4f}'} | {values} |")
    return md + [""]


def comparison(p: Params, classes: list[str], out: Path, lay: Layout, champion: dict | None = None,
               fused: tuple[list[dict], dict] = ([], {})) -> tuple[str, str, dict]:
    """The verdict, the markdown section and a summary for `dvc metrics`; plots and CSVs written under `out`.

    champion: {"init", "test_balanced_accuracy", "shift_balanced_accuracy"} of the exported classifier, if scored;
    fused: the fusion cells and their held-out probabilities (medssl.fusion.fusion_cells)."""
    g = p.grid
    cells, n_pool = load_cells(p, lay)
    fused, fused_probas = fused
    agg = aggregate(cells + fused)
    inits, fr = p.inits.all, g.fractions
    seeds = sorted({c["seed"] for c in cells})
    ssl = [i for i in inits if i not in BASELINE_INITS]
    probas, labels = load_probas(p, lay)
    rows = compare.comparisons(probas | fused_probas, labels, seeds, p.inits.baselines, ssl,
                               ["+".join(gr) for gr in g.fusion], p.seed)
    write_csv(out / "paired_differences.csv", rows)
    shift = None
    if "shift" in n_pool and "finetune" in g.protocols:
        shift_agg = aggregate(cells, "shift")
        key = lambda i: ("fractions", "finetune", i, 1.0)
        shift = {"name_": g.shift.name, "n": n_pool["shift"],
                 "test": {i: agg[key(i)]["balanced_accuracy"][0] for i in inits},
                 "shifted": {i: shift_agg[key(i)]["balanced_accuracy"][0] for i in inits},
                 "champion": (champion or {}).get("init", ""),
                 "champion_test": (champion or {}).get("test_balanced_accuracy"),
                 "champion_shift": (champion or {}).get("shift_balanced_accuracy")}
    training = p.run_budget.grid.training(p.finetune.batch_size)
    means = {(pr, i, f): agg[("fractions", pr, i, f)]["balanced_accuracy"][0] for pr in g.protocols for i in inits
             for f in fr if ("fractions", pr, i, f) in agg}
    ceiling = compare.at_ceiling(means, g.protocols, p.inits.baselines, ssl, fr)
    design = compare.Design(protocols=g.protocols, baselines=p.inits.baselines, ssl=ssl, fractions=fr, budget=p.budget,
                            n_test=n_pool["test"], n_seeds=len(seeds), training=training, ceiling=ceiling,
                            pretrain_per_seed=p.run_budget.pretrain_per_seed)
    verdict = compare.verdict(rows, design, shift)
    plot_vs_fraction(agg, g.protocols, inits, fr, out / "balanced_accuracy_vs_fraction.png")
    plot_vs_fraction(agg, g.protocols, inits, fr, out / "auc_vs_fraction.png", "auc_macro")
    over = overfitting(inits, lay) if "finetune" in g.protocols else {}
    if over:
        plot_gap_curves(over, out / "gap_curves.png")
    md = [f"## Comparison: {len(inits)} inits × {len(g.protocols)} protocols × {len(fr)} label fractions × "
          f"{len(seeds)} seeds (seeds {seeds})", "",
          f"Labelled pool {n_pool['pool']} train images (fractions are nested, stratified subsets of it, every class "
          f"kept); scored on {n_pool['test']} test images; fine-tune cells: {training}, best evaluation on validation. Cells: test balanced accuracy, then macro AUC, as mean ± 95 % CI (Student t over seeds); **one class** marks "
          "seeds whose model predicts a single class for every test image (balanced accuracy 1 / classes: it learnt nothing). "
          "Seeds vary the label subset and the head / fine-tune run, draw the random init's encoder and "
          + ("pretrain each self-supervised init's encoder anew. " if p.run_budget.pretrain_per_seed else
             "share each self-supervised init's one pretrained encoder. ")
          + f"Linear probe: logistic regression, C = {g.linear_c:g}, class weights "
          f"{g.linear_class_weight}.", ""]
    md += task_section(agg, read_json(lay.meta), g.protocols, inits, fr)
    md += tuning_section(p)
    refs = [r for r in compare.REFERENCES if r in p.inits.baselines]
    if refs:
        md += ["### Paired differences", "",
               f"Each init minus {' and minus '.join(refs)}, paired over seeds (the same label subsets) and bootstrapped "
               f"over test images ({compare.N_BOOT} stratified resamples): difference [95 % interval]. The interval is "
               f"unadjusted (each comparison on its own); ▲ / ▼ mark the decision, which is Holm-corrected over the "
               f"family (one reference, one metric; α = {compare.ALPHA}), so an interval that excludes 0 can carry no "
               f"mark. All rows, with macro AUC and p values: "
               "[paired_differences.csv](paired_differences.csv); `dvc metrics diff` shows them from "
               "metrics/report.json.", ""]
        for protocol in [pr for pr in compare.VERDICT_PROTOCOLS if pr in g.protocols]:
            md += [f"{PROTOCOL_NAMES[protocol]}, test balanced accuracy:", "",
                   compare.table(rows, protocol, "fractions", fr, refs[0], "balanced_accuracy")]
        if g.fusion:
            md += ["Fusion (linear probe on concatenated embeddings), test balanced accuracy:", "",
                   compare.table(rows, "linear", "fusion", fr, refs[0], "balanced_accuracy")]
    for protocol in g.protocols:
        md += [f"### {PROTOCOL_NAMES[protocol]}", "", protocol_table(agg, "fractions", protocol, inits, fr)]
    md += ["![balanced accuracy vs label fraction](balanced_accuracy_vs_fraction.png)", "",
           "![macro AUC vs label fraction](auc_vs_fraction.png)", ""]
    if over:
        md += ["### Overfitting", "",
               "Fine-tune cells at 100 % labels, per init: the epoch where validation loss stops improving (its "
               "minimum), the train − val gap there, and the test scores of the same cells (mean ± 95 % CI over seeds). "
               "The curves: the accuracy gap per epoch, mean ± CI; dashed: the mean stopping epoch.", "",
               "| init | val loss stops improving (epoch) | accuracy gap there | loss gap there | test bal. acc | test AUC |",
               "|---|---|---|---|---|---|"]
        for init, o in over.items():
            a = agg[("fractions", "finetune", init, 1.0)]
            e, ec = o["stop_epoch"]
            md.append(f"| {init} | {e:.1f}{f' ± {ec:.1f}' if np.isfinite(ec) else ''} | {_fmt(o['gap_at_stop'])} | {_fmt(o['gap_loss_at_stop'])} | "
                      f"{_fmt(a['balanced_accuracy'])} | {_fmt(a['auc_macro'])} |")
        md += ["", "![gap curves](gap_curves.png)", ""]
    md += _imbalance_section(agg, g, inits, classes)
    if "shift" in n_pool:
        shift_agg = aggregate(cells, "shift")
        md += [f"### Domain shift: trained on {p.data.name}, scored on `{g.shift.name}` ({n_pool['shift']} test images)",
               "", "Balanced accuracy at 100 % labels, in-domain test vs shifted source:", "",
               "| init | " + " | ".join(f"{pr} (test → shift)" for pr in g.protocols) + " |", "|---|" + "---|" * len(g.protocols)]
        md += [f"| {i} | " + " | ".join(f"{_fmt(agg[('fractions', pr, i, 1.0)]['balanced_accuracy'])} → "
                                       f"{_fmt(shift_agg[('fractions', pr, i, 1.0)]['balanced_accuracy'])}" for pr in g.protocols)
               + " |" for i in inits] + [""]
        if champion and champion.get("shift_balanced_accuracy") is not None:
            md += [f"Champion ({champion['init']}, trained on all labels): test balanced accuracy "
                   f"{champion['test_balanced_accuracy']:.4f} → `{g.shift.name}` {champion['shift_balanced_accuracy']:.4f}.", ""]
        if refs:
            md += [f"Paired differences on `{g.shift.name}` at 100 % labels (balanced accuracy, vs {refs[0]}):", "",
                   "| init | " + " | ".join(g.protocols) + " |", "|---|" + "---|" * len(g.protocols)]
            sh = [r for r in rows if r["split"] == "shift" and r["reference"] == refs[0] and r["metric"] == "balanced_accuracy"]
            for init in dict.fromkeys(r["init"] for r in sh):
                md.append(f"| {init} | " + " | ".join(next((compare.diff_text(r) for r in sh if r["init"] == init and r["protocol"] == pr), "—")
                                                      for pr in g.protocols) + " |")
            md.append("")
    if fused:
        names = ["+".join(gr) for gr in g.fusion]
        singles = sorted({i for gr in g.fusion for i in gr}, key=inits.index)
        md += ["### Embedding fusion (linear probe on concatenated frozen embeddings)", "",
               protocol_table({(("fractions" if k[0] == "fusion" else k[0]),) + k[1:]: v for k, v in agg.items()},
                              "fractions", "linear", singles + names, fr)]
    d = compare.decided(rows, g.protocols, p.inits.baselines, ssl, ceiling)
    summary = {"verdict": {"budget": p.budget, **d, "story": compare.story(p.budget, d)},
               "balanced_accuracy": {protocol: {init: {compare.pct(f): round(agg[("fractions", protocol, init, f)]["balanced_accuracy"][0], 4)
                                                       for f in fr} for init in inits} for protocol in g.protocols},
               "paired": compare.metrics_json(rows)}
    for protocol in g.protocols:  # dvc plots: test balanced accuracy vs label fraction, one column per init (+ its CI)
        rows_csv = []
        for f in fr:
            row = {"fraction": f}
            for i in inits:
                m, c = agg[("fractions", protocol, i, f)]["balanced_accuracy"]
                row |= {i: m, f"{i}_lo": m - c, f"{i}_hi": m + c}
            rows_csv.append(row)
        write_csv(lay.report_plots / f"{protocol}.csv", rows_csv)
    return verdict, "\n".join(md), summary


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
