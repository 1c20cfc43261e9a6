"""Prefect flow `medssl-pipeline`: the dvc.yaml stages as tasks, calling the same functions.

Pretraining methods run concurrently. The grid runs as a subflow `medssl-grid` of independent shards (one per
init x grid seed) on the task runner params.yaml `scale` names: threads in this process (default), a Dask
cluster at `scale.dask_address`, or a local Dask cluster (one worker per GPU with dask-cuda on a multi-GPU
machine). Shards get their inputs by content hash (medssl.cas) and return their cells as plain data; the
grid-<init> tasks here write the same files `medssl grid <init>` writes. Each task is retried on failure
(`retries`), and a failing task fails the flow run with its MLflow run FAILED.
"""
from __future__ import annotations

import os
import time
from pathlib import Path


import mlflow
import torch
from prefect import flow, get_run_logger, task
from prefect.artifacts import (create_markdown_artifact, create_progress_artifact, create_table_artifact,
                               update_progress_artifact)
from prefect.futures import PrefectFuture, as_completed
from prefect.task_runners import ThreadPoolTaskRunner

from medssl import tracking
from medssl.checkpoints import encoder_file, encoder_seeds
from medssl.config import Params, RunOverrides, load_params
from medssl.data.prepare import run_prepare
from medssl.data.sources import run_fetch
from medssl.evaluate import inline_images, run_evaluate
from medssl.export import champion_line, run_export
from medssl.finetune import run_finetune
from medssl.core.engine import pick_device
from medssl.grid import InitGrid, Shard, grid_data, grid_tags, save_grid_data, write_grid
from medssl.host import at_once
from medssl.scale import grid_flow, task_runner
from medssl.layout import Layout
from medssl.metric_names import BRIEF, LABEL
from medssl.metrics import with_interval
from medssl.pretrain import run_pretrain

ROOT = Path(__file__).resolve().parents[1]
LAY = Layout(ROOT)  # stage outputs live at the project root, as with dvc repro
# Concurrent stages share one process, as many as medssl.host.at_once says: on a CPU one stage per core with one
# torch thread each (set in the flow): N stages x N threads would oversubscribe the cores ~N-fold.
WORKERS = at_once(torch.cuda.is_available(), len(os.sched_getaffinity(0)))


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
def grid_task(p: Params, init: str, shards: list[Shard], run_id: str, seconds: float) -> dict:
    """An init's shards -> the files `medssl grid <init>` writes; its MLflow grid run FINISHED."""
    data, meta = grid_data(p.for_init(init), LAY)
    ig = InitGrid(p=p.for_init(init), init=init, data=data, meta=meta, lay=LAY, device=pick_device(), run_id=run_id)
    with tracking.resume_run(run_id):
        result = write_grid(ig, shards, seconds)
    return {k: v for k, v in result.items() if k != "cells"}


def grid_inputs(p: Params, parent_id: str) -> tuple[dict[str, dict], dict, int]:
    """init -> what its shards read (and the prepared meta, the pool's size), by content: the grid's data, the prepared meta, the SSL
    encoders (`encoders`: s<pretraining seed> -> ref). On a Dask
    runner with a tracking server, the files are logged to the parent run too, so workers without this file
    system fetch them from MLflow."""
    from medssl import cas

    data, meta = grid_data(p, LAY)
    path = LAY.root / ".medssl/grid-inputs/data.npz"
    save_grid_data(data, path)
    ship = p.scale.runner == "dask" and tracking.tracking_uri().startswith("http")
    share = (lambda r: cas.publish(r, parent_id)) if ship else (lambda r: r)
    common = {"data": share(cas.ref(path)), "meta": share(cas.ref(LAY.meta))}
    refs = {init: common | ({"encoders": {f"s{s}": share(cas.ref(encoder_file(p, init, s, LAY))) for s in encoder_seeds(p, init)}}
                            if init in p.inits.ssl else {}) for init in p.inits.all}
    return refs, meta, len(data["pool"].labels)


@task(name="evaluate")
def evaluate_task(p: Params) -> dict:
    return run_evaluate(p, LAY)


@task(name="export")
def export_task(p: Params) -> dict:
    return run_export(p, LAY)


