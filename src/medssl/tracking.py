"""MLflow conventions: one experiment per study, a parent run per pipeline run, nested runs per model."""
from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path
from types import MappingProxyType

import mlflow

from medssl.config import Params, flatten
from medssl.metric_names import LOGGED

DEFAULT_URI = "sqlite:///mlflow.db"
PARENT_ENV = "MEDSSL_PARENT_RUN_ID"
RUN_TAG = "medssl.run"  # a run's stable name (`finetune-imagenet`, `grid-imagenet`); run_name() gives the shown one
SHARD_TAG = "medssl.shard"  # a grid shard (<init>-s<seed>) on a task runner's worker, and its attempt:
ATTEMPT_TAG = "medssl.attempt"  # a retried or rescheduled shard's earlier attempts end KILLED (end_superseded)
PROCESS_TAG = "medssl.process"  # guard.process_id() of the process that owns a RUNNING run
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
# A server that goes away mid-run: a few quick retries, not MLflow's default of minutes of back-off.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
_checked: set[str] = set()
_extra_tags: contextvars.ContextVar[dict] = contextvars.ContextVar("medssl_extra_tags",
                                                                                    default=MappingProxyType({}))
_swept: set[str] = set()


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI", DEFAULT_URI)


def existing_store() -> str:
    """The tracking URI, for commands that only read (predict, serve): the default local store must exist
    already (MLflow would otherwise create an empty mlflow.db wherever the command runs)."""
    from medssl.errors import TrackingUnavailable

    uri = tracking_uri()
    if uri.startswith("sqlite:///"):  # never created (nor an empty one re-initialised) by a command that reads
        db = Path(uri.removeprefix("sqlite:///").partition("?")[0])
        if not db.is_file() or db.stat().st_size == 0:
            raise TrackingUnavailable(f"no MLflow store at {db.resolve()} ({'empty file' if db.is_file() else 'no such file'}); "
                                      f"run from the project directory or set MLFLOW_TRACKING_URI "
                                      f"(e.g. sqlite:////abs/path/mlflow.db)")
        with open(db, "rb") as f:
            if f.read(16) != b"SQLite format 3\x00":
                raise TrackingUnavailable(f"{db.resolve()} is not an SQLite database (damaged or overwritten); restore it "
                                          f"from a backup or point MLFLOW_TRACKING_URI at another store")
    check_server(uri)
    mlflow.set_tracking_uri(uri)
    return uri


def check_server(uri: str | None = None, timeout: float = 3.0) -> None:
    """An http(s) tracking URI must answer /health within `timeout` seconds (once per process)."""
    import requests

    from medssl.errors import TrackingUnavailable

    uri = uri or tracking_uri()
    if not uri.startswith(("http://", "https://")) or uri in _checked:
        return
    try:
        r = requests.get(f"{uri.rstrip('/')}/health", timeout=timeout)
        r.raise_for_status()
    except requests.RequestException as e:
        reason = type(e).__name__ if not isinstance(e, requests.HTTPError) else f"HTTP {e.response.status_code}"
        raise TrackingUnavailable(f"MLflow tracking server {uri} does not answer ({reason} within {timeout:g} s); "
                                  f"start it (`make mlflow-ui`) or set MLFLOW_TRACKING_URI to a running server "
                                  f"(unset: the local sqlite:///mlflow.db)") from None
    _checked.add(uri)


def experiment_id(p: Params) -> str:
    """Set the tracking URI and return the study's experiment, created on first use.

    With the embedded SQLite store, artifacts go to ./mlartifacts (a server decides for itself).
    """
    uri = tracking_uri()
    check_server(uri)
    mlflow.set_tracking_uri(uri)
    exp = mlflow.get_experiment_by_name(p.mlflow.experiment)
    if exp is None:
        location = Path("mlartifacts").resolve().as_uri() if uri.startswith(("sqlite:", "file:")) or "://" not in uri else None
        return mlflow.create_experiment(p.mlflow.experiment, artifact_location=location, tags=experiment_tags(p))
    for k, v in experiment_tags(p).items():  # experiments created before the tags existed
        if k not in exp.tags:
            mlflow.MlflowClient().set_experiment_tag(exp.experiment_id, k, v)
    return exp.experiment_id


