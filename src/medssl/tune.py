"""Optuna search over VAE and fine-tuning hyperparameters; every trial is a nested MLflow run.

A trial pretrains `tune.init` (the VAE) and fine-tunes from it with the same stage functions
that dvc.yaml calls, under `tune/<study>/trial_<n>/`. Per-epoch validation values feed the pruner.
Several workers (processes or machines) share one study through PostgreSQL or a journal file.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import optuna
import yaml

from medssl import tracking
from medssl.config import ConfigError, Params, set_dotted
from medssl.finetune import run_finetune
from medssl.layout import Layout
from medssl.pretrain import run_pretrain

# Optuna parameter name -> params.yaml key
SEARCH_SPACE = {
    "vae_latent_dim": "pretrain.vae.latent_dim",
    "vae_beta": "pretrain.vae.beta",
    "vae_lr": "pretrain.vae.lr",
    "lr": "finetune.lr",
    "weight_decay": "finetune.weight_decay",
    "augment_strength": "finetune.augment.strength",
    "label_smoothing": "finetune.label_smoothing",
    "frozen_blocks": "finetune.frozen_blocks",
}


def suggest(trial: optuna.Trial) -> dict:
    return {
        "vae_latent_dim": trial.suggest_categorical("vae_latent_dim", [32, 64, 128, 256]),
        "vae_beta": trial.suggest_float("vae_beta", 0.1, 4.0, log=True),
        "vae_lr": trial.suggest_float("vae_lr", 1e-4, 3e-3, log=True),
        "lr": trial.suggest_float("lr", 1e-4, 3e-3, log=True),
        "weight_decay": trial.suggest_float("weight_decay", 1e-6, 1e-2, log=True),
        "augment_strength": trial.suggest_float("augment_strength", 0.0, 0.75),
        "label_smoothing": trial.suggest_float("label_smoothing", 0.0, 0.2),
        "frozen_blocks": trial.suggest_int("frozen_blocks", 0, 6),
    }


def with_values(p: Params, values: dict) -> Params:
    raw = p.model_dump()
    for name, v in values.items():
        raw = set_dotted(raw, SEARCH_SPACE[name], v)
    return Params.model_validate(raw)


def storage_of(url: str) -> optuna.storages.BaseStorage | str:
    """SQLAlchemy URL as is; `journal:<file>` -> a journal file shared by processes on one file system."""
    if url.startswith("journal:"):
        from optuna.storages.journal import JournalFileBackend

        return optuna.storages.JournalStorage(JournalFileBackend(url.removeprefix("journal:")))
    return url


def pruner_of(name: str) -> optuna.pruners.BasePruner:
    return {
        "median": lambda: optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1),
        "successive_halving": lambda: optuna.pruners.SuccessiveHalvingPruner(),
        "none": lambda: optuna.pruners.NopPruner(),
    }[name]()


def load_study(p: Params, storage: str, worker: int = 0) -> optuna.Study:
    return optuna.create_study(
        study_name=p.tune.study_name, storage=storage_of(storage), direction="maximize", load_if_exists=True,
        sampler=optuna.samplers.TPESampler(seed=p.seed + worker), pruner=pruner_of(p.tune.pruner),
    )


def objective_for(p: Params, parent: str, root: Path):
    client = mlflow.MlflowClient()
    select = p.export.select_metric

    def objective(trial: optuna.Trial) -> float:
        values = suggest(trial)
        pt = with_values(p, values)
        trial_root = root / f"trial_{trial.number:04d}"
        tags = {**tracking.base_tags(p), "stage": "tune-trial", "optuna_study": p.tune.study_name,
                "optuna_trial": str(trial.number), "init": p.tune.init}
        with tracking.model_run(p, f"trial-{trial.number:04d}", tags, {**values, "objective": f"val_{select}"}, parent) as run:
            trial.set_user_attr("mlflow_run_id", run.info.run_id)
            try:
                run_pretrain(pt, p.tune.init, Layout(trial_root, data_root=Path(".")), parent=run.info.run_id)

                def on_epoch(epoch: int, value: float) -> None:
                    client.log_metric(run.info.run_id, f"val_{select}", value, step=epoch)
                    trial.report(value, epoch)
                    if trial.should_prune():
                        raise optuna.TrialPruned(f"pruned at epoch {epoch} (val_{select} {value:.4f})")

                summary = run_finetune(pt, p.tune.init, Layout(trial_root, data_root=Path(".")), parent=run.info.run_id, on_epoch=on_epoch)
            except optuna.TrialPruned:
                mlflow.set_tag("optuna_state", "PRUNED")
                raise
            except Exception as e:
                mlflow.set_tags({"optuna_state": "FAIL", "error": str(e)[:500]})
                raise
            finally:
                shutil.rmtree(trial_root / "models", ignore_errors=True)  # checkpoints are in MLflow
                shutil.rmtree(trial_root / ".medssl", ignore_errors=True)  # a trial is never resumed
            value = summary["val"][select]
            mlflow.log_metric("value", value)
            mlflow.set_tag("optuna_state", "COMPLETE")
        return value

    return objective


def optimize(p: Params, storage: str, n_trials: int, parent: str, worker: int = 0) -> None:
    """Run n_trials trials of the shared study in this process; failures are recorded, not fatal."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = load_study(p, storage, worker)
    study.optimize(objective_for(p, parent, Path("tune") / p.tune.study_name), n_trials=n_trials, catch=(Exception,))


