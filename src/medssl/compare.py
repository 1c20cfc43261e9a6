"""Paired comparisons of every init with the baselines, and the verdict generated from them (stage `evaluate`).

For every protocol x regime x label fraction (and the fusion rows), each init minus ImageNet and minus random
in balanced accuracy and macro AUC: paired over seeds (same label subsets), bootstrapped over test images
(core.paired), with a 95 % interval; decisions are Holm-corrected within each family (one reference, one
metric, one split). The verdict answers "pretrain on our own images, or start from ImageNet?" per label budget.
"""
from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass
from concurrent.futures import ThreadPoolExecutor
from itertools import groupby

import numpy as np
from scipy import stats

from medssl.core.paired import Bootstrap, holm, paired_difference
from medssl.metric_names import PAIRED

ALPHA = 0.05
N_BOOT = 2000
REFERENCES = ("imagenet", "random")
VERDICT_PROTOCOLS = ("finetune", "linear")
CEILING = 0.99  # mean test balanced accuracy from which a cell cannot separate its inits, whatever the budget
NAMES = {"random": "random init", "imagenet": "ImageNet", "vae": "the VAE", "simclr": "SimCLR", "mim": "MIM",
         "imagenet-simclr": "ImageNet+SimCLR", "imagenet-mim": "ImageNet+MIM"}
PROTOCOL_WORDS = {"finetune": "Fine-tune", "linear": "Linear probe (frozen encoder)", "knn": "k-NN (frozen encoder)"}


ANSWER = ("`make answer` (`medssl pipeline -S budget=cpu`: 25–45 min on 2 cores with AVX-512, about an hour with "
          "AVX2 only)")
NEXT_BUDGET = {"demo": f"For an answer run the `cpu` budget: {ANSWER}.",
               "cpu": "For an answer run a larger budget: `budget: full` on a GPU (docs/gpu.md)."}


def name(init: str) -> str:
    return NAMES.get(init, init)


def pct(f: float) -> str:
    """A label fraction as the report writes it: 0.01 -> '1 %'."""
    return f"{100 * f:g} %"


def comparisons(probas: dict, labels: dict[str, np.ndarray], seeds: list[int], baselines: list[str],
                others: list[str], fusion: list[str], seed: int) -> list[dict]:
    """probas: (init, protocol, regime, fraction, seed, split) -> (N, C); labels: split -> (N,).

    Rows: split, protocol, regime, fraction, init, reference, metric, diff, lo, hi, p, p_holm, decision.
    Test: every group of cells; shift (when present): the 100 % label cells of each protocol."""
    refs = [r for r in REFERENCES if r in baselines]
    groups = sorted({k[1:4] for k in probas if k[5] == "test"}, key=lambda g: (g[1] != "fractions", g))
    have = lambda init, protocol, regime, fraction, split: (init, protocol, regime, fraction, seeds[0], split) in probas
    rows = []
    for split, y in labels.items():
        pairs = []  # (split, protocol, regime, fraction, init, reference, the reference's regime)
        for protocol, regime, fraction in groups:
            if split != "test" and (regime != "fractions" or fraction != 1.0):
                continue
            against = "fractions" if regime == "fusion" else regime  # fusion rows against the single encoders
            for ref in refs:
                if not have(ref, protocol, against, fraction, split):
                    continue
                inits = fusion if regime == "fusion" else others if ref == "imagenet" else ["imagenet", *others]
                pairs += [(protocol, regime, fraction, init, ref, against) for init in inits
                          if init != ref and have(init, protocol, regime, fraction, split)]
        needed = sorted({(i, pr, rg, f) for pr, rg, f, i, _, _ in pairs} | {(r, pr, ag, f) for pr, _, f, _, r, ag in pairs})
        boot = Bootstrap(y, N_BOOT, seed)
        with ThreadPoolExecutor(os.cpu_count()) as pool:  # numpy releases the GIL in the heavy loops
            reps = dict(zip(needed, pool.map(lambda k: boot.replicates(np.stack([probas[(*k, s, split)] for s in seeds])),
                                             needed)))
        for protocol, regime, fraction, init, ref, against in pairs:
            for metric in PAIRED:
                d = paired_difference(reps[(init, protocol, regime, fraction)], reps[(ref, protocol, against, fraction)],
                                      metric, seed)
                rows.append({"split": split, "protocol": protocol, "regime": regime, "fraction": fraction,
                             "init": init, "reference": ref, "metric": metric, **d})
    family = defaultdict(list)
    for r in rows:
        family[(r["split"], r["reference"], r["metric"])].append(r)
    for fam in family.values():
        for r, adj in zip(fam, holm([r["p"] for r in fam])):
            r["p_holm"] = float(adj)
            r["family_size"] = len(fam)
            r["decision"] = ("better" if r["diff"] > 0 else "worse") if adj < ALPHA else "no difference"
    return rows


