"""Optuna search, one study per init with the same space and the same trial budget; every trial is a nested MLflow run.

A trial of init `i` pretrains i's method (SSL inits, with that method's own hyperparameters in the space)
and fine-tunes from it with the same stage functions that dvc.yaml calls, under
`tune/<study>-<i>/trial_<n>/`; baselines fine-tune only. Per-epoch validation values feed the pruner.
The best values of each init go to tuned.yaml under `tuned.<init>`; every stage trains an init with its
own values (Params.for_init). Several workers (processes or machines) share the studies through
PostgreSQL or a journal file.
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
from medssl.config import BASELINE_INITS, ConfigError, Params, method_of, set_dotted
from medssl.core.rng import seed_of
from medssl.finetune import run_finetune
from medssl.guard import exclusive
from medssl.layout import Layout
from medssl.pretrain import run_pretrain

# The same fine-tune space for every init; an SSL init adds its method's own pretraining hyperparameters.
# Optuna parameter names are the params.yaml keys they set.
FINETUNE_SPACE = {
    "finetune.lr": lambda t, k: t.suggest_float(k, 1e-4, 3e-3, log=True),
    "finetune.weight_decay": lambda t, k: t.suggest_float(k, 1e-6, 1e-2, log=True),
    "finetune.augment.strength": lambda t, k: t.suggest_float(k, 0.0, 0.75),
    "finetune.label_smoothing": lambda t, k: t.suggest_float(k, 0.0, 0.2),
    "finetune.frozen_blocks": lambda t, k: t.suggest_int(k, 0, 6),
}
PRETRAIN_SPACE = {
    "vae": {"pretrain.vae.latent_dim": lambda t, k: t.suggest_categorical(k, [32, 64, 128, 256]),
            "pretrain.vae.beta": lambda t, k: t.suggest_float(k, 0.1, 4.0, log=True),
            "pretrain.vae.lr": lambda t, k: t.suggest_float(k, 1e-4, 3e-3, log=True)},
    "simclr": {"pretrain.simclr.temperature": lambda t, k: t.suggest_float(k, 0.1, 1.0, log=True),
               "pretrain.simclr.min_scale": lambda t, k: t.suggest_float(k, 0.08, 0.6),
               "pretrain.simclr.lr": lambda t, k: t.suggest_float(k, 3e-4, 5e-3, log=True)},
    "mim": {"pretrain.mim.mask_ratio": lambda t, k: t.suggest_float(k, 0.3, 0.8),
            "pretrain.mim.lr": lambda t, k: t.suggest_float(k, 1e-4, 3e-3, log=True)},
}


def space(init: str) -> dict:
    """The search space of `init`: params.yaml key -> suggest(trial, key)."""
    return {**FINETUNE_SPACE, **({} if init in BASELINE_INITS else PRETRAIN_SPACE[method_of(init)])}


def suggest(trial: optuna.Trial, init: str) -> dict:
    return {key: draw(trial, key) for key, draw in space(init).items()}


def with_values(p: Params, values: dict) -> Params:
    raw = p.model_dump()
    for key, v in values.items():
        raw = set_dotted(raw, key, v)
    return Params.model_validate(raw)


def study_name(p: Params, init: str) -> str:
    return f"{p.tune.study_name}-{init}"


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


def _sampler_seed(p: Params, init: str, storage: str, worker: int) -> int:
    try:
        before = len(optuna.load_study(study_name=study_name(p, init), storage=storage_of(storage)).trials)
    except KeyError:  # no such study yet
        before = 0
    return seed_of("tune", init, p.seed, worker, *([before] if before else [])) % 2**32


def load_study(p: Params, init: str, storage: str, worker: int = 0) -> optuna.Study:
    return optuna.create_study(
        study_name=study_name(p, init), storage=storage_of(storage), direction="maximize", load_if_exists=True,
        # own draws per init and worker, and per run on a study that already holds trials (a second `medssl tune`
        # on it would otherwise repeat the first one's draws)
        sampler=optuna.samplers.TPESampler(seed=_sampler_seed(p, init, storage, worker)),
        pruner=pruner_of(p.tune.pruner),
    )


def objective_for(p: Params, init: str, parent: str, root: Path):
    client = mlflow.MlflowClient()
    select = p.export.select_metric
    ssl = init not in BASELINE_INITS

    def objective(trial: optuna.Trial) -> float:
        values = suggest(trial, init)
        # a trial scores one encoder (params.yaml's seed) in one fine-tune: per-seed encoders are the grid's
        pt = with_values(p, {**values, f"budgets.{p.budget}.pretrain_per_seed": False})
        trial_root = root / f"trial_{trial.number:04d}"
        lay = Layout(trial_root, data_root=Path("."), prepared_root=Layout().tuning().prepared_root)
        tags = {**tracking.base_tags(p), "stage": "tune-trial", "optuna_study": study_name(p, init),
                "optuna_trial": str(trial.number), "init": init}
        with tracking.stage_run(p, f"trial-{init}-{trial.number:04d}", tags, {**values, "objective": f"val_{select}"},
                                parent) as run:
            trial.set_user_attr("mlflow_run_id", run.info.run_id)
            try:
                if ssl:
                    run_pretrain(pt, init, lay, parent=run.info.run_id)

                def on_epoch(epoch: int, value: float) -> None:
                    client.log_metric(run.info.run_id, f"val/{select}", value, step=epoch)
                    trial.report(value, epoch)
                    if trial.should_prune():
                        raise optuna.TrialPruned(f"pruned at epoch {epoch} (val_{select} {value:.4f})")

                summary = run_finetune(pt, init, lay, parent=run.info.run_id, on_epoch=on_epoch, log_model=False)
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
    """n_trials trials of every init's study in this process; failures are recorded, not fatal."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    for init in p.tune_inits:
        study = load_study(p, init, storage, worker)
        study.optimize(objective_for(p, init, parent, Path("tune") / study_name(p, init)), n_trials=n_trials,
                       catch=(Exception,))


