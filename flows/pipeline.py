"""Prefect flow `medssl-pipeline`: the dvc.yaml stages as tasks, calling the same functions.

Pretraining methods run concurrently, and so do fine-tunes whose inputs are ready; each task is
retried on failure (`retries`), and a failing task fails the flow run with its MLflow run FAILED.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

import mlflow
import torch
from prefect import flow, get_run_logger, task
from prefect.artifacts import (create_markdown_artifact, create_progress_artifact, create_table_artifact,
                               update_progress_artifact)
from prefect.futures import PrefectFuture, as_completed
from prefect.task_runners import ThreadPoolTaskRunner

from medssl import tracking
from medssl.config import Params, load_params, run_overrides
from medssl.data.prepare import run_prepare
from medssl.data.sources import run_fetch
from medssl.evaluate import inline_images, run_evaluate
from medssl.export import run_export
from medssl.finetune import run_finetune
from medssl.grid import run_grid
from medssl.io import read_json
from medssl.layout import Layout
from medssl.pretrain import run_pretrain

ROOT = Path(__file__).resolve().parents[1]
LAY = Layout(ROOT)  # stage outputs live at the project root, as with dvc repro
# Concurrent stages share one process. On a GPU, 4 at once keep it busy; on a CPU, one stage per core with
# one torch thread each (set in the flow): N stages x N threads would oversubscribe the cores ~N-fold.
WORKERS = 4 if torch.cuda.is_available() else max(1, len(os.sched_getaffinity(0)))


@task(name="fetch")
def fetch_task(p: Params, source: str | None) -> str:
    return str(run_fetch(p, LAY, source))


@task(name="prepare")
def prepare_task(p: Params) -> dict:
    return run_prepare(p, LAY)


@task(name="pretrain", task_run_name="pretrain-{method}")
def pretrain_task(p: Params, method: str) -> dict:
    return run_pretrain(p, method, LAY)


@task(name="finetune")
def finetune_task(p: Params) -> dict:
    return run_finetune(p, None, LAY)


@task(name="grid", task_run_name="grid-{init}")
def grid_task(p: Params, init: str) -> dict:
    return {k: v for k, v in run_grid(p, init, LAY).items() if k != "cells"}


@task(name="evaluate")
def evaluate_task(p: Params) -> dict:
    return run_evaluate(p, LAY)


@task(name="export")
def export_task(p: Params) -> dict:
    return run_export(p, LAY)


def grid_table(p: Params, inits: list[str]) -> list[dict]:
    """The report's table as far as the grids have finished: mean test balanced accuracy over seeds, per init and
    protocol (rows) and label fraction (columns)."""
    rows = []
    for init in inits:
        cells = [c for c in read_json(LAY.grid_cells(init))["cells"] if c["regime"] == "fractions"]
        for protocol in p.grid.protocols:
            rows.append({"init": init, "protocol": protocol, **{
                f"{100 * f:g} %": round(float(np.mean([c["test"]["balanced_accuracy"] for c in cells
                                                       if c["protocol"] == protocol and c["fraction"] == f])), 4)
                for f in p.grid.fractions}})
    return rows


def follow(p: Params, stages: dict[str, PrefectFuture]) -> None:
    """While the stages run: a progress artifact (share of stages ended), a table of stages (state, minutes from
    the start) and the report's table as the grids finish; each a new version of its key as a stage ends."""
    t0, names = time.time(), {id(f): n for n, f in stages.items()}
    bar = create_progress_artifact(0.0, key="medssl-progress", description=f"{len(stages)} stages")
    rows = {n: {"stage": n, "state": "running or waiting", "minutes": ""} for n in stages}
    grids_done = []
    for k, fut in enumerate(as_completed(list(stages.values())), 1):
        name, state = names[id(fut)], fut.state
        rows[name] |= {"state": state.name, "minutes": round((time.time() - t0) / 60, 2)}
        update_progress_artifact(bar, 100.0 * k / len(stages), description=f"{k}/{len(stages)} stages ended: {name}")
        create_table_artifact(list(rows.values()), key="medssl-stages", description="medssl-pipeline stages (live)")
        if name.startswith("grid-") and state.is_completed():
            grids_done.append(name.removeprefix("grid-"))
            create_table_artifact(grid_table(p, [i for i in p.inits.all if i in grids_done]), key="medssl-grid",
                                  description="test balanced accuracy, mean over seeds, as the grids finish (live)")