def metrics_json(rows: list[dict]) -> dict:
    """Nested for metrics/report.json (dvc metrics diff): split/metric/protocol/regime/fraction/init-vs-ref."""
    out: dict = {}
    for r in rows:
        node = out.setdefault(r["split"], {}).setdefault(r["metric"], {}).setdefault(r["protocol"], {}) \
            .setdefault(r["regime"], {}).setdefault(pct(r["fraction"]), {})
        node[f"{r['init']}-vs-{r['reference']}"] = {k: round(r[k], 4) for k in ("diff", "lo", "hi", "p_holm")}
    return out


def _signed(x: float) -> str:
    return f"{0.0 if abs(x) < 5e-4 else x:+.3f}"  # no "-0.000"


def diff_text(r: dict) -> str:
    return f"{_signed(r['diff'])} [{_signed(r['lo'])}, {_signed(r['hi'])}]"


def _span(fractions: list[float]) -> str:
    return pct(fractions[0]) if len(fractions) == 1 else f"{100 * fractions[0]:g}–{pct(fractions[-1])}"


def _protocol_verdict(rows: list[dict], protocol: str, ref: str, ssl: list[str], fractions: list[float],
                      ceiling: frozenset = frozenset()) -> str:
    """One paragraph for `protocol` ("" without rows). ceiling: the label fractions
    at which `ref` and every SSL init score at least CEILING (an open cell there says so, not "at this budget")."""
    at = {f: [r for r in rows if r["fraction"] == f] for f in fractions}
    at = {f: rs for f, rs in at.items() if rs}
    if not at:
        return ""

    def status(rs):
        wins = sorted((r for r in rs if r["decision"] == "better"), key=lambda r: -r["diff"])
        if wins:
            return ("wins", wins[0]["init"])
        if all(r["decision"] == "worse" for r in rs):
            return ("leads", None)
        if rs[0]["fraction"] in ceiling and all(r["decision"] == "no difference" for r in rs):
            return ("ceiling", None)
        return ("open", None)

    parts = []
    for (kind, leader), fs in groupby(at, key=lambda f: status(at[f])):
        fs = list(fs)
        span = f"at {_span(fs)} labels"
        if kind == "wins":
            vals = "; ".join(f"{diff_text(next(r for r in at[f] if r['init'] == leader))} at {pct(f)}" for f in fs)
            also = sorted({r["init"] for f in fs for r in at[f] if r["decision"] == "better"} - {leader})
            parts.append(f"{span}, **{name(leader)} beats {name(ref)}** ({vals})"
                         + (f"; {', '.join(name(i) for i in also)} also beat{'s' if len(also) == 1 else ''} it" if also else ""))
        elif kind == "leads":
            vals = "; ".join(f"{name(r['init'])} {diff_text(r)} at {pct(f)}" for f in fs for r in [max(at[f], key=lambda r: r['diff'])])
            parts.append(f"{span}, **{name(ref)} leads every self-supervised init** (closest: {vals})")
        elif kind == "ceiling":
            parts.append(f"{span}, {name(ref)} and every self-supervised init are at the ceiling (mean test balanced "
                         f"accuracy ≥ {CEILING:g}): no difference is significant, and this data leaves room for none "
                         f"larger than {1 - CEILING:g}, whatever the budget")
        else:
            worse = sorted({r["init"] for f in fs for r in at[f] if r["decision"] == "worse"})
            best = [max(at[f], key=lambda r: r["diff"]) for f in fs]
            top = max(best, key=lambda r: r["diff"])
            parts.append(f"{span}, no self-supervised init beats {name(ref)} at this budget (largest difference: "
                         f"{name(top['init'])} {diff_text(top)} at {pct(top['fraction'])}"
                         + (f"; {', '.join(name(i) for i in worse)} trail{'s' if len(worse) == 1 else ''} it" if worse else "")
                         + ")")
    never = [i for i in ssl if not any(r["init"] == i and r["decision"] == "better" for rs in at.values() for r in rs)]
    text = "; ".join(parts) + "."
    if never and len(never) < len(ssl):
        who = ", ".join(name(i) for i in never)
        text += f" {who[0].upper()}{who[1:]} never beat{'s' if len(never) == 1 else ''} {name(ref)}."
    return f"**{PROTOCOL_WORDS.get(protocol, protocol)}:** {text}"