def split_trials(n: int, workers: int) -> list[int]:
    """n trials over workers, exactly: e.g. 5 over 2 -> [3, 2]."""
    return [n // workers + (i < n % workers) for i in range(workers)]


FETCHED = ("source", "medmnist", "npz", "folder", "csv", "classes", "task", "positive")  # what fetch builds data.path from


def prepare_search(p: Params, base: Params) -> dict:
    """The data a search runs on: data.path fetched (rewritten only when its content changes), then prepared under
    tune/ with the search's settings, never into the project's data/prepared. base: params.yaml without the
    search's overrides; overrides that would rebuild the project's data.path from another source are refused."""
    from medssl.data.prepare import run_prepare
    from medssl.data.sources import run_fetch

    changed = [f"data.{k}" for k in FETCHED if getattr(p.data, k) != getattr(base.data, k)]
    if changed and p.data.path == base.data.path:
        raise ConfigError(f"{', '.join(changed)} given to tune would replace {p.data.path}, the project's data (DVC's "
                          f"fetch output): give data.path another file too, or change params.yaml and run fetch")
    run_fetch(p)
    return run_prepare(p, Layout().tuning())


def check_storage(storage: str, workers: int) -> None:
    if workers > 1 and storage.startswith("sqlite"):
        raise ConfigError(f"tune.storage={storage}: SQLite serves one process; use postgresql://... or journal:<file> "
                          f"for {workers} workers")


def run_tune(p: Params, params_path: Path, n_trials: int | None = None, storage: str | None = None,
             workers: int = 1, overrides: dict | None = None) -> dict:
    """One study per init in tune.inits, n_trials each, in one MLflow parent run; `workers` processes share
    them. Writes each init's best values to tune.output under `tuned.<init>` (other inits' entries are kept)."""
    with exclusive(Layout().lock("tune"), "medssl tune in this project"):  # one search writes tune.output at a time
        return _run_tune(p, params_path, n_trials, storage, workers, overrides)


def _run_tune(p: Params, params_path: Path, n_trials: int | None, storage: str | None, workers: int,
              overrides: dict | None) -> dict:
    n_trials = n_trials or p.tune.n_trials
    storage = storage or p.tune.storage
    check_storage(storage, workers)
    for init in p.tune_inits:
        load_study(p, init, storage)  # create them once, before workers race to
    tags = {**tracking.base_tags(p), "stage": "tune", "optuna_study": p.tune.study_name,
            "optuna_storage": storage.split("@")[-1], "tune_inits": ",".join(p.tune_inits)}
    with tracking.stage_run(p, f"tune-{p.tune.study_name}", tags, {"n_trials_per_init": n_trials, "workers": workers,
                                                                    "pruner": p.tune.pruner, "sampler": "TPE",
                                                                    "inits": ",".join(p.tune_inits)}) as run:
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

        out = params_path.parent / p.tune.output
        previous = {}
        if out.is_file():
            previous = (yaml.safe_load(out.read_text()) or {}).get("tuned") or {}
        tuned, results = dict(previous), {}
        for init in p.tune_inits:
            study = load_study(p, init, storage)
            states = [t.state.name for t in study.trials]
            counts = {s: states.count(s) for s in ("COMPLETE", "PRUNED", "FAIL")}
            mlflow.log_metrics({f"{init}/trials_{k.lower()}": v for k, v in counts.items()})
            if not counts["COMPLETE"]:
                raise RuntimeError(f"study {study.study_name}: no trial completed ({counts})")
            best = study.best_trial
            entry: dict = {}
            for key, value in best.params.items():
                # 10 significant digits: DVC's YAML round trip (ruamel) alters floats written with 15 or more,
                # and a value that changes on its way into dvc.lock would leave every stage forever "modified"
                entry = set_dotted(entry, key, float(f"{value:.10g}") if isinstance(value, float) else value)
            entry["study"] = {"name": study.study_name, "trials": len(study.trials), **{k.lower(): v for k, v in counts.items()},
                              "best_trial": best.number, f"best_val_{p.export.select_metric}": round(best.value, 6),
                              "mlflow_run_id": best.user_attrs.get("mlflow_run_id", "")}
            tuned[init] = entry
            results[init] = {"study": study.study_name, "trials": len(study.trials), **counts, "best_value": best.value,
                             "best_trial": best.number, "best_params": best.params}
            mlflow.log_metric(f"{init}/best_value", best.value)
            mlflow.set_tag(f"best_run_id.{init}", best.user_attrs.get("mlflow_run_id", ""))
        tmp = out.with_name(f".{out.name}.tmp")
        tmp.write_text(f"# Best values per init: {n_trials} Optuna trials each (TPE, {p.tune.pruner} pruner), "
                       f"objective val {p.export.select_metric}. Written by medssl tune (MLflow run {run.info.run_id}).\n"
                       "# Every stage trains an init with params.yaml merged with its entry here.\n"
                       + yaml.safe_dump({"tuned": tuned}, sort_keys=True))
        tmp.replace(out)
        mlflow.log_artifact(str(out))
        return {"studies": results, "n_trials": n_trials, "output": str(out), "run_id": run.info.run_id}