class Board:
    """Artifacts of a flow run's stages: medssl-progress, updated in place as each stage ends (the share ended;
    its description names the last one and its state), and medssl-stages, each stage's state and minutes since
    the start, written once when the flow ends (a table artifact cannot be updated in place: one per change
    would bury the results and the report)."""

    def __init__(self, names: list[str]):
        self.t0, self.n, self.k = time.time(), len(names), 0
        self.bar = create_progress_artifact(0.0, key="medssl-progress", description=f"{self.n} stages")
        self.rows = {n: {"stage": n, "state": "not ended", "minutes": ""} for n in names}

    def ended(self, name: str, state: str) -> None:
        self.k += 1
        self.rows[name] |= {"state": state, "minutes": round((time.time() - self.t0) / 60, 2)}
        update_progress_artifact(self.bar, 100.0 * self.k / self.n,
                                 description=f"{self.k}/{self.n} stages ended; last: {name} {state}")

    def close(self) -> None:
        create_table_artifact(list(self.rows.values()), key="medssl-stages", description="medssl-pipeline stages")

    def follow(self, stages: dict[str, PrefectFuture]) -> None:
        """Wait for `stages`, reporting each as it ends (a failure is raised later, where its result is read)."""
        names = {id(f): n for n, f in stages.items()}
        for fut in as_completed(list(stages.values())):
            try:  # the future's own state object can still read Running here; its result cannot
                fut.result()
                state = "Completed"
            except BaseException as e:
                state = f"Failed ({type(e).__name__})"
            self.ended(names[id(fut)], state)


def results_markdown(p: Params, results: dict, export: dict, parent_id: str) -> str:
    uri = tracking.tracking_uri()
    web = uri.startswith("http")
    exp = tracking.experiment_id(p)

    def run_link(run_id: str) -> str:  # the run page in MLflow's model-training view, not its GenAI one
        return f"[{run_id[:8]}]({tracking.run_link(exp, run_id)})" if web else f"`{run_id}`"

    lines = [f"# medssl-pipeline: {p.data.name}, {p.model.backbone}, budget `{p.budget}`", "",
             "## Verdict", "", results["verdict"], "", "## Champion", "",
             f"Selected on validation `{p.export.select_metric}`; test metrics never feed a choice.", "",
             "| init | " + " | ".join(f"{split} {LABEL[m]}" for split in ("val", "test") for m in BRIEF) + " | MLflow run |",
             "|---" * (2 * len(BRIEF) + 2) + "|"]
    init = results["init"]
    scores = " | ".join(with_interval(results[split], m) for split in ("val", "test") for m in BRIEF)  # test: [95 % interval]
    lines.append(f"| {init}{' (champion)' if init == export['champion'] else ''} | {scores} | {run_link(results['run_id'])} |")
    model = p.export.registered_model
    version = (f"[{model} v{export['version']}]({uri}/#/models/{model}/versions/{export['version']})" if web
               else f"`{model}` v{export['version']}")
    moved = (f"→ `{export['model_uri']}` = {version}" if export["promoted"]
             else f"registered as {version}, not promoted (`{export['model_uri']}` unchanged)")
    lines += ["", f"**Champion:** {export['champion']} ({export['chosen']}) "
              f"{moved}: {export['reason']}; "
              f"ONNX parity max |diff| {export['parity_max_abs_diff']:.2e} on {export['parity_images']} images.",
              "", f"Parent MLflow run: {run_link(parent_id)} ({uri})"]
    return "\n".join(lines)