def decided(rows: list[dict], protocols: list[str], baselines: list[str], ssl: list[str],
            ceiling: frozenset = frozenset()) -> dict[str, int]:
    """The verdict's protocol x label-fraction cells (test balanced accuracy, fine-tune / linear, vs the first
    reference, after Holm) by what they say: `ssl` a self-supervised init beats the reference; `reference` none
    does and at least one trails it (the reference leads or ties at the top); `open` no difference is significant;
    `ceiling` none is and the cell is in `ceiling` ((protocol, fraction) pairs, at_ceiling()). The verdict calls
    the budget too small to decide exactly when no cell is decided and at least one is open."""
    ref = next((r for r in REFERENCES if r in baselines), None)
    mine = [r for r in rows if r["split"] == "test" and r["regime"] == "fractions" and r["metric"] == "balanced_accuracy"
            and r["reference"] == ref and r["init"] in ssl and r["protocol"] in VERDICT_PROTOCOLS and r["protocol"] in protocols]
    cells = defaultdict(list)
    for r in mine:
        cells[(r["protocol"], r["fraction"])].append(r["decision"])
    kinds = ["ssl" if "better" in d else "reference" if "worse" in d else "ceiling" if k in ceiling else "open"
             for k, d in cells.items()]
    return {"ssl": kinds.count("ssl"), "reference": kinds.count("reference"), "open": kinds.count("open"),
            "ceiling": kinds.count("ceiling"), "cells": len(kinds), "reference_init": ref or ""}


def at_ceiling(means: dict, protocols: list[str], baselines: list[str], ssl: list[str], fractions: list[float]) -> frozenset:
    """The verdict's (protocol, fraction) cells in which the first reference and every SSL init score a mean test
    balanced accuracy of at least CEILING. means: (protocol, init, fraction) -> mean over seeds."""
    ref = next((r for r in REFERENCES if r in baselines), None)
    return frozenset((pr, f) for pr in protocols if pr in VERDICT_PROTOCOLS for f in fractions
                     if ref and all(means.get((pr, i, f), 0.0) >= CEILING for i in [ref, *ssl]))


def story(budget: str, d: dict) -> str:
    """The one sentence every view of a run repeats (report, parent run, registry, Prefect log), from the same
    decisions as the verdict, so a champion is never read as an answer the comparison did not give. d: decided()."""
    ref = name(d["reference_init"]) if d.get("reference_init") else "the reference"
    if d["ssl"] + d["reference"] + d["open"] == 0 and d.get("ceiling"):
        return (f"budget `{budget}`: {ref} and every self-supervised init are at the ceiling (mean test balanced "
                f"accuracy ≥ {CEILING:g}) in every protocol × label-fraction cell, so this data cannot show whether "
                f"self-supervision beats {ref} by more than {1 - CEILING:g}; the champion is the best init on validation")
    if d["ssl"] + d["reference"] == 0:
        return (f"budget `{budget}`: too small to decide whether self-supervision beats {ref}; the champion is the best "
                f"init on validation, not an answer. {NEXT_BUDGET.get(budget, NEXT_BUDGET['cpu'])}")
    return (f"budget `{budget}`: a self-supervised init beats {ref} in {d['ssl']} of {d['cells']} protocol × "
            f"label-fraction cells, {ref} leads or ties at the top in {d['reference']}, {d['open']} undecided"
            + (f", {d['ceiling']} at the ceiling" if d.get("ceiling") else "")
            + " (the verdict in the report); the champion is the best init on validation")


@dataclass(frozen=True)
class Design:
    """What the comparison ran: its protocols, baseline and SSL inits, label fractions, the budget's name, the test
    split's size, the seeds, and what a fine-tune cell got, in words ("2 epochs of batch 32"); ceiling: the
    (protocol, fraction) cells where every compared init scores at least CEILING (at_ceiling()); pretrain_per_seed:
    each seed's SSL cells start from their own pretraining run (budgets.<budget>.pretrain_per_seed)."""
    protocols: list[str]
    baselines: list[str]
    ssl: list[str]
    fractions: list[float]
    budget: str
    n_test: int
    n_seeds: int
    training: str
    ceiling: frozenset = frozenset()
    pretrain_per_seed: bool = False


