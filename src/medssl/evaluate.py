"""Stage `evaluate`: test metrics of the champion's classifier and the one report in reports/ (markdown + HTML):
the init x protocol x fraction x seed comparison (medssl.report), then the champion."""
from __future__ import annotations

import csv
from pathlib import Path

import mlflow
import numpy as np
import torch

from medssl import figures, tracking
from medssl.checkpoints import how_chosen, load_classifier, user_named
from medssl.compare import ANSWER, N_BOOT
from medssl.config import Params
from medssl.core.engine import pick_device, predict_proba
from medssl.core.paired import Bootstrap
from medssl.core.train import scores
from medssl.data.prepare import load_prepared
from medssl.data.sources import md5sum
from medssl.guard import one_writer
from medssl.io import write_json, write_text
from medssl.layout import Layout
from medssl.metric_names import TABLE
from medssl.metrics import confusion, interval_keys, task_metrics, with_interval



def table_keys(meta: dict) -> tuple[str, ...]:
    """The champion's table columns: quadratic κ first for ordinal grades; sensitivity and specificity for binary."""
    task = meta.get("task")
    if task == "ordinal":
        return ("kappa_quadratic", *TABLE)
    if task == "binary":
        return (*TABLE, "sensitivity", "specificity")
    return TABLE


def read_curves(path: Path) -> list[dict]:
    with open(path) as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def _table(rows: dict[str, dict], keys=TABLE) -> str:
    """A row per init; a score with a 95 % interval in the dict (interval_keys) shows it in brackets."""
    head = "| init | " + " | ".join(keys) + " |\n|---|" + "---|" * len(keys) + "\n"
    return head + "".join(f"| {i} | " + " | ".join(with_interval(m, k) for k in keys) + " |\n" for i, m in rows.items())


def champion_intervals(y: np.ndarray, proba: np.ndarray, seed: int) -> dict[str, float]:
    """The champion's accuracy, balanced accuracy and macro AUC on test, each with its 95 % interval over stratified
    bootstrap resamples of the test images (the comparison's resampling, compare.N_BOOT): interval_keys -> bound."""
    return {key: bound for metric, ci in Bootstrap(y, N_BOOT, seed).interval(proba).items()
            for key, bound in zip(interval_keys(metric), ci)}


