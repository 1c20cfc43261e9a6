"""MLflow conventions: one experiment per study, a parent run per pipeline run, nested runs per model."""
from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path

import mlflow

from medssl.config import Params

DEFAULT_URI = "sqlite:///mlflow.db"
PARENT_ENV = "MEDSSL_PARENT_RUN_ID"
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI", DEFAULT_URI)


def experiment_id(p: Params) -> str:
    """Set the tracking URI and return the study's experiment, created on first use.

    With the embedded SQLite store, artifacts go to ./mlartifacts (a server decides for itself).
    """
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    exp = mlflow.get_experiment_by_name(p.mlflow.experiment)
    if exp is not None:
        return exp.experiment_id
    location = Path("mlartifacts").resolve().as_uri() if uri.startswith(("sqlite:", "file:")) or "://" not in uri else None
    return mlflow.create_experiment(p.mlflow.experiment, artifact_location=location)


def git_commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def base_tags(p: Params, data_md5: str | None = None) -> dict[str, str]:
    tags = {
        "git_commit": git_commit(),
        "dataset": p.data.name,
        "backbone": p.model.backbone,
        "seed": str(p.seed),
        "budget": p.budget,
    }
    if data_md5:
        tags["data_md5"] = data_md5
    return tags


def flat_params(d: dict, prefix: str = "") -> dict[str, str]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flat_params(v, key + "."))
        else:
            out[key] = str(v)
    return out


def log_curves(curves: list[dict], final: dict | None = None) -> None:
    """Per-epoch rows ({"epoch": e, name: value, ...}) and final values into the active run, in one request."""
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    metrics = [Metric(k, float(v), now, int(row["epoch"])) for row in curves for k, v in row.items() if k != "epoch"]
    metrics += [Metric(k, float(v), now, 0) for k, v in (final or {}).items()]
    mlflow.MlflowClient().log_batch(mlflow.active_run().info.run_id, metrics=metrics)


def parent_run_id() -> str | None:
    """The run to nest under: ours (`medssl pipeline`) or the one `mlflow run` started."""
    return os.environ.get(PARENT_ENV) or os.environ.get("MLFLOW_RUN_ID")


def end_status(exc: BaseException) -> str:
    """KILLED for a pruned trial or an interrupt, else FAILED."""
    if isinstance(exc, KeyboardInterrupt) or type(exc).__name__ == "TrialPruned":
        return "KILLED"
    return "FAILED"


@contextlib.contextmanager
def model_run(p: Params, name: str, tags: dict[str, str], params: dict | None = None, parent: str | None = None):
    """A run for one trained model, nested under `parent` or the pipeline run when there is one.

    An exception inside marks the run FAILED (KILLED when a trial is pruned) and propagates.
    """
    exp = experiment_id(p)
    parent = parent or parent_run_id()
    if parent:  # a child lives in its parent's experiment (`mlflow run` may have picked another)
        exp = mlflow.get_run(parent).info.experiment_id
    with _env_run_hidden():
        run = mlflow.start_run(run_name=name, experiment_id=exp, parent_run_id=parent, tags=tags, nested=True)
        try:
            if params:
                mlflow.log_params(flat_params(params))
            yield run
        except BaseException as e:
            mlflow.end_run(end_status(e))
            raise
        mlflow.end_run("FINISHED")


@contextlib.contextmanager
def resume_run(run_id: str):
    """Reopen a finished run to add results (e.g. test metrics); status returns to FINISHED."""
    with _env_run_hidden(), mlflow.start_run(run_id=run_id) as run:
        yield run


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