# grid-<init> runs (one init's scores, the rows to set side by side) vs their fine-tune cells' runs
LEVEL_TAG = "medssl.level"
GRID_FILTER = f"tags.\"{LEVEL_TAG}\" = 'init'"
ML_VIEW = "workflowType=machine_learning"  # MLflow 3's UI opens on its GenAI overview without it (or its sidebar switch)


def ui_links(exp: str, base: str = "http://127.0.0.1:5000") -> dict[str, str]:
    """Where the answer is in the MLflow UI at `base` (`make mlflow-ui`'s address by default): the experiment's runs,
    and the chart view of the grid-<init> runs, a bar per init in each test_balanced_accuracy_<protocol>_f<fraction>
    chart (expand the pipeline run to show its nested runs)."""
    from urllib.parse import quote

    runs = f"{base.rstrip('/')}/#/experiments/{exp}/runs?{ML_VIEW}"
    return {"experiment": runs, "compare": f"{runs}&compareRunsMode=CHART&searchFilter={quote(GRID_FILTER)}"}


def experiment_tags(p: Params) -> dict[str, str]:
    """What the experiment page says it holds: a description (MLflow shows `mlflow.note.content` on the page),
    the kind of experiment (`mlflow.experimentKind`; MLflow 3.17's UI still opens on its GenAI overview unless
    the link carries ML_VIEW or the sidebar's switch says *Model training*), and the dataset."""
    note = (f"medssl on **{p.data.name}**: pretrain a MobileNetV2 on the dataset's own images (self-supervised) or "
            "start from ImageNet? One parent run per run of the pipeline (`pipeline`, or `prefect-pipeline` from the "
            "Prefect flow; tag `stage = 'pipeline'`): its description is the verdict. Under it: `ssl-<init>` (pretraining; tag `stage = 'pretrain'`; `ssl<seed>-<init>` for the encoders of the other grid seeds), a run named `<init>` per init (tag `medssl.run = 'grid-<init>'`; metrics "
            "`test_balanced_accuracy_<protocol>_f<fraction>`: chart or sort them to set the inits side by side; "
            "every cell a nested run, `f<fraction>-s<seed>` or `imb<ratio>-f1-s<seed>`), `finetune-<init>` (the champion; one per finalist, `budgets.<b>.finalists`) and `export` (the registered model); the "
            "report is among the parent run's artifacts (`reports/report.html`). Filters: `tags.stage = 'pretrain'`; the inits side by side: `tags.\"medssl.level\" = 'init'` in "
            "the chart view (expand the pipeline run), a bar per init in each chart. This page as a table: the sidebar's "
            "*Model training* switch.")
    return {"mlflow.note.content": note, "mlflow.experimentKind": "custom_model_development", "medssl.dataset": p.data.name}


PIPELINE_OUTPUTS = ("dvc.lock", "metrics", "plots", "reports")  # rewritten by the pipeline itself


