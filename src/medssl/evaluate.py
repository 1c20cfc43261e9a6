"""Stage `evaluate`: test metrics of the export candidates and the one report in reports/ (markdown + HTML):
candidates, then the init x protocol x fraction x seed comparison (medssl.report)."""
from __future__ import annotations

import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import mlflow  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from medssl import tracking  # noqa: E402
from medssl.config import Params  # noqa: E402
from medssl.data.prepare import load_prepared  # noqa: E402
from medssl.device import pick_device, prepare_model  # noqa: E402
from medssl.engine import predict_proba  # noqa: E402
from medssl.io import read_json, write_json, write_text  # noqa: E402
from medssl.metrics import classification_metrics, confusion  # noqa: E402
from medssl.models.classifier import Classifier  # noqa: E402
from medssl.finetune import checkpoint_path, val_metrics_path  # noqa: E402

REPORTS = Path("reports")
TEST_METRICS = Path("metrics/test.json")
REPORT_METRICS = Path("metrics/report.json")
TABLE_KEYS = ("accuracy", "balanced_accuracy", "auc_macro", "kappa", "f1_macro")


def load_classifier(init: str, device: torch.device) -> tuple[Classifier, dict]:
    ckpt = torch.load(checkpoint_path(init), map_location="cpu", weights_only=True)
    model = Classifier(ckpt["backbone"], ckpt["num_classes"], ckpt["dropout"])
    model.load_state_dict(ckpt["state_dict"])
    return prepare_model(model, device).eval(), ckpt


