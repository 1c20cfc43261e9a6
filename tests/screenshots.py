"""Retake docs/img's MLflow screenshots from a finished project (`make screenshots` after `make answer`): the
experiment page, the chart view of the inits, the report's paired differences in the artifact viewer and the
champion's run page (its charts), with the
same browser steps tests/test_pipeline_e2e.py asserts on (tests/browser.py), against `mlflow server` started here
on 127.0.0.1 over the project's own store (sqlite:///mlflow.db, as `make mlflow-ui`), stopped at the end.

    python tests/screenshots.py [--project .] [--out docs/img]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from browser import Chromium, experiment_page, init_charts, open_paired_differences, report_in_artifact_viewer, run_charts
from conftest import start_mlflow_server, wait_http


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--project", type=Path, default=Path("."), help="a project after `medssl pipeline` (its mlflow.db)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parents[1] / "docs/img")
    args = ap.parse_args()
    project, out = args.project.resolve(), args.out.resolve()
    if not (project / "mlflow.db").is_file():
        sys.exit(f"{project / 'mlflow.db'}: no MLflow store here; run `make answer` (or `make demo`) first")

    import mlflow

    from medssl.config import load_params
    from medssl.tracking import ui_links

    os.chdir(project)  # params.yaml, tuned.yaml and the store's relative paths are the project's
    p = load_params()
    server, uri = start_mlflow_server("sqlite:///mlflow.db", subprocess.DEVNULL)
    try:
        wait_http(f"{uri}/health", server)
        mlflow.set_tracking_uri(uri)
        exp = mlflow.get_experiment_by_name(p.mlflow.experiment)
        if exp is None:
            sys.exit(f"{project / 'mlflow.db'}: no experiment {p.mlflow.experiment!r}")
        parents = mlflow.search_runs([exp.experiment_id], "tags.stage = 'pipeline' and attributes.status = 'FINISHED'",
                                     order_by=["attributes.start_time DESC"], max_results=1, output_format="list")
        if not parents:
            sys.exit(f"experiment {p.mlflow.experiment!r}: no finished pipeline run")
        links = ui_links(exp.experiment_id, uri)
        keys = [f"test_balanced_accuracy_{protocol}_f{max(p.grid.fractions):g}" for protocol in ("linear", "finetune", "knn")]
        with tempfile.TemporaryDirectory() as profile:
            chromium = Chromium(Path(profile))
            try:
                experiment_page(chromium, links, out / "mlflow-experiment.png", expand=True)
                missing = init_charts(chromium, links, keys, p.inits.all, out / "mlflow-compare-inits.png")
                ui, frame = report_in_artifact_viewer(chromium, uri, parents[0])
                open_paired_differences(ui, frame, out / "mlflow-report-table.png")
                champion = mlflow.search_runs([exp.experiment_id], f"tags.stage = 'finetune' and tags.\"mlflow.parentRunId\" = "
                                              f"'{parents[0].info.run_id}' and tags.init = '{parents[0].data.tags['champion']}'",
                                              output_format="list")  # budgets.<b>.finalists: one run per finalist
                if champion:
                    run_charts(chromium, uri, champion[0], out / "mlflow-champion-run.png")
            finally:
                chromium.close()
        if missing:
            sys.exit(f"charts without every init's bar: {missing}")
        print(f"run {parents[0].info.run_name}: {', '.join(sorted(f.name for f in out.glob('mlflow-*.png')))} in {out}")
    finally:
        os.killpg(server.pid, 15)
        server.wait(20)


if __name__ == "__main__":
    main()
