"""Prefect flow `medssl-tune`: an Optuna study over the VAE and fine-tuning hyperparameters.

Same code as `medssl tune`: TPE sampler, median / successive-halving pruner fed with per-epoch
validation values, one MLflow parent run with a nested run per trial, best values -> tuned.yaml.
"""
from __future__ import annotations

import os
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from medssl.config import load_params, run_overrides
from medssl.data.prepare import run_prepare
from medssl.data.sources import run_fetch
from medssl.tune import run_tune

ROOT = Path(__file__).resolve().parents[1]


@task(name="prepare")
def prepare_task(p) -> dict:
    run_fetch(p)
    return run_prepare(p)


@task(name="study")
def study_task(p, params_path: str, n_trials: int | None, storage: str | None, workers: int, over: dict) -> dict:
    return run_tune(p, Path(params_path), n_trials, storage, workers, over)


@flow(name="medssl-tune", log_prints=True)
def tune(n_trials: int | None = None, storage: str | None = None, workers: int = 1, epochs: int | None = None,
         pretrain_epochs: int | None = None, max_train: int | None = None, max_eval: int | None = None,
         pruner: str | None = None, params_path: str = "params.yaml") -> dict:
    """Tune with params.yaml (not tuned.yaml) as the starting point; writes the best values to tune.output."""
    os.chdir(ROOT)
    base = load_params(params_path, tuned=False)
    over = run_overrides(base, epochs=epochs, pretrain_epochs=pretrain_epochs, max_train=max_train, max_eval=max_eval)
    if pruner is not None:
        over["tune.pruner"] = pruner
    p = load_params(params_path, over, tuned=False)
    prepared = prepare_task.submit(p)
    r = study_task.submit(p, params_path, n_trials, storage, workers, over, wait_for=[prepared]).result()
    rows = "\n".join(f"| `{k}` | {v:.4g} |" if isinstance(v, float) else f"| `{k}` | {v} |" for k, v in r["best_params"].items())
    create_markdown_artifact(
        f"# medssl-tune: study `{r['study']}`\n\n{r['trials']} trials: {r['COMPLETE']} complete, {r['PRUNED']} pruned, "
        f"{r['FAIL']} failed. Best trial {r['best_trial']}: val `{p.export.select_metric}` = {r['best_value']:.4f}.\n\n"
        f"| parameter | value |\n|---|---|\n{rows}\n\nWritten to `{r['output']}`; MLflow parent run `{r['run_id']}`.",
        key="medssl-tune", description="Optuna study summary")
    get_run_logger().info("best trial %s: %.4f -> %s", r["best_trial"], r["best_value"], r["output"])
    return r


if __name__ == "__main__":
    tune()