def git_commit() -> str:
    """HEAD's sha, with `-dirty` when a tracked file differs from it; the files the pipeline rewrites itself
    (dvc.lock, metrics/, plots/, reports/) do not count, or every run after the first would be dirty."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                *(f":(exclude){o}" for o in PIPELINE_OUTPUTS)],
                               capture_output=True, text=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def base_tags(p: Params, data_md5: str | None = None) -> dict[str, str]:
    commit = git_commit()
    tags = {
        "git_commit": commit,
        "dataset": p.data.name,
        "backbone": p.model.backbone,
        "seed": str(p.seed),
        "budget": p.budget,
    }
    if commit != "unknown":
        tags["mlflow.source.git.commit"] = commit.removesuffix("-dirty")  # MLflow's own source tag (UI, search)
    if data_md5:
        tags["data_md5"] = data_md5
    return tags


def flat_params(d: dict, prefix: str = "") -> dict[str, str]:
    return {k: str(v) for k, v in flatten(d, prefix).items()}


GROUPS = ("train", "val", "gap", "test", "shift", "onnx", "parity")  # MLflow's UI makes a chart section per prefix


def metric_key(name: str, group: str | None = None) -> str:
    """`val_balanced_accuracy` -> `val/balanced_accuracy`; other names go under `group` when one is given
    (a pretraining loss -> `pretrain/loss`)."""
    head, sep, rest = name.partition("_")
    if sep and head in GROUPS:
        return f"{head}/{rest}"
    return f"{group}/{name}" if group else name


def log_epoch(row: dict, group: str | None = None) -> None:
    """One per-epoch row ({"epoch": e, name: value, ...}) into the active run, keys grouped by prefix."""
    mlflow.log_metrics({metric_key(k, group): float(v) for k, v in row.items() if k != "epoch"}, step=int(row["epoch"]))


def log_curves(curves: list[dict], group: str | None = None, x: str = "epoch") -> None:
    """Rows of a fit ({x: ..., name: value, ...}; per epoch, or per window of steps with x="step") into the active
    run, at MLflow step row[x], in one request. Only the x key and `epoch` are not logged."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    metrics = [Metric(metric_key(k, group), float(v), now, int(row[x])) for row in curves
               for k, v in row.items() if k not in (x, "epoch")]
    mlflow.MlflowClient().log_batch(mlflow.active_run().info.run_id, metrics=metrics)


def log_scores(split: str, scores: dict) -> None:
    """A split's scores: the headline ones as `<split>/<name>` metrics (searchable, one chart section), all of them
    (per-class recalls included) in the run's table `summary/<split>.json`, not as dozens of one-point charts."""
    mlflow.log_metrics({f"{split}/{k}": float(v) for k, v in scores.items() if k in LOGGED})
    log_summary(scores, f"summary/{split}.json")


def log_summary(values: dict, artifact: str = "summary/run.json") -> None:
    """Single values of a run (best epoch, seconds, best-epoch scores, ...) as an MLflow table (name, value)."""
    log_table({"name": list(values), "value": [float(v) for v in values.values()]}, artifact)


def log_table(columns: dict[str, list], artifact: str, run_id: str | None = None) -> None:
    """Columns as an MLflow table of the active run (or `run_id`): the run's artifacts, and the UI's evaluation view."""
    with warnings.catch_warnings():  # pandas' deprecation notice from inside mlflow.log_table
        warnings.simplefilter("ignore", DeprecationWarning)
        mlflow.log_table(columns, artifact_file=artifact, run_id=run_id)


def log_curves_figure(curves: list[dict], title: str, metric: str = "balanced_accuracy") -> None:
    """The run's curves as one figure, train and val overlaid (`curves.png` in its artifacts)."""
    import matplotlib.pyplot as plt

    from medssl.figures import curves_figure

    fig = curves_figure(curves, title, metric)
    mlflow.log_figure(fig, "curves.png")
    plt.close(fig)


def unique_name(name: str) -> str:
    """`pipeline` -> `pipeline-1123-091204`: a top-level run's name, telling runs apart in tables and chart legends
    (the stable name is the tag `medssl.run`)."""
    return f"{name}-{time.strftime('%m%d-%H%M%S')}"