def results_markdown(p: Params, results: dict, export: dict, parent_id: str) -> str:
    uri = tracking.tracking_uri()
    web = uri.startswith("http")
    exp = tracking.experiment_id(p)

    def run_link(run_id: str) -> str:
        return f"[{run_id[:8]}]({uri}/#/experiments/{exp}/runs/{run_id})" if web else f"`{run_id}`"

    lines = [f"# medssl-pipeline: {p.data.name}, {p.model.backbone}, budget `{p.budget}`", "",
             "## Verdict", "", results["verdict"], "", "## Champion", "",
             f"Selected on validation `{p.export.select_metric}`; test metrics never feed a choice.", "",
             "| init | val acc | val bal. acc | val AUC | test acc | test bal. acc | test AUC | MLflow run |",
             "|---|---|---|---|---|---|---|---|"]
    for init, r in {results["init"]: results}.items():
        v, t = r["val"], r["test"]
        lines.append(f"| {init}{' (champion)' if init == export['champion'] else ''} | {v['accuracy']:.4f} | "
                     f"{v['balanced_accuracy']:.4f} | {v['auc_macro']:.4f} | {t['accuracy']:.4f} | "
                     f"{t['balanced_accuracy']:.4f} | {t['auc_macro']:.4f} | {run_link(r['run_id'])} |")
    model = p.export.registered_model
    version = (f"[{model} v{export['version']}]({uri}/#/models/{model}/versions/{export['version']})" if web
               else f"`{model}` v{export['version']}")
    moved = (f"→ `{export['model_uri']}` = {version}" if export["promoted"]
             else f"registered as {version}, not promoted (`{export['model_uri']}` unchanged)")
    lines += ["", f"**Champion:** {export['champion']} {moved}: {export['reason']}; "
              f"ONNX parity max |diff| {export['parity_max_abs_diff']:.2e} on {export['parity_images']} images.",
              "", f"Parent MLflow run: {run_link(parent_id)} ({uri})"]
    return "\n".join(lines)


@flow(name="medssl-pipeline", task_runner=ThreadPoolTaskRunner(max_workers=WORKERS), log_prints=True)
def pipeline(data_path: str | None = None, image_size: int | None = None, inits: list[str] | None = None,
             epochs: int | None = None, pretrain_epochs: int | None = None, seed: int | None = None,
             budget: str | None = None, max_train: int | None = None, max_eval: int | None = None,
             grid_epochs: int | None = None, grid_max_train: int | None = None, fractions: list[float] | None = None,
             retries: int = 1, params_path: str = "params.yaml") -> dict:
    """Run prepare -> pretrain -> grid -> fine-tune (champion) -> evaluate (report) -> export with params.yaml plus these overrides."""
    logger = get_run_logger()
    if not torch.cuda.is_available():
        torch.set_num_threads(1)
    params_path = ROOT / params_path  # relative to the project, whatever the worker's working directory
    over = run_overrides(load_params(params_path), budget=budget, epochs=epochs, pretrain_epochs=pretrain_epochs,
                         image_size=image_size, seed=seed, max_train=max_train, max_eval=max_eval, inits=inits,
                         grid_epochs=grid_epochs, grid_max_train=grid_max_train, fractions=fractions)
    p = load_params(params_path, over)
    opts = {"retries": retries, "retry_delay_seconds": 5}
    exp = tracking.experiment_id(p)
    with mlflow.start_run(experiment_id=exp, run_name=tracking.unique_name("prefect-pipeline"),
                          tags={**tracking.base_tags(p), "stage": "pipeline", "orchestrator": "prefect",
                                tracking.RUN_TAG: "prefect-pipeline"}) as parent:
        os.environ[tracking.PARENT_ENV] = parent.info.run_id
        try:
            mlflow.log_params(tracking.flat_params(p.model_dump()))
            fetched = fetch_task.with_options(**opts).submit(p, data_path)
            prepared = prepare_task.with_options(**opts).submit(p, wait_for=[fetched])
            pretrained = {m: pretrain_task.with_options(**opts).submit(p, m, wait_for=[prepared]) for m in p.inits.ssl}
            grids = [grid_task.with_options(**opts).submit(p, i, wait_for=[pretrained.get(i, prepared)]) for i in p.inits.all]
            finetuned = finetune_task.with_options(**opts).submit(p, wait_for=grids)
            evaluated = evaluate_task.with_options(**opts).submit(p, wait_for=[finetuned])
            exported = export_task.with_options(**opts).submit(p, wait_for=[evaluated])
            stages = {"fetch": fetched, "prepare": prepared, **{f"pretrain-{m}": f for m, f in pretrained.items()},
                      **{f"grid-{i}": f for i, f in zip(p.inits.all, grids)}, "finetune": finetuned,
                      "evaluate": evaluated, "export": exported}
            follow(p, stages)
            export = exported.result()
            results = evaluated.result()
            md = results_markdown(p, results, export, parent.info.run_id)
            create_markdown_artifact(md, key="medssl-results", description="validation/test metrics and champion")
            report = inline_images((LAY.reports / "report.md").read_text(), LAY.reports)  # self-contained
            create_markdown_artifact(report, key="medssl-report",
                                     description="init x protocol x label fraction x seed comparison, mean ± 95 % CI")
            mlflow.log_text(md, "prefect/results.md")
            mlflow.set_tags({"champion": export["champion"], "model_version": str(export["version"])})
            logger.info("champion %s -> %s v%s", export["champion"], export["model_uri"], export["version"])
            return {"champion": export["champion"], "version": export["version"], "parent_run_id": parent.info.run_id,
                    "test_accuracy": export["test_accuracy"], "test_auc_macro": export["test_auc_macro"]}
        finally:
            os.environ.pop(tracking.PARENT_ENV, None)


if __name__ == "__main__":
    pipeline()