def read_curves(init: str) -> list[dict]:
    with open(f"plots/finetune/{init}.csv") as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def plot_confusion(cm: np.ndarray, classes: list[str], title: str, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(5, 4.5))
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(classes)):
        for j in range(len(classes)):
            ax.text(j, i, cm[i, j], ha="center", va="center", fontsize=8, color="white" if norm[i, j] > 0.5 else "black")
    ax.set(xticks=range(len(classes)), yticks=range(len(classes)), xticklabels=classes, yticklabels=classes,
           xlabel="predicted", ylabel="true", title=title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_curves(curves: list[dict], init: str, path: Path) -> None:
    ep = [c["epoch"] for c in curves]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, key in zip(axes[:2], ("loss", "balanced_accuracy")):
        ax.plot(ep, [c[f"train_{key}"] for c in curves], "o-", label="train (eval mode)")
        ax.plot(ep, [c[f"val_{key}"] for c in curves], "o-", label="val")
        ax.set(xlabel="epoch", title=f"{init}: {key}")
        ax.legend()
    for key in ("gap_loss", "gap_accuracy", "gap_balanced_accuracy"):
        axes[2].plot(ep, [c[key] for c in curves], "o-", label=key)
    axes[2].axhline(0, color="grey", lw=0.8)
    axes[2].set(xlabel="epoch", title=f"{init}: train - val gap")
    axes[2].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_gaps(all_curves: dict[str, list[dict]], path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for init, curves in all_curves.items():
        ep = [c["epoch"] for c in curves]
        axes[0].plot(ep, [c["val_balanced_accuracy"] for c in curves], "o-", label=init)
        axes[1].plot(ep, [c["gap_accuracy"] for c in curves], "o-", label=init)
    axes[0].set(xlabel="epoch", title="validation balanced accuracy")
    axes[1].set(xlabel="epoch", title="overfitting gap (train - val accuracy)")
    axes[1].axhline(0, color="grey", lw=0.8)
    for ax in axes:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _table(rows: dict[str, dict], keys=TABLE_KEYS) -> str:
    head = "| init | " + " | ".join(keys) + " |\n|---|" + "---|" * len(keys) + "\n"
    return head + "".join(f"| {i} | " + " | ".join(f"{m[k]:.4f}" for k in keys) + " |\n" for i, m in rows.items())


def run_evaluate(p: Params) -> dict:
    device = pick_device()
    splits, meta = load_prepared()
    classes = meta["classes"]
    te_x = torch.from_numpy(splits["test"].images).to(device)
    te_y = splits["test"].labels
    mean, std = (torch.tensor(meta[k], device=device) for k in ("mean", "std"))
    REPORTS.mkdir(exist_ok=True)

    results, val_rows, all_curves = {}, {}, {}
    for init in p.inits.all:
        model, _ = load_classifier(init, device)
        proba = predict_proba(model, te_x, mean, std)
        test = classification_metrics(te_y, proba, classes)
        summary = read_json(val_metrics_path(init))
        all_curves[init] = read_curves(init)
        cm_png, curves_png = REPORTS / f"confusion_{init}.png", REPORTS / f"curves_{init}.png"
        plot_confusion(confusion(te_y, proba), classes, f"{init} (test)", cm_png)
        plot_curves(all_curves[init], init, curves_png)
        with tracking.resume_run(summary["run_id"]):
            mlflow.log_metrics({f"test_{k}": v for k, v in test.items()})
            mlflow.log_artifact(str(cm_png), "plots")
            mlflow.log_artifact(str(curves_png), "plots")
        results[init] = {"test": test, "val": summary["val"], "best_epoch": summary["best_epoch"],
                         "gap_at_best": summary["gap_at_best"], "run_id": summary["run_id"]}
        val_rows[init] = summary["val"]
    plot_gaps(all_curves, REPORTS / "gap_all.png")
    write_json(TEST_METRICS, {i: r["test"] for i, r in results.items()})

    select = p.export.select_metric
    champion = max(results, key=lambda i: results[i]["val"][select])
    from medssl.report import comparison

    section, summary = comparison(p, classes, REPORTS)
    md = (
        f"# medssl report: {p.data.name}, {p.model.backbone} @ {p.data.image_size}px, budget `{p.budget}`\n\n"
        f"Data md5 `{meta['raw_md5']}`; n = {meta['n']}; seed {p.seed}; git `{tracking.git_commit()}`.\n\n"
        + section
        + f"\n## Export candidates (100 % labels, seed {p.seed}, {p.epochs.finetune_epochs} epochs)\n\n"
        f"### Validation (best epoch, selected on `{select}`)\n\n{_table(val_rows)}\n"
        f"### Test\n\n{_table({i: r['test'] for i, r in results.items()})}\n"
        f"Gap at best epoch (train - val): "
        + ", ".join(f"{i}: acc {r['gap_at_best']['gap_accuracy']:+.3f}, loss {r['gap_at_best']['gap_loss']:+.3f}"
                    for i, r in results.items())
        + f"\n\nChampion on validation `{select}`: **{champion}**.\n\n"
        "![gaps](gap_all.png)\n\n"
        + "".join(f"#### {i}\n\n![curves](curves_{i}.png)\n![confusion](confusion_{i}.png)\n\n" for i in results)
    )
    write_text(REPORTS / "report.md", md)
    write_text(REPORTS / "report.html", to_html(md, f"medssl report: {p.data.name}"))
    write_json(REPORT_METRICS, {"balanced_accuracy": summary, "champion": champion})
    _log_report(p, REPORTS)
    return results


def to_html(md: str, title: str) -> str:
    import markdown

    body = markdown.markdown(md, extensions=["tables"])
    style = ("body{font-family:sans-serif;max-width:1200px;margin:2em auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px}img{max-width:100%}")
    return f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title><style>{style}</style></head><body>{body}</body></html>"


def _log_report(p: Params, folder: Path) -> None:
    """reports/ -> the pipeline's parent MLflow run (medssl pipeline, Prefect), else a `report` run."""
    parent = tracking.parent_run_id()
    if parent:
        mlflow.MlflowClient().log_artifacts(parent, str(folder), "reports")
        return
    with tracking.model_run(p, "report", {**tracking.base_tags(p), "stage": "evaluate"}):
        mlflow.log_artifacts(str(folder), "reports")