def run_name(name: str, tags: dict[str, str], parent: str | None) -> str:
    """The name MLflow shows; the stable name is the tag `medssl.run`. MLflow's columns show about 14-17 characters
    of a name, so `grid-imagenet-simclr` and `grid-imagenet-mim` would both read `grid-imagenet-…`: an init's run
    (the one holding its scores) is named by the init alone (`imagenet-simclr`), and its cells, nested under it,
    by what tells them apart there (`f0.01-s0`, `imb10-f1-s0`). A pretraining run is `ssl-<init>` (self-supervised
    learning; `pretrain-imagenet-simclr` and `pretrain-imagenet-mim` would both read `pretrain-imagen…`): it stays
    beside the inits under the pipeline run, where MLflow lists it without "Load more"; an encoder pretrained with
    another seed (budgets.<budget>.pretrain_per_seed) is `ssl<seed>-<init>` (`ssl43-imagenet-mim`). A tuning trial is
    `t<number>-<init>` (`t3-imagenet-simclr`). Other nested runs keep
    the stable name (`finetune-imagenet`, `export`). A run with no parent gets a timestamp (`unique_name`)."""
    if parent is None:
        return unique_name(name)
    if tags.get(LEVEL_TAG) == "init":
        return tags["init"]
    if tags.get("stage") == "pretrain" and "init" in tags:
        init = tags["init"]
        seed = name.removeprefix(f"pretrain-{init}").removeprefix("-s")  # another seed's encoder: pretrain-<init>-s43
        return f"ssl{seed}-{init}"
    if tags.get("stage") == "tune-trial":  # `trial-imagenet-simclr-0003` read `trial-imagenet-…` for three inits
        return f"t{int(tags['optuna_trial'])}-{tags['init']}"
    if tags.get(LEVEL_TAG) == "cell":
        return name.removeprefix(f"grid-{tags['init']}-").replace("fractions-", "").replace("imbalance:", "imb")
    return name


def parent_run_id() -> str | None:
    """The run to nest under: ours (`medssl pipeline`) or the one `mlflow run` started."""
    return os.environ.get(PARENT_ENV) or os.environ.get("MLFLOW_RUN_ID")


def end_status(exc: BaseException) -> str:
    """KILLED for a pruned trial or an interrupt, else FAILED."""
    if isinstance(exc, KeyboardInterrupt) or type(exc).__name__ == "TrialPruned":
        return "KILLED"
    return "FAILED"


@contextlib.contextmanager
def stage_run(p: Params, name: str, tags: dict[str, str], params: dict | None = None, parent: str | None = None,
              system_metrics: bool = False):
    """A run of one stage's work (a trained encoder or classifier, a grid cell, a tuning trial, the report, the
    export), nested under `parent` or the pipeline run when there is one.

    system_metrics: sample CPU, memory (and GPU where pynvml finds one) every 5 s into the run (stage runs; the
    seconds-long nested runs of grid cells would catch no sample). An exception inside marks the run FAILED
    (KILLED when a trial is pruned) and propagates.
    """
    from medssl.guard import process_id

    exp = experiment_id(p)
    parent = parent or parent_run_id()
    if parent:  # a child lives in its parent's experiment (`mlflow run` may have picked another)
        exp = mlflow.get_run(parent).info.experiment_id
    if exp not in _swept:  # once per process: runs of processes that died before this one started
        _swept.add(exp)
        end_stale_runs(exp)
    with _env_run_hidden():
        if system_metrics:
            logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)  # no start/stop lines per run
            mlflow.set_system_metrics_sampling_interval(5)
        run = mlflow.start_run(run_name=run_name(name, tags, parent), experiment_id=exp, parent_run_id=parent, nested=True,
                               tags={**tags, **_extra_tags.get(), RUN_TAG: name, PROCESS_TAG: process_id()},
                               log_system_metrics=system_metrics)
        if system_metrics:  # a stage's run: where to watch it, before the long work starts
            print(f"{name}: MLflow run {run_link(exp, run.info.run_id)}", file=sys.stderr, flush=True)
        try:
            if params:
                mlflow.log_params(flat_params(params))
            yield run
        except BaseException as e:
            status = end_status(e)
            reason = f"{type(e).__name__}: {e}"[:2000]
            with contextlib.suppress(Exception):  # the failure itself may be the tracking server
                mlflow.set_tag("error", reason)
                ptags = mlflow.get_run(parent).data.tags if parent else {}
                if ptags.get("stage") == "pipeline" and "failed_stage" not in ptags:  # not a pruned trial's study;
                    mark_failed_stage(parent, name, reason, status)  # stages side by side: the first to end names it
            mlflow.end_run(status)
            raise
        mlflow.end_run("FINISHED")


