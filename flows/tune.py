"""Prefect flow `medssl-tune`: one Optuna study per init over the same fine-tune space (plus the method's own
pretraining hyperparameters for SSL inits), the same trial budget each.

Same code as `medssl tune`: TPE sampler, median / successive-halving pruner fed with per-epoch
validation values, one MLflow parent run with a nested run per trial, best values per init -> tuned.yaml.
"""
from __future__ import annotations

import os
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from medssl.config import RunOverrides, load_params
from medssl.tune import prepare_search, run_tune

ROOT = Path(__file__).resolve().parents[1]


@task(name="prepare")
def prepare_task(p, base) -> dict:
    return prepare_search(p, base)


@task(name="study")
def study_task(p, params_path: str, n_trials: int | None, storage: str | None, workers: int, over: dict) -> dict:
    return run_tune(p, Path(params_path), n_trials, storage, workers, over)


@flow(name="medssl-tune", log_prints=True)
def tune(n_trials: int | None = None, storage: str | None = None, workers: int = 1, epochs: int | None = None,
         pretrain_epochs: int | None = None, max_train: int | None = None, max_eval: int | None = None,
         pruner: str | None = None, tune_inits: list[str] | None = None, params_path: str = "params.yaml",
         dataset: str | None = None) -> dict:
    """Tune with params.yaml (not tuned.yaml) as the starting point; writes the best values to tune.output.
    dataset: as medssl-pipeline's (a MedMNIST flag, or an npz, CSV or class-folder path)."""
    os.chdir(ROOT)
    base = load_params(params_path, tuned=False)
    over = RunOverrides.pick(locals()).dotted(base)
    if pruner is not None:
        over["tune.pruner"] = pruner
    if tune_inits is not None:
        over["tune.inits"] = tune_inits
    p = load_params(params_path, over, tuned=False)
    prepared = prepare_task.submit(p, base)
    r = study_task.submit(p, params_path, n_trials, storage, workers, over, wait_for=[prepared]).result()
    rows = []
    for init, st in r["studies"].items():
        values = ", ".join(f"`{k}` {v:.4g}" if isinstance(v, float) else f"`{k}` {v}" for k, v in st["best_params"].items())
        rows.append(f"| {init} | {st['trials']} ({st['COMPLETE']} complete, {st['PRUNED']} pruned, {st['FAIL']} failed) | "
                    f"{st['best_value']:.4f} | {values} |")
    create_markdown_artifact(
        f"# medssl-tune: one study per init, {r['n_trials']} trials each\n\n"
        f"| init | trials | best val `{p.export.select_metric}` | chosen values |\n|---|---|---|---|\n" + "\n".join(rows)
        + f"\n\nWritten to `{r['output']}` under `tuned.<init>`; MLflow parent run `{r['run_id']}`.",
        key="medssl-tune", description="Optuna studies per init")
    for init, st in r["studies"].items():
        get_run_logger().info("%s: best trial %s: %.4f", init, st["best_trial"], st["best_value"])
    return r


if __name__ == "__main__":
    tune()