@one_writer(lambda a: "evaluate")
def run_evaluate(p: Params, lay: Layout = Layout()) -> dict:
    """Test metrics of the champion's classifier (chosen on validation by `finetune`) and the report."""
    device = pick_device()
    model, summary = load_classifier(lay.classifier, device)  # its provenance (init, run, validation) travels in the file
    splits, meta = load_prepared(lay, summary["image_size"])  # the test images at the size it was trained at
    classes = meta["classes"]
    te_y = splits["test"].labels
    out = lay.reports
    out.mkdir(parents=True, exist_ok=True)

    proba = predict_proba(model, torch.from_numpy(splits["test"].images).to(device))
    test = scores(te_y, proba, classes)
    held = proba.cpu().numpy()
    test |= task_metrics(test, meta) | champion_intervals(te_y, held, p.seed)
    init, curves = summary["init"], read_curves(lay.finetune_curves)
    figures.save(figures.confusion_figure(confusion(te_y, held), classes, f"{init} (test)"),
                 out / "confusion.png", dpi=110)
    figures.save(figures.curves_figure(curves, init), out / "curves.png")
    with tracking.resume_run(summary["run_id"], keep_end=True):
        tracking.log_datasets(p, meta, {"test": len(te_y)}, lay.raw(p.data.path), summary["image_size"])
        tracking.log_summary(test, "summary/test.json")  # a table: the parent run's headline holds the sortable test/*
        mlflow.log_artifact(str(out / "confusion.png"), "plots")
    result = {"init": init, "test": test, "val": summary["val"], "best_epoch": summary["best_epoch"],
              "gap_at_best": summary["gap_at_best"], "run_id": summary["run_id"]}
    write_json(lay.test_metrics, {init: {**test, "model_md5": md5sum(lay.classifier)}})  # export checks it scored this file

    from medssl.data.shift import load_shift
    from medssl.fusion import fusion_cells
    from medssl.report import comparison

    champ = {"init": init, "test_balanced_accuracy": test["balanced_accuracy"]}
    shifted = load_shift(p, meta, summary["image_size"])
    if shifted is not None:  # the champion on the second source too (scored only, never selected on)
        shift = scores(shifted.labels, predict_proba(model, torch.from_numpy(shifted.images).to(device)), classes)
        champ["shift_balanced_accuracy"] = shift["balanced_accuracy"]
        result["shift"] = shift
        with tracking.resume_run(summary["run_id"], keep_end=True):
            tracking.log_summary(shift, "summary/shift.json")
    select = p.export.select_metric
    fused = fusion_cells(p, classes, lay) if p.grid.fusion else ([], {})
    verdict, section, comp = comparison(p, classes, out, lay, champ, fused)
    cands, finalists = summary.get("candidates_val") or {}, summary.get("finalists_val")
    tied = [i for i, v in cands.items() if v == max(cands.values())]  # the champion among them: finetune.champion_of
    gap = summary["gap_at_best"]
    keys = table_keys(meta)
    smoke = (f"**Smoke run (`budget: {p.budget}`), not an answer**: it checks every stage end to end in minutes. "
             f"For the answer: {ANSWER}.\n\n"
             if p.budget == "demo" else "")
    md = (
        smoke + f"# medssl report: {p.data.name}, {p.model.backbone} @ {p.image_size}px"
        + (f" (the champion @ {summary['image_size']}px)" if summary["image_size"] != p.image_size else "")
        + f", budget `{p.budget}`\n\n"
        f"Data md5 `{meta['raw_md5']}`; n = {meta['n']}; seed {p.seed}; git `{tracking.git_commit()}`.\n\n"
        f"Task: {meta.get('task', 'multiclass')}, {len(classes)} classes ({', '.join(classes)})"
        + (f", positive class `{meta['positive_class']}`" if meta.get("positive_class") else "")
        + f"; {'grey' if meta.get('channels', 3) == 1 else 'RGB'} images; "
        + ("the classifier's init named by the user" if user_named(summary) else f"champion chosen on validation `{select}`")
        + ".\n\n"
        f"## Verdict\n\n{verdict}\n\n"
        f"In one line: {comp['verdict']['story']}.\n\n"
        + section
        + f"\n## Champion: {init}\n\n"
        f"{init} was {how_chosen(select, summary)}"
        + (f". The grid's fine-tune cells at 100 % labels, mean validation `{select}` over seeds: "
           + ", ".join(f"{i} {v:.4f}" for i, v in cands.items()) if cands else "")
        + (f"; a tie at the top ({', '.join(tied)}) broken by the higher mean validation macro AUC, then the lower "
           "calibration error (ECE)" if len(tied) > 1 and not finalists else "")
        + f". It was trained on all {meta['n']['train']} train images at {summary['image_size']} px for "
        f"{summary.get('epochs', p.run_budget.finetune_epochs)} epochs "
        f"(seed {p.seed}), best epoch {summary['best_epoch']} on validation"
        + (f", its weights a moving average over its steps (decay {summary['ema_decay']:.4f}, `finetune.ema_window`)"
           if summary.get("ema_decay") else "")
        + (", its probabilities averaged over each image's 8 flips and transposes (`finetune.views`; validation at one "
           f"view: `{select}` {summary['val_one_view'][select]:.4f})" if summary.get("views", 1) == 8 else "")
        + f".\n\n### Validation (best epoch)\n\n{_table({init: summary['val'] | task_metrics(summary['val'], meta)}, keys)}\n"
        f"### Test\n\n{_table({init: test}, keys)}\n"
        f"In brackets: the 95 % interval over {N_BOOT} stratified bootstrap resamples of the {len(te_y)} test images "
        "(class counts kept): what the test sample alone leaves uncertain, for this one trained model.\n\n"
        f"Gap at best epoch (train - val): acc {gap['gap_accuracy']:+.3f}, loss {gap['gap_loss']:+.3f}.\n\n"
        "![curves](curves.png)\n![confusion](confusion.png)\n\n"
    )
    write_text(lay.report_md, md)
    write_text(out / "report.html", to_html(md, f"medssl report: {p.data.name}", out))
    write_text(lay.verdict, verdict + "\n")
    write_json(lay.report_metrics, {**comp, "champion": init,
                                    **({"champion_shift": champ["shift_balanced_accuracy"]} if shifted is not None else {})})
    write_json(lay.headline_metrics, headline(p, init, test, comp))
    _log_report(p, out, verdict, comp)
    result["verdict"] = verdict
    return result


def _data_uri(png: Path) -> str | None:
    import base64

    return f"data:image/png;base64,{base64.b64encode(png.read_bytes()).decode()}" if png.is_file() else None


def inline_images(md: str, folder: Path) -> str:
    """The markdown with its local PNGs embedded (`![x](a.png)` -> data URI): it renders wherever it is shown
    (the Prefect artifact has no files beside it)."""
    import re

    return re.sub(r"!\[([^\]]*)\]\(([^):/]+\.png)\)",
                  lambda m: f"![{m.group(1)}]({_data_uri(folder / m.group(2)) or m.group(2)})", md)