@contextlib.contextmanager
def extra_tags(tags: dict[str, str]):
    """Tags every run stage_run starts in this context (thread, task) gets too."""
    token = _extra_tags.set({**_extra_tags.get(), **tags})
    try:
        yield
    finally:
        _extra_tags.reset(token)


def open_run(p: Params, name: str, tags: dict, params: dict, parent: str | None) -> str:
    """A run created now and filled later, possibly by other processes (a grid run whose cells run on workers);
    resume_run() adds to it, close_run() ends it. Returns its id."""
    exp = experiment_id(p)
    parent = parent or parent_run_id()
    if parent:
        exp = mlflow.get_run(parent).info.experiment_id
    client = mlflow.MlflowClient()
    run = client.create_run(exp, run_name=run_name(name, tags, parent), tags={
        **tags, RUN_TAG: name, **({"mlflow.parentRunId": parent} if parent else {})})
    client.log_batch(run.info.run_id, params=[mlflow.entities.Param(k, v[:6000]) for k, v in flat_params(params).items()])
    return run.info.run_id


def close_run(run_id: str, status: str, reason: str | None = None) -> None:
    client = mlflow.MlflowClient()
    if reason:
        client.set_tag(run_id, "error", reason[:2000])
    client.set_terminated(run_id, status)


def end_superseded(exp: str, kept: list[tuple[str, str]]) -> list[str]:
    """kept: (shard, attempt) whose cells were kept. Every run of another attempt of those shards (a worker lost
    mid-shard, a retry) ends KILLED with `killed_reason`, so no cell is counted twice. Returns the names ended."""
    client, ended = mlflow.MlflowClient(), []
    for shard, attempt in kept:
        for run in client.search_runs([exp], f"tags.`{SHARD_TAG}` = '{shard}' and tags.`{ATTEMPT_TAG}` != '{attempt}'",
                                      max_results=1000):
            client.set_tag(run.info.run_id, "killed_reason", f"attempt superseded: shard {shard} was rerun as {attempt}")
            if run.info.status != "KILLED":
                client.set_terminated(run.info.run_id, "KILLED")
            ended.append(run.data.tags.get(RUN_TAG, run.info.run_id))
    return ended


def log_datasets(p: Params, meta: dict, splits: dict[str, int], raw: Path, size: int | None = None) -> None:
    """The splits the active run read (split -> images used), as MLflow dataset inputs (the UI's Datasets column
    and lineage): name `<data.name>-<split>`, digest = the raw file's md5, the value DVC records for data.path;
    source: that file."""
    import numpy as np
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.types.schema import Schema, TensorSpec

    size = size or p.image_size  # the images the run read: the comparison's size, or the champion's
    schema = Schema([TensorSpec(np.dtype(np.uint8), (-1, size, size, meta.get("channels", 3)), "image"),
                     TensorSpec(np.dtype(np.int64), (-1,), "label")])
    with warnings.catch_warnings():  # MLflow registers the local-file source twice and says so each time
        warnings.simplefilter("ignore", UserWarning)
        source = resolve_dataset_source(str(Path(raw).resolve()))
    for split, n in splits.items():
        ds = MetaDataset(source, name=f"{p.data.name}-{split}", digest=meta["raw_md5"], schema=schema)
        tags = {"n": str(n), "image_size": str(size), "channels": str(meta.get("channels", 3)),
                "task": meta.get("task", "multiclass"), "classes": ", ".join(meta["classes"])[:500]}
        for attempt in range(3):
            try:
                mlflow.log_input(ds, context=split, tags=tags)
                break
            except mlflow.exceptions.MlflowException as e:
                # two stages side by side logging a dataset that is new to the experiment: the server inserts it
                # twice and one request fails on its unique key; again, it finds the row the other one wrote
                race = "UNIQUE constraint failed: datasets" in str(e) or "duplicate key value" in str(e)
                if not race or attempt == 2:
                    raise
                time.sleep(0.2 * (attempt + 1))