@flow(name="medssl-pipeline", task_runner=ThreadPoolTaskRunner(max_workers=WORKERS), log_prints=True)
def pipeline(data_path: str | None = None, image_size: int | None = None, inits: list[str] | None = None,
             epochs: int | None = None, pretrain_epochs: int | None = None, seed: int | None = None,
             budget: str | None = None, max_train: int | None = None, max_eval: int | None = None,
             grid_epochs: int | None = None, grid_max_train: int | None = None, fractions: list[float] | None = None,
             retries: int = 1, params_path: str = "params.yaml", runner: str | None = None,
             dask_address: str | None = None, dataset: str | None = None) -> dict:
    """Run prepare -> pretrain -> grid -> fine-tune (champion) -> evaluate (report) -> export with params.yaml plus
    these overrides; runner (threads | dask) and dask_address override params.yaml `scale` for the grid's shards;
    dataset: a MedMNIST flag or the path of an npz, a CSV or a class-folder tree (params.yaml's data otherwise)."""
    logger = get_run_logger()
    if not torch.cuda.is_available():
        torch.set_num_threads(1)
    params_path = ROOT / params_path  # relative to the project, whatever the worker's working directory
    over = RunOverrides.pick(locals()).dotted(load_params(params_path))
    over |= {k: v for k, v in {"scale.runner": runner, "scale.dask_address": dask_address}.items() if v is not None}
    p = load_params(params_path, over)
    opts = {"retries": retries, "retry_delay_seconds": 5}
    exp = tracking.experiment_id(p)
    with mlflow.start_run(experiment_id=exp, run_name=tracking.unique_name("prefect-pipeline"),
                          tags={**tracking.base_tags(p), "stage": "pipeline", "orchestrator": "prefect",
                                tracking.RUN_TAG: "prefect-pipeline"}) as parent:
        os.environ[tracking.PARENT_ENV] = parent.info.run_id
        board = None
        try:
            mlflow.log_params(tracking.flat_params(p.model_dump()))
            fetched = fetch_task.with_options(**opts).submit(p, data_path)
            prepared = prepare_task.with_options(**opts).submit(p, wait_for=[fetched])
            pretrained = {m: pretrain_task.with_options(**opts).submit(p, m, wait_for=[prepared]) for m in p.inits.ssl}
            board = Board(["fetch", "prepare", *(f"pretrain-{m}" for m in pretrained), "grid shards",
                           *(f"grid-{i}" for i in p.inits.all), "finetune", "evaluate", "export"])
            board.follow({"fetch": fetched, "prepare": prepared, **{f"pretrain-{m}": f for m, f in pretrained.items()}})
            for f in (prepared, *pretrained.values()):
                f.result()  # a failed stage fails the flow here
            refs, meta, n = grid_inputs(p, parent.info.run_id)
            runs = {i: tracking.open_run(p, f"grid-{i}", *grid_tags(p.for_init(i), i, meta, n), parent.info.run_id)
                    for i in p.inits.all}
            t0 = time.time()
            try:
                shards = grid_flow.with_options(task_runner=task_runner(p))(p, refs, runs, retries)
            except BaseException as e:
                board.ended("grid shards", f"Failed ({type(e).__name__})")
                for run_id in runs.values():
                    tracking.close_run(run_id, "FAILED", f"grid shards failed: {type(e).__name__}: {e}")
                raise
            board.ended("grid shards", "Completed")
            seconds = round(time.time() - t0, 1)
            for init, its in shards.items():  # a lost worker's attempt: its runs end KILLED, its cells are not kept
                tracking.end_superseded(exp, [(f"{init}-s{s['seed']}", s["attempt"]) for s in its])
            grids = {i: grid_task.with_options(**opts).submit(p, i, shards[i], runs[i], seconds) for i in p.inits.all}
            finetuned = finetune_task.with_options(**opts).submit(p, wait_for=list(grids.values()))
            evaluated = evaluate_task.with_options(**opts).submit(p, wait_for=[finetuned])
            exported = export_task.with_options(**opts).submit(p, wait_for=[evaluated])
            board.follow({**{f"grid-{i}": f for i, f in grids.items()}, "finetune": finetuned, "evaluate": evaluated,
                          "export": exported})
            export = exported.result()
            results = evaluated.result()
            md = results_markdown(p, results, export, parent.info.run_id)
            create_markdown_artifact(md, key="medssl-results", description="validation/test metrics and champion")
            report = inline_images(LAY.report_md.read_text(), LAY.reports)  # self-contained
            create_markdown_artifact(report, key="medssl-report",
                                     description="init x protocol x label fraction x seed comparison, mean ± 95 % CI")
            mlflow.log_text(md, "prefect/results.md")
            mlflow.set_tags({"champion": export["champion"], "model_version": str(export["version"]),
                             "promoted": str(export["promoted"])})
            logger.info("%s", champion_line(export))
            if export.get("verdict"):
                logger.info("the comparison, %s", export["verdict"])
            return {"champion": export["champion"], "version": export["version"], "parent_run_id": parent.info.run_id,
                    "test_accuracy": export["test_accuracy"], "test_auc_macro": export["test_auc_macro"]}
        finally:
            os.environ.pop(tracking.PARENT_ENV, None)
            if board is not None:  # the stages' table, once, failed or not
                board.close()


if __name__ == "__main__":
    pipeline()