def inline_tables(html: str, folder: Path) -> str:
    """Links to the report's own CSV files point into the page instead: each becomes a collapsed table at the end
    (`<details id="paired_differences.csv">`, opened by following the link). A relative link leads nowhere in
    MLflow's sandboxed artifact viewer (about:blank#blocked) or in a Prefect artifact. File names are the
    report's own (letters, digits, `_`, `.`), so they go into the attributes as they are."""
    import csv
    import html as escape
    import re

    names = [n for n in dict.fromkeys(re.findall(r'href="([\w.-]+\.csv)"', html)) if (folder / n).is_file()]
    if not names:
        return html

    def cell(v: str) -> str:  # long decimals to 4 significant digits, the rest as written
        return f"{float(v):.4g}" if re.fullmatch(r"-?\d+\.\d{5,}(e-?\d+)?", v) else escape.escape(v)

    parts = []
    for n in names:
        with open(folder / n, newline="") as f:
            content = list(csv.reader(f))
        head, rows = (content[0], content[1:]) if content else ([], [])  # empty: no comparison was possible
        table = ("<table><tr>" + "".join(f"<th>{escape.escape(h)}</th>" for h in head) + "</tr>"
                 + "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in r) + "</tr>" for r in rows) + "</table>")
        parts.append(f'<details id="{n}"><summary>{n}: {len(rows)} rows (the file beside this report)</summary>'
                     f"{table}</details>")
        # MLflow's viewer (a sandboxed blob: frame that allows scripts) ignores a fragment link: open and scroll by hand
        html = html.replace(f'href="{n}"', f'href="#{n}" onclick="const d = document.getElementById(\'{n}\'); '
                                           f'd.open = true; d.scrollIntoView(); return false"')
    return html + "<h2>Tables</h2>" + "".join(parts)


def to_html(md: str, title: str, folder: Path) -> str:
    """One self-contained page: the report's PNGs are embedded (data URIs), so it renders the same opened from
    disk, in MLflow's artifact viewer or anywhere it is copied."""
    import markdown

    body = inline_tables(markdown.markdown(inline_images(md, folder), extensions=["tables"]), folder)
    style = ("body{font-family:sans-serif;max-width:1200px;margin:2em auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px}img{max-width:100%}summary{cursor:pointer}")
    return f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title><style>{style}</style></head><body>{body}</body></html>"


def headline(p: Params, init: str, test: dict, comp: dict) -> dict:
    """What `dvc metrics show` shows by default, in one table under 160 columns: the budget, the champion and its
    test accuracy, balanced accuracy and macro AUC, and the verdict's cells (a self-supervised init ahead of the
    reference init, ImageNet / the reference ahead or tied at the top / undecided / at the ceiling: the same
    columns for every run, so `dvc metrics diff` lines them up).
    Everything else is in metrics/test.json, metrics/report.json (every protocol x init x fraction and paired
    difference) and metrics/export.json."""
    v = comp["verdict"]
    return {"budget": p.budget, "champion": init,
            "test": {"acc": round(test["accuracy"], 4), "bal_acc": round(test["balanced_accuracy"], 4),
                     "auc": round(test["auc_macro"], 4)},
            "cells": {"ssl": v["ssl"], "reference": v["reference"], "open": v["open"], "ceiling": v.get("ceiling", 0)}}


def comparison_rows(comp: dict) -> dict[str, list]:
    """The comparison as one table, a row per protocol x init x label fraction: mean test balanced accuracy over
    the seeds, and the paired difference to the reference init with its 95 % interval and Holm-adjusted p."""
    ref = comp["verdict"]["reference_init"]
    paired = comp.get("paired", {}).get("test", {}).get("balanced_accuracy", {})
    cols = {k: [] for k in ("protocol", "init", "labels", "test_balanced_accuracy", f"minus_{ref}", "ci_low", "ci_high",
                            "p_holm")}
    for protocol, inits in comp["balanced_accuracy"].items():
        for init, by_fraction in inits.items():
            for fraction, mean in by_fraction.items():
                d = paired.get(protocol, {}).get("fractions", {}).get(fraction, {}).get(f"{init}-vs-{ref}", {})
                for k, v in zip(cols, (protocol, init, fraction, mean, d.get("diff"), d.get("lo"), d.get("hi"),
                                       d.get("p_holm"))):
                    cols[k].append(v)
    return cols


def _log_report(p: Params, folder: Path, verdict: str, comp: dict) -> None:
    """reports/ -> the pipeline's parent MLflow run (medssl pipeline, Prefect), else a `report` run; the verdict
    becomes that run's description, and its tags say whether it decides (the same sentence as the report); the
    comparison as an MLflow table `comparison.json` (one row per protocol x init x fraction: sortable in the UI)."""
    status = comp["verdict"]
    ceiling = f"/ ceiling {status['ceiling']} " if status.get("ceiling") else ""
    tags = {"mlflow.note.content": verdict, "verdict": status["story"],
            "verdict_cells": f"ssl {status['ssl']} / {status['reference_init']} {status['reference']} / open {status['open']} "
                             f"{ceiling}of {status['cells']}",
            "budget": p.budget}
    parent = tracking.parent_run_id()
    if parent:
        client = mlflow.MlflowClient()
        client.log_artifacts(parent, str(folder), "reports")
        tracking.log_table(comparison_rows(comp), "comparison.json", run_id=parent)
        for k, v in tags.items():
            client.set_tag(parent, k, v)
        return
    with tracking.stage_run(p, "report", {**tracking.base_tags(p), "stage": "evaluate", **tags}):
        mlflow.log_artifacts(str(folder), "reports")
        tracking.log_table(comparison_rows(comp), "comparison.json")