def verdict(rows: list[dict], design: Design, shift: dict | None = None) -> str:
    """A few generated sentences: per label budget, does pretraining on the domain's images beat the baseline?
    shift: the shift_sentence arguments, when a second source was scored."""
    protocols, baselines, ssl, fractions = design.protocols, design.baselines, design.ssl, design.fractions
    budget, n_test, n_seeds, training = design.budget, design.n_test, design.n_seeds, design.training
    ref = next((r for r in REFERENCES if r in baselines), None)
    if ref is None or not ssl:
        return ("No verdict: the comparison needs a baseline (imagenet or random in inits.baselines) and at least one "
                "self-supervised init.")
    test = [r for r in rows if r["split"] == "test" and r["regime"] == "fractions" and r["metric"] == "balanced_accuracy"]
    lines = []
    for protocol in [p for p in VERDICT_PROTOCOLS if p in protocols]:
        mine = [r for r in test if r["protocol"] == protocol and r["reference"] == ref and r["init"] in ssl]
        text = _protocol_verdict(mine, protocol, ref, ssl, fractions,
                                 frozenset(f for pr, f in design.ceiling if pr == protocol))
        if text:
            lines.append(text)
    m = next((r["family_size"] for r in test if r["reference"] == ref), 0)
    how = (f"Test balanced accuracy, difference to {name(ref)} with its 95 % interval (paired over {n_seeds} seeds, "
           f"{N_BOOT} stratified bootstrap resamples of {n_test} test images), decided at α = {ALPHA} after Holm "
           f"correction over {m} comparisons. " + (
               f"Each self-supervised init is pretrained once per seed ({n_seeds} runs): the intervals include the "
               f"pretraining's own variance." if design.pretrain_per_seed else
               f"Each self-supervised encoder is one pretraining run, shared by the {n_seeds} seeds: the intervals "
               f"leave out the pretraining's own variance."))
    d = decided(rows, protocols, baselines, ssl, design.ceiling)  # the cells the story counts
    if d["ssl"] + d["reference"] + d["open"] == 0 and d["ceiling"]:
        lines.insert(0, f"**This data cannot tell the self-supervised inits from {name(ref)}**: they all score a mean "
                        f"test balanced accuracy of at least {CEILING:g} in every protocol × label fraction and no "
                        f"difference is significant; a larger budget could show differences under {1 - CEILING:g} at most.")
    elif d["ssl"] + d["reference"] == 0:
        lines.insert(0, f"**The `{budget}` budget is too small to decide**: no difference between a self-supervised init "
                        f"and {name(ref)} is significant ({n_test} test images, {n_seeds} seeds, fine-tune cells of "
                        f"{training}). {NEXT_BUDGET.get(budget, NEXT_BUDGET['cpu'])}")
    if ref == "imagenet" and "random" in baselines:
        vs = [r for r in test if r["init"] == "imagenet" and r["reference"] == "random" and r["protocol"] in protocols]
        wins = [r for r in vs if r["decision"] == "better"]
        if vs:
            lines.append(f"ImageNet beats the random init in {len(wins)} of {len(vs)} protocol × label-fraction cells.")
    if shift:
        lines.append(shift_sentence(**shift))
    return "\n\n".join([*lines, how])


def shift_sentence(name_: str, n: int, test: dict[str, float], shifted: dict[str, float], champion: str,
                   champion_test: float | None, champion_shift: float | None) -> str:
    """Whether the ranking of the fine-tuned inits (100 % labels, balanced accuracy) holds on a second source."""
    order_in = sorted(test, key=test.get, reverse=True)
    order_out = sorted(shifted, key=shifted.get, reverse=True)
    tau = stats.kendalltau([test[i] for i in order_in], [shifted[i] for i in order_in]).statistic if len(test) > 1 else 1.0
    holds = order_in[0] == order_out[0]
    text = (f"Out of domain (`{name_}`, {n} images), the fine-tuned inits at 100 % labels rank "
            f"{' > '.join(name(i) for i in order_out)} (in-domain: {' > '.join(name(i) for i in order_in)}; "
            f"Kendall τ = {tau:.2f}): the leader {'holds' if holds else 'changes'} out of domain"
            f"{', and so does the order' if tau >= 0.6 else ', the order below it changes' if holds else ''}.")
    if champion_test is not None and champion_shift is not None:
        text += (f" The champion ({name(champion)}) scores {champion_test:.3f} balanced accuracy in-domain and "
                 f"{champion_shift:.3f} on `{name_}`.")
    return text


def table(rows: list[dict], protocol: str, regime: str, fractions: list[float], ref: str, metric: str) -> str:
    """Markdown: one row per init, one column per fraction: difference [interval], marked where Holm decides."""
    sel = [r for r in rows if r["split"] == "test" and r["protocol"] == protocol and r["regime"] == regime
           and r["reference"] == ref and r["metric"] == metric]
    inits = list(dict.fromkeys(r["init"] for r in sel))
    if not inits:
        return ""
    mark = {"better": " ▲", "worse": " ▼", "no difference": ""}
    head = "| init − " + ref + " | " + " | ".join(pct(f) for f in fractions) + " |\n|---|" + "---|" * len(fractions) + "\n"
    body = []
    for init in inits:
        cells = []
        for f in fractions:
            r = next((r for r in sel if r["init"] == init and r["fraction"] == f), None)
            cells.append("—" if r is None else f"{diff_text(r)}{mark[r['decision']]}")
        body.append(f"| {init} | " + " | ".join(cells) + " |")
    return head + "\n".join(body) + "\n"