def run_link(exp: str, run_id: str) -> str:
    """The run's page in the MLflow UI when the store is a server, else its id and store."""
    uri = tracking_uri()
    page = f"{uri.rstrip('/')}/#/experiments/{exp}/runs/{run_id}?{ML_VIEW}"
    return page if uri.startswith("http") else f"{run_id} ({uri})"


def mark_failed_stage(parent: str, stage: str, reason: str, status: str = "FAILED") -> None:
    """Name the stage that ended the pipeline, and why, on the parent run (tags and description)."""
    client = mlflow.MlflowClient()
    client.set_tag(parent, "failed_stage", stage)
    client.set_tag(parent, "error", reason[:2000])
    client.set_tag(parent, "mlflow.note.content", f"**{stage}** {status.lower()}: {reason}")


def end_stale_runs(exp: str) -> list[str]:
    """Runs left RUNNING by a process that died (kill -9, power loss) on this host -> KILLED, with the reason.

    Each run carries the owner's process id (host, pid, start time); runs of live processes and of other
    hosts are left alone. Returns the names of the runs ended."""
    from medssl.guard import alive

    client, ended = mlflow.MlflowClient(), []
    for run in client.search_runs([exp], "attributes.status = 'RUNNING'", max_results=1000):
        owner = run.data.tags.get(PROCESS_TAG)
        if owner is None or alive(owner) is not False:
            continue
        name = run.data.tags.get(RUN_TAG, run.data.tags.get("mlflow.runName", run.info.run_id))
        reason = f"process {owner} ended without closing the run (found and ended KILLED by a later run)"
        client.set_tag(run.info.run_id, "killed_reason", reason)
        parent = run.data.tags.get("mlflow.parentRunId")
        if parent:
            with contextlib.suppress(Exception):
                ptags = client.get_run(parent).data.tags
                if ptags.get("stage") == "pipeline" and "failed_stage" not in ptags:
                    mark_failed_stage(parent, name, reason, "KILLED")
        client.set_terminated(run.info.run_id, "KILLED")
        ended.append(name)
    return ended


@contextlib.contextmanager
def resume_run(run_id: str, keep_end: bool = False):
    """Reopen a run to add to it; it ends FINISHED, or FAILED if the block raises (a grid's run, filled by workers).
    keep_end: the run is a finished stage's and the additions are a later stage's (the champion's test scores, logged
    by `evaluate`): it keeps its end time, so the UI's duration stays its own work's (not also the other finalist's
    training and the evaluation after it), and its status (FINISHED where an earlier reopening was cut off)."""
    client = mlflow.MlflowClient()
    ended = client.get_run(run_id).info if keep_end else None
    opened = False

    def restore() -> None:
        if opened and ended is not None and ended.end_time is not None:
            status = "FINISHED" if ended.status == "RUNNING" else ended.status  # RUNNING with an end: cut off
            client.set_terminated(run_id, status, end_time=ended.end_time)

    try:
        with _env_run_hidden(), mlflow.start_run(run_id=run_id) as run:
            opened = True
            yield run
    except BaseException:
        with contextlib.suppress(Exception):  # the block's error is the one to report
            restore()
        raise
    restore()


@contextlib.contextmanager
def _env_run_hidden():
    """`mlflow run` exports MLFLOW_RUN_ID; left set, start_run() would resume that run instead of
    starting ours. Hide it for the block, then put it back."""
    env_run = os.environ.pop("MLFLOW_RUN_ID", None)
    try:
        yield
    finally:
        if env_run is not None:
            os.environ["MLFLOW_RUN_ID"] = env_run