def split_trials(n: int, workers: int) -> list[int]:
    """n trials over workers, exactly: e.g. 5 over 2 -> [3, 2]."""
    return [n // workers + (i < n % workers) for i in range(workers)]


def check_storage(storage: str, workers: int) -> None:
    if workers > 1 and storage.startswith("sqlite"):
        raise ConfigError(f"tune.storage={storage}: SQLite serves one process; use postgresql://... or journal:<file> "
                          f"for {workers} workers")


def run_tune(p: Params, params_path: Path, n_trials: int | None = None, storage: str | None = None,
             workers: int = 1, overrides: dict | None = None) -> dict:
    """One study = one MLflow parent run; `workers` processes share it. Writes the best values to tune.output."""
    n_trials = n_trials or p.tune.n_trials
    storage = storage or p.tune.storage
    check_storage(storage, workers)
    load_study(p, storage)  # create it once, before workers race to
    tags = {**tracking.base_tags(p), "stage": "tune", "optuna_study": p.tune.study_name, "optuna_storage": storage.split("@")[-1]}
    with tracking.model_run(p, f"tune-{p.tune.study_name}", tags, {"n_trials": n_trials, "workers": workers,
                                                                    "pruner": p.tune.pruner, "sampler": "TPE"}) as run:
        shares = split_trials(n_trials, workers)
        procs = []
        for w, share in enumerate(shares[1:], start=1):
            if share:
                cmd = [sys.executable, "-m", "medssl.cli", "tune-worker", "--params", str(params_path), "--storage", storage,
                       "--n-trials", str(share), "--parent", run.info.run_id, "--worker", str(w)]
                for k, v in (overrides or {}).items():
                    cmd += ["--set", f"{k}={v}"]
                procs.append(subprocess.Popen(cmd, env={**os.environ, "MLFLOW_TRACKING_URI": tracking.tracking_uri()}))
        optimize(p, storage, shares[0], run.info.run_id, worker=0)
        codes = [proc.wait() for proc in procs]
        if any(codes):
            raise RuntimeError(f"tuning workers exited with {codes}")

        study = load_study(p, storage)
        states = [t.state.name for t in study.trials]
        counts = {s: states.count(s) for s in ("COMPLETE", "PRUNED", "FAIL")}
        mlflow.log_metrics({f"trials_{k.lower()}": v for k, v in counts.items()})
        if not counts["COMPLETE"]:
            raise RuntimeError(f"study {p.tune.study_name}: no trial completed ({counts})")
        best = study.best_trial
        tuned: dict = {}
        for name, value in best.params.items():
            tuned = set_dotted(tuned, SEARCH_SPACE[name], value)
        out = params_path.parent / p.tune.output
        tmp = out.with_name(f".{out.name}.tmp")
        tmp.write_text(f"# Best of study {p.tune.study_name}: trial {best.number}, val {p.export.select_metric} "
                       f"{best.value:.4f} (MLflow run {best.user_attrs.get('mlflow_run_id')}). Written by medssl tune.\n"
                       + yaml.safe_dump(tuned, sort_keys=True))
        tmp.replace(out)
        mlflow.log_artifact(str(out))
        mlflow.log_metric("best_value", best.value)
        mlflow.log_params({f"best_{k}": v for k, v in best.params.items()})
        mlflow.set_tags({"best_trial": str(best.number), "best_run_id": best.user_attrs.get("mlflow_run_id", "")})
        return {"study": p.tune.study_name, "trials": len(study.trials), **counts, "best_value": best.value,
                "best_trial": best.number, "best_params": best.params, "output": str(out), "run_id": run.info.run_id}
