"""End to end on a 512-image subset at 32 px, 1-2 epochs: `medssl tune` (one study per init, 1 trial each), then
`medssl pipeline` (dvc repro inside a parent MLflow run) against a real MLflow server with all seven inits
and the full comparison grid (3 protocols x the demo's 3 label fractions x 3 seeds, imbalance, a recoloured second source for
domain shift, fusion), then the report and its verdict, the registry, pyfunc, `medssl predict` and DVC's
change tracking."""
import csv
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from conftest import BIN, project_copy, run_env, set_params
from medssl.data.sources import medmnist_flags

pytestmark = pytest.mark.slow


def sh(args, cwd, env, check=True):
    r = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    if check and r.returncode != 0:
        raise AssertionError(f"{args} exited {r.returncode}\nstdout:\n{r.stdout[-4000:]}\nstderr:\n{r.stderr[-6000:]}")
    return r


@pytest.fixture(scope="module")
def project(tmp_path_factory, mlflow_server, dermamnist):
    """A fresh git checkout of the project with a small budget, after one `medssl pipeline`."""
    shift = shifted_source(tmp_path_factory.mktemp("shift"), dermamnist)
    work = project_copy(tmp_path_factory.mktemp("clone"), **{
        "data.max_train": 512, "data.max_eval": 256, "data.image_size": 32, "budgets.demo.pretrain_epochs": 1,
        # batch 32 with balanced class weights, so that every classifier takes steps enough to beat the constant
        # predictor whichever init wins: at batch 128 (2-4 steps) every init's cells collapsed to one class on an
        # AVX-512 host, the champion tied the constant predictor and the export gate (rightly) refused it
        "budgets.demo.finetune_epochs": 2, "finetune.batch_size": 32, "finetune.class_weight": "balanced",
        "budgets.demo.grid": {"epochs": 1, "max_train": 256, "max_eval": 128, "fractions": list(FRACTIONS), "batch_size": 32},
        "grid.shift": shift, "pretrain.vae.latent_dim": 32,
        "grid.fusion": [["imagenet", "simclr"], ["vae", "simclr", "mim"], ["random", "mim"]],  # random: per-seed features
        "mlflow.experiment": "e2e", "export.registered_model": "derm-e2e"})
    env = run_env(MLFLOW_TRACKING_URI=mlflow_server, MEDSSL_DATA_PATH=str(dermamnist),
                  DVC_SITE_CACHE_DIR=str(work / ".dvc/tmp/site"))
    tune = sh([str(BIN / "medssl"), "tune", "--n-trials", "1"], work, env)  # fair tuning: every init, same budget
    run = sh([str(BIN / "medssl"), "pipeline"], work, env)
    mlflow.set_tracking_uri(mlflow_server)
    return {"dir": work, "env": env, "log": run.stderr + run.stdout, "tune_log": tune.stderr, "uri": mlflow_server}


INITS = ("random", "imagenet", "vae", "simclr", "mim", "imagenet-simclr", "imagenet-mim")
CODES = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")  # HAM10000's dx codes, in DermaMNIST's label order
NAMES = [medmnist_flags()["dermamnist"]["label"][str(i)] for i in range(7)]  # the class names medmnist gives
FRACTIONS = (0.01, 0.1, 1.0)  # the demo budget's
SSL = INITS[2:]


def shifted_source(folder: Path, npz: Path) -> dict:
    """A HAM10000-layout second source: 280 test images with a colour cast (another camera), 2 images per lesion."""
    with np.load(npz) as z:
        x, y = z["test_images"][:280], z["test_labels"][:280, 0]
    cast = np.clip(x.astype(np.float32) * [0.85, 1.0, 1.15] + 10, 0, 255).astype(np.uint8)
    (folder / "images").mkdir()
    rows = ["image_id,lesion_id,dx"]
    for i, (img, label) in enumerate(zip(cast, y)):
        Image.fromarray(img).save(folder / "images" / f"ISIC_{i:07d}.png")
        rows.append(f"ISIC_{i:07d},HAM_{i // 2:07d},{CODES[label]}")
    (folder / "metadata.csv").write_text("\n".join(rows) + "\n")
    return {"images": str(folder / "images"), "csv": str(folder / "metadata.csv"), "name": "recoloured",
            "classes": list(CODES)}  # its dx codes, for DermaMNIST's classes in label order


def runs_of(experiment: str):
    exp = mlflow.get_experiment_by_name(experiment)
    return mlflow.search_runs([exp.experiment_id], output_format="list", order_by=["attributes.start_time ASC"])


def test_pipeline_tracks_parent_and_nested_runs(project, dermamnist):
    runs = runs_of("e2e")
    parents = [r for r in runs if r.data.tags.get("stage") == "pipeline"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0]
    children = {r.data.tags.get("medssl.run"): r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    inits = INITS
    champion = yaml.safe_load((project["dir"] / "metrics/finetune.json").read_text())["init"]
    assert set(children) == {*(f"pretrain-{m}" for m in inits[2:]), f"finetune-{champion}",
                             *(f"grid-{i}" for i in inits), "export"}
    cells = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == children["grid-simclr"].info.run_id]
    assert len(cells) == 3 * (len(FRACTIONS) + 2) and {r.data.tags["protocol"] for r in cells} == {"finetune"}  # seeds x regimes
    md5 = hashlib.md5(dermamnist.read_bytes()).hexdigest()
    lock = yaml.safe_load((project["dir"] / "dvc.lock").read_text())
    raw = [o for o in lock["stages"]["fetch"]["outs"] if o["path"] == "data/raw/images.npz"]
    assert raw[0]["md5"] == md5  # DVC and MLflow agree on the data version
    source = yaml.safe_load((project["dir"] / "metrics/source.json").read_text())
    assert source["md5"] == md5 and source["path"] == str(dermamnist.resolve())  # and say where it came from
    for r in children.values():
        assert r.info.status == "FINISHED"
        assert r.data.tags["data_md5"] == md5 and r.data.tags["seed"] == "42" and len(r.data.tags["git_commit"]) >= 40
    client = mlflow.MlflowClient()
    for name, splits in (("pretrain-vae", {"train"}), ("grid-imagenet", {"train", "val", "test"}),
                         (f"finetune-{champion}", {"train", "val", "test"})):  # evaluate adds test to the champion's
        inputs = client.get_run(children[name].info.run_id).inputs.dataset_inputs
        assert {i.dataset.name for i in inputs} == {f"dermamnist-{s}" for s in splits}, name
        assert {i.dataset.digest for i in inputs} == {md5}  # MLflow's lineage and DVC agree on the data version
    table = [a.path for a in client.list_artifacts(children["grid-imagenet"].info.run_id, "grid")]
    assert "grid/cells.json" in table  # the cells as an MLflow table
    grid_metrics = client.get_run(children["grid-imagenet"].info.run_id).data.metrics
    assert "system/cpu_utilization_percentage" in grid_metrics and "system/system_memory_usage_megabytes" in grid_metrics
    (project["dir"] / "dl").mkdir(exist_ok=True)
    summary = json.loads(Path(client.download_artifacts(children["grid-imagenet"].info.run_id, "summary/run.json",
                                                        str(project["dir"] / "dl"))).read_text())  # (split orient)
    for name, value in summary["data"]:  # the inits' scores as metrics MLflow sorts and charts
        if name.startswith("test_balanced_accuracy_"):
            assert grid_metrics[name] == pytest.approx(value), name
    assert {f"test_balanced_accuracy_finetune_f{f:g}" for f in FRACTIONS} <= set(grid_metrics)
    exp = mlflow.get_experiment_by_name("e2e")  # the experiment page says what it holds, in the classic runs view
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development" and exp.tags["medssl.dataset"] == "dermamnist"
    assert "its description is the verdict" in exp.tags["mlflow.note.content"]
    ft = children[f"finetune-{champion}"]
    sys.path.insert(0, str(project["dir"] / "src"))
    from medssl.config import load_params

    lr = load_params(project["dir"] / "params.yaml").for_init(champion).finetune.lr  # params.yaml + its tuned values
    assert ft.data.tags["init"] == champion and float(ft.data.params["lr"]) == pytest.approx(lr)
    gap, tr, va = (sorted(client.get_metric_history(ft.info.run_id, k), key=lambda m: m.step)  # keys grouped by prefix
                   for k in ("gap/accuracy", "train/accuracy", "val/accuracy"))
    assert [m.step for m in gap] == [1, 2]  # one per epoch
    assert all(g.value == pytest.approx(t.value - v.value) for g, t, v in zip(gap, tr, va))
    ft_metrics = client.get_run(ft.info.run_id).data.metrics
    assert {"train", "val", "gap"} <= {k.split("/")[0] for k in ft_metrics} <= {"train", "val", "gap", "system"}, sorted(ft_metrics)
    # curves only: single values (test and shift scores, per-class recalls) live in tables, not one-bar charts; the
    # parent run's headline holds the champion's test/* as metrics, sortable across pipeline runs
    assert {"test/accuracy", "test/balanced_accuracy", "test/auc_macro"} <= set(parent.data.metrics)
    assert {"parity/max_abs_diff", "parity/of_tolerance"} <= set(parent.data.metrics)
    assert not client.get_run(children["export"].info.run_id).data.metrics  # its parity and ONNX scores: tables
    export_tables = {a.path for a in client.list_artifacts(children["export"].info.run_id, "summary")}
    assert {"summary/parity.json", "summary/onnx_val.json"} <= export_tables, export_tables
    summary = json.loads(Path(mlflow.artifacts.download_artifacts(run_id=ft.info.run_id,
                                                                   artifact_path="summary/test.json")).read_text())
    names = [row[0] for row in summary["data"]]
    assert any(n.startswith("recall_") for n in names) and "balanced_accuracy" in names
    arts = {a.path for a in client.list_artifacts(ft.info.run_id)} | {a.path for a in client.list_artifacts(ft.info.run_id, "plots")}
    assert {"plots/confusion.png", "curves.png"} <= arts  # train and val curves overlaid in one figure
    cell = next(r for r in runs if r.data.tags.get("mlflow.parentRunId") == children["grid-imagenet"].info.run_id
                and r.data.tags.get("protocol") == "finetune")
    assert "curves.png" in {a.path for a in client.list_artifacts(cell.info.run_id)}
    models = client.search_logged_models([ft.info.experiment_id], filter_string=f"source_run_id = '{ft.info.run_id}'")
    assert len(models) == 1 and models[0].name == f"classifier-{champion}"  # the checkpoint, linked to its run
    every = mlflow.search_runs(experiment_names=["e2e"], output_format="list")
    named = [(r.data.tags.get("mlflow.parentRunId"), r.info.run_name) for r in every]
    assert len(set(named)) == len(named), [n for n in named if named.count(n) > 1]  # unique among siblings
    cut = [(parent_id, name[:15]) for parent_id, name in named if parent_id]  # what MLflow's Run Name column shows
    assert len(set(cut)) == len(cut), [n for n in cut if cut.count(n) > 1]  # ...and told apart there
    assert {children[f"pretrain-{m}"].info.run_name for m in inits[2:]} == {f"ssl-{m}" for m in inits[2:]}
    assert {children[f"grid-{i}"].info.run_name for i in inits} == set(inits)  # an init's run: its name, to fit
    assert children["export"].info.run_name == "export" and parent.info.run_name.startswith("pipeline-")
    vae_imgs = {a.path for a in client.list_artifacts(children["pretrain-vae"].info.run_id, "vae")}
    assert "vae/reconstructions_epoch001.png" in vae_imgs and "vae/samples_epoch001.png" in vae_imgs


def test_report_fills_every_cell_with_three_seeds_and_intervals(project):
    d = project["dir"]
    inits, protocols, fractions = INITS, ("linear", "finetune", "knn"), FRACTIONS
    for init in inits:
        grid = yaml.safe_load((d / f"metrics/grid/{init}.json").read_text())
        seen = {}
        for c in grid["cells"]:
            if c["regime"] == "fractions":
                seen.setdefault((c["protocol"], c["fraction"]), set()).add(c["seed"])
                assert np.isfinite(c["test"]["balanced_accuracy"]) and "shift" in c and "kappa_quadratic" in c["test"]
        assert seen == {(p, f): {0, 1, 2} for p in protocols for f in fractions}
        with np.load(d / f"models/grid/{init}/features.npz") as z:  # recorded subsets are nested and keep every class
            stored = {k for k in z.files if k.startswith("pool_x")}
            if init == "random":  # one encoder draw per seed, as in its fine-tune cells
                assert stored == {"pool_x_s0", "pool_x_s1", "pool_x_s2"} and not np.array_equal(z["pool_x_s0"], z["pool_x_s1"])
            else:  # fixed weights: one encoder, built under params.yaml's seed
                assert stored == {f"pool_x_s{yaml.safe_load((d / 'params.yaml').read_text())['seed']}"}
            assert all(z[k].std(0).max() > 0 for k in z.files if "_x" in k)  # stored as probed, not flushed to zero
            for seed in (0, 1, 2):
                subsets = [set(z[f"subset_fractions_f{f:g}_s{seed}"]) for f in fractions]
                assert all(a < b for a, b in zip(subsets, subsets[1:]))
                assert len(np.unique(z["pool_y"][sorted(subsets[0])])) == len(np.unique(z["pool_y"]))
    md = (d / "reports/report.md").read_text()
    for protocol in ("Linear probe", "Fine-tune", "k-NN"):
        table = md.split(f"### {protocol}")[1].split("###")[0]
        rows = [r for r in table.splitlines() if r.startswith("| ") and r.split("|")[1].strip() in inits]
        assert len(rows) == len(INITS) and all(r.count("±") == 2 * len(fractions) for r in rows), table
    assert md.index("## Verdict") < md.index("## Comparison") and "Domain shift" in md and "Class imbalance" in md and "imagenet+simclr" in md and "random+mim" in md
    html = (d / "reports/report.html").read_text()
    assert html.count("<table>") >= 6 and html.count('src="data:image/png;base64,') >= 4  # self-contained
    assert 'src="' not in html.replace('src="data:image/png;base64,', "")  # no image linked by path
    for png in ("balanced_accuracy_vs_fraction.png", "gap_curves.png"):
        assert (d / "reports" / png).stat().st_size > 10_000
    shown = json.loads(sh(["dvc", "metrics", "show", "--json"], d, project["env"]).stdout)[""]["data"]
    assert set(shown) == {"metrics/headline.json"}, set(shown)  # readable by default
    head = shown["metrics/headline.json"]["data"]
    assert head["champion"] in INITS and 0 < head["test"]["bal_acc"] <= 1 and sum(head["cells"].values()) >= 1
    assert set(head["cells"]) == {"ssl", "reference", "open", "ceiling"}  # the same columns in every run
    table = sh(["dvc", "metrics", "show"], d, project["env"]).stdout.splitlines()
    assert len(table) == 2 and max(map(len, table)) <= 160, table  # one row, fits a terminal
    header, row = sh(["dvc", "metrics", "show", "metrics/export.json"], d, project["env"]).stdout.splitlines()[:2]
    parity = row[header.index("parity_of_tolerance"):].split()[0]  # (columns are left-aligned under their names)
    assert float(parity) > 0, (header, row)  # the parity error, where parity_max_abs_diff reads 0.0
    sh(["git", "add", "tuned.yaml", "metrics/headline.json"], d, project["env"])  # as a user commits a run's results
    sh(["git", "-c", "user.name=t", "-c", "user.email=t@localhost", "commit", "-qm", "tuned values, headline"], d, project["env"])
    exps = [r for r in sh(["make", "-s", "exps", f"BIN={BIN}", "-o", ".venv/.installed"], d, project["env"]).stdout.splitlines() if r]
    assert len(exps) >= 3 and max(map(len, exps)) <= 160 and head["champion"] in exps[2], exps  # `dvc exp show`, readable
    full = sh(["dvc", "metrics", "show", "metrics/report.json", "--json"], d, project["env"]).stdout
    assert '"linear"' in full and '"simclr-vs-imagenet"' in full  # the full table, for `dvc metrics diff --targets`
    client = mlflow.MlflowClient()
    parent = [r for r in runs_of("e2e") if r.data.tags.get("stage") == "pipeline"][0]
    assert "reports/report.md" in {a.path for a in client.list_artifacts(parent.info.run_id, "reports")}
    table = client.load_table(parent.info.experiment_id, "comparison.json", run_ids=[parent.info.run_id])  # sortable in the UI
    assert len(table) == 3 * len(INITS) * len(FRACTIONS) and set(table["init"]) == set(INITS), table
    ssl = table[(table["init"] == "simclr") & (table["protocol"] == "linear")]
    assert ssl["minus_imagenet"].notna().all() and (ssl["ci_low"] <= ssl["minus_imagenet"]).all()


def test_report_and_plots_render_in_a_browser(project, tmp_path):
    """Headless Chromium with no network: the report from disk and in MLflow's artifact viewer (a real server)
    shows every image; `medssl plots` renders every DVC plot offline, and names a missing input loudly."""
    from browser import IMAGES, Chromium, open_paired_differences, report_in_artifact_viewer

    d, env = project["dir"], project["env"]
    knn = d / "plots/report/knn.csv"
    knn.rename(tmp_path / "knn.csv")
    r = sh([str(BIN / "medssl"), "plots"], d, env, check=False)
    (tmp_path / "knn.csv").rename(knn)
    assert r.returncode == 2 and "plots/report/knn.csv" in r.stderr and "Traceback" not in r.stderr, r.stderr
    sh([str(BIN / "medssl"), "plots"], d, env)
    page = (d / "dvc_plots/index.html").read_text()
    assert "cdn.jsdelivr" not in page and "<script src=" not in page
    embeds = page.count("vegaEmbed('#")
    defined = [p for p in yaml.safe_load((d / "dvc.yaml").read_text())["plots"] if isinstance(p, dict)]
    assert embeds == len(defined) >= 3 + 2 + 1 + len(SSL)  # report, grid, champion and pretraining curves
    shown = json.loads(sh(["dvc", "plots", "show", "--json"], d, env).stdout)
    assert not shown.get("errors"), shown["errors"]
    linear = shown["data"]["test balanced accuracy vs labels: linear probe (mean of seeds)"][0]["content"]
    assert linear["encoding"]["x"]["scale"]["type"] == "log" and linear["encoding"]["color"]["field"] == "series"
    assert {v["field"] for v in linear["data"]["values"]} == set(INITS)  # a series (a colour) per init
    for method in SSL:  # one pretraining epoch (of 4 steps: 512 images, batch 128) is a line, not a dot
        trace = list(csv.DictReader((d / f"plots/pretrain/{method}.csv").open()))
        steps = [int(r["step"]) for r in trace]
        assert len(trace) >= 3 and steps == sorted(set(steps)) and {r["epoch"] for r in trace} == {"1"}, trace
    gap = shown["data"]["fine-tune cells at 100 % labels: overfitting gap by epoch (mean of seeds)"][0]["content"]
    assert {v["filename"] for v in gap["data"]["values"]} == {f"{i}.csv" for i in INITS}
    assert gap["encoding"]["y"]["aggregate"] == "mean" and "fraction" in gap["transform"][0]["filter"]

    parent = [r for r in runs_of("e2e") if r.data.tags.get("stage") == "pipeline"][0]
    chromium = Chromium(tmp_path / "profile")
    try:
        n, broken = chromium.open((d / "reports/report.html").as_uri()).wait(IMAGES)
        assert n >= 4 and broken == 0, (n, broken)
        ui, frame = report_in_artifact_viewer(chromium, project["uri"], parent)  # MLflow's sandboxed HTML viewer
        assert ui.wait(IMAGES, context=frame) == [n, 0]
        # the link to the paired differences opens their table in the page (a relative link is blocked there)
        shot = Path(os.environ.get("MEDSSL_SCREENSHOTS") or tmp_path) / "mlflow-report-table.png"
        rows = open_paired_differences(ui, frame, shot)
        assert rows == len((d / "reports/paired_differences.csv").read_text().strip().splitlines())
        plots = chromium.open((d / "dvc_plots/index.html").as_uri())
        drawn = "document.querySelectorAll('.vega-embed canvas, .vega-embed svg.marks').length"  # not the menu icons
        assert plots.wait(f"{drawn} >= {embeds} && {drawn}") == embeds  # every plot drawn without a CDN
        assert plots.wait(IMAGES)[1] == 0  # the PNG plots (reports/*.png) too
    finally:
        chromium.close()


def test_mlflow_ui_shows_the_answer(project, tmp_path):
    """Real Chromium on the real server, through the links `medssl pipeline` prints: the experiment's runs under
    its description, and the chart view of the grid-<init> runs with a bar per init in every
    test_balanced_accuracy_<protocol>_f<fraction> chart. Screenshots go to $MEDSSL_SCREENSHOTS (docs/img holds
    the committed ones), else the test's folder."""
    from browser import Chromium, chart_sections, experiment_page, init_charts, run_charts
    from medssl.tracking import ui_links

    shots = Path(os.environ.get("MEDSSL_SCREENSHOTS") or tmp_path)
    exp = mlflow.get_experiment_by_name("e2e")
    links = ui_links(exp.experiment_id, project["uri"])
    assert links["compare"] in project["log"].replace("\n", "")  # printed at the end of the pipeline
    chromium = Chromium(tmp_path / "profile")
    try:
        text = experiment_page(chromium, links, shots / "mlflow-experiment.png")
        assert "Traces\n0" not in text  # the runs table, not the GenAI overview
        keys = [f"test_balanced_accuracy_{protocol}_f1" for protocol in ("linear", "finetune", "knn")]
        missing = init_charts(chromium, links, keys, INITS, shots / "mlflow-compare-inits.png")
        assert not missing, missing  # every init's bar in every chart
        runs = {r.data.tags.get("medssl.run"): r for r in runs_of("e2e")}
        champion = next(r for name, r in runs.items() if name and name.startswith("finetune-"))
        sections = chart_sections(run_charts(chromium, project["uri"], champion, shots / "mlflow-champion-run.png"))
        assert set(sections) == {"train", "val", "gap"}, sections  # curves; its test scores are a table, not bars
    finally:
        chromium.close()


def test_each_init_trains_with_its_own_tuned_values(project):
    """`medssl tune` ran one study per init with the same budget; every stage of an init used that init's values."""
    d = project["dir"]
    tuned = yaml.safe_load((d / "tuned.yaml").read_text())["tuned"]
    assert set(tuned) == set(INITS) and all(t["study"]["trials"] == 1 for t in tuned.values())
    runs = runs_of("e2e")
    tune = [r for r in runs if r.data.tags.get("stage") == "tune"]
    assert len(tune) == 1 and tune[0].info.status == "FINISHED"
    trials = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == tune[0].info.run_id]
    assert sorted(r.data.tags["init"] for r in trials) == sorted(INITS)  # the same trial budget for every init
    parent = [r for r in runs if r.data.tags.get("stage") == "pipeline"][0]
    stage = {r.data.tags.get("medssl.run"): r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    for init in INITS:
        grid = stage[f"grid-{init}"].data
        assert grid.tags["tuned"] == "True"
        for key, value in tuned[init]["finetune"].items():
            logged = grid.params[f"finetune.{key}"] if key != "augment" else grid.params["finetune.augment.strength"]
            want = value if key != "augment" else value["strength"]
            assert float(logged) == pytest.approx(want), (init, key)
        for method, values in tuned[init].get("pretrain", {}).items():
            pre = stage[f"pretrain-{init}"].data.params
            assert pre["start"] == ("imagenet" if init.startswith("imagenet-") else "random")
            for key, value in values.items():
                assert float(pre[key]) == pytest.approx(value), (init, method, key)
    assert len({t["finetune"]["lr"] for t in tuned.values()}) == len(INITS)  # each study drew its own values
    md = (d / "reports/report.md").read_text().split("### Tuning")[1].split("###")[0]
    assert all(f"| {i} | 1 (1 / 0 / 0) |" in md for i in INITS), md


def test_paired_differences_and_verdict(project):
    """Differences to ImageNet and random in metrics/report.json agree with the grid cells they pair; the verdict
    is the report's first section, the parent run's description and the pipeline's last words."""
    d = project["dir"]
    report = yaml.safe_load((d / "metrics/report.json").read_text())
    paired = report["paired"]["test"]["balanced_accuracy"]
    cells = {i: yaml.safe_load((d / f"metrics/grid/{i}.json").read_text())["cells"] for i in INITS}

    def mean_ba(init, protocol, fraction):
        return {c["seed"]: c["test"]["balanced_accuracy"] for c in cells[init]
                if c["protocol"] == protocol and c["regime"] == "fractions" and c["fraction"] == fraction}

    for protocol in ("linear", "finetune", "knn"):
        for fraction, label in ((0.01, "1 %"), (1.0, "100 %")):
            row = paired[protocol]["fractions"][label]
            assert set(row) == {*(f"{i}-vs-imagenet" for i in SSL), *(f"{i}-vs-random" for i in INITS[1:])}
            for init in SSL:
                a, b = mean_ba(init, protocol, fraction), mean_ba("imagenet", protocol, fraction)
                r = row[f"{init}-vs-imagenet"]
                assert r["diff"] == pytest.approx(np.mean([a[s] - b[s] for s in a]), abs=2e-3)
                assert r["lo"] <= r["diff"] <= r["hi"] and 0 <= r["p_holm"] <= 1
    assert "imagenet+simclr-vs-imagenet" in paired["linear"]["fusion"]["100 %"]
    assert "imbalance:10" in paired["finetune"] and "auc_macro" in report["paired"]["test"]
    assert set(report["paired"]["shift"]["balanced_accuracy"]["finetune"]["fractions"]) == {"100 %"}
    assert 0 <= report["champion_shift"] <= 1
    verdict = (d / "reports/verdict.md").read_text().strip()
    md = (d / "reports/report.md").read_text()
    assert md.split("## Verdict\n\n")[1].startswith(verdict.split("\n")[0]) and verdict in md
    assert "**Fine-tune:**" in verdict and "Holm correction" in verdict and "Out of domain (`recoloured`" in verdict
    parent = [r for r in runs_of("e2e") if r.data.tags.get("stage") == "pipeline"][0]
    assert parent.data.tags["mlflow.note.content"] == verdict
    assert "Verdict" in project["log"] and "Holm correction" in project["log"]
    ov = md.split("### Overfitting")[1].split("###")[0]
    assert all(f"| {i} |" in ov for i in INITS) and "![gap curves](gap_curves.png)" in ov
    assert len(list(csv.DictReader((d / "reports/paired_differences.csv").open()))) > 100


def test_registry_round_trip_champion_chosen_on_validation(project):
    d = project["dir"]
    ex = yaml.safe_load((d / "metrics/export.json").read_text())
    ft = yaml.safe_load((d / "metrics/finetune.json").read_text())
    # chosen on the validation scores of the grid's fine-tune cells at 100 % labels, never on test (one finalist under
    # demo; tests/test_finalists.py covers several)
    vals = {}
    for i in INITS:
        cells = yaml.safe_load((d / f"metrics/grid/{i}.json").read_text())["cells"]
        vals[i] = np.mean([c["val"]["balanced_accuracy"] for c in cells
                           if c["protocol"] == "finetune" and c["regime"] == "fractions" and c["fraction"] == 1.0])
    assert ft["candidates_val"] == pytest.approx(vals) and ex["champion"] == ft["init"] == max(vals, key=vals.get)
    assert ex["parity_max_abs_diff"] <= 1e-4 and ex["parity_images"] >= 64
    assert ex["parity_of_tolerance"] == pytest.approx(ex["parity_max_abs_diff"] / 1e-4) and ex["parity_of_tolerance"] <= 1
    client = mlflow.MlflowClient()
    mv = client.get_model_version_by_alias("derm-e2e", "champion")
    assert int(mv.version) == ex["version"]
    assert mv.tags["init"] == ex["champion"] and "test_accuracy" in mv.tags and "val_balanced_accuracy" in mv.tags
    assert mv.tags["source_run_id"] == ft["run_id"]
    assert mv.tags["promoted"] == "true" and "first model" in mv.tags["promotion_reason"] and "Promoted" in mv.description
    assert len(mv.tags) <= 20 and "| macro AUC |" in mv.description and "medssl predict" in mv.description
    assert "medssl serve" in client.get_registered_model("derm-e2e").description
    # the champion's test scores with their 95 % bootstrap intervals: in test.json, the report and the description
    test = json.loads((d / "metrics/test.json").read_text())[ex["champion"]]
    for k in ("accuracy", "balanced_accuracy", "auc_macro"):
        lo, hi = test[f"{k}_ci_low"], test[f"{k}_ci_high"]
        assert lo <= test[k] <= hi and lo < hi, (k, lo, test[k], hi)
        cell = f"{test[k]:.4f} [{lo:.3f}, {hi:.3f}]"
        assert cell in mv.description, (cell, mv.description)
        assert cell in (d / "reports/report.md").read_text().split("### Test")[1].split("Gap at best")[0]

    model = mlflow.pyfunc.load_model("models:/derm-e2e@champion")
    with np.load(d / "data/raw/images.npz") as z:
        x = z["test_images"][:32]
    p = model.predict(x)
    p = p["probabilities"] if isinstance(p, dict) else np.asarray(p)
    assert p.shape == (32, 7) and np.allclose(p.sum(1), 1, atol=1e-5)


def test_predict_cli_agrees_with_pytorch(project, tmp_path):
    d, env = project["dir"], project["env"]
    with np.load(d / "data/raw/images.npz") as z:
        x = z["test_images"][:40]
    folder = tmp_path / "lesions"
    folder.mkdir()
    for i, img in enumerate(x):
        Image.fromarray(img).save(folder / f"img{i:03d}.png")
    out = tmp_path / "pred.csv"
    sh([str(BIN / "medssl"), "predict", "models:/derm-e2e@champion", str(folder), "--out", str(out)], d, env)
    rows = list(csv.DictReader(out.open()))
    assert [Path(r["file"]).name for r in rows] == [f"img{i:03d}.png" for i in range(40)]
    assert set(rows[0]) == {"file", "predicted", *(f"p_{c}" for c in NAMES)}

    sys.path.insert(0, str(d / "src"))
    from medssl.models.classifier import Classifier, ExportModel, with_views

    ckpt = torch.load(d / "models/finetune/model.pt", weights_only=True)
    clf = Classifier(ckpt["backbone"], 7, ckpt["dropout"], mean=ckpt["mean"], std=ckpt["std"])
    clf.load_state_dict(ckpt["state_dict"])
    with torch.no_grad():
        ref = ExportModel(with_views(clf, ckpt["views"]), ckpt["image_size"]).eval()(torch.from_numpy(x)).argmax(1)
    assert [r["predicted"] for r in rows] == [ckpt["classes"][i] for i in ref.tolist()]

    bad = folder / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    r = sh([str(BIN / "medssl"), "predict", "models:/derm-e2e@champion", str(folder)], d, env, check=False)
    assert r.returncode == 2 and "broken.jpg" in r.stderr and "Traceback" not in r.stderr


def test_dvc_tracks_changes(project):
    d, env = project["dir"], project["env"]
    out = sh(["dvc", "repro"], d, env).stdout  # a second repro only re-checks the data source
    assert [line for line in out.splitlines() if line.startswith("Running stage")] == ["Running stage 'fetch':"], out
    r = sh(["dvc", "status", "--json"], d, env)
    assert yaml.safe_load(r.stdout) == {"fetch": ["always changed"]}, r.stdout
    set_params(d / "params.yaml", **{"finetune.lr": 3e-4})
    changed = set(yaml.safe_load(sh(["dvc", "status", "--json"], d, env).stdout))
    # stages whose own inputs changed (validate reads every key); evaluate and export follow them in the DAG
    grids = {"grid@random", "grid@imagenet", *(f"grid_ssl@{m}" for m in SSL)}
    assert changed == {"validate", "fetch", "finetune", *grids}
    dag = sh(["dvc", "dag", "--dot", "export"], d, env).stdout
    assert '"grid@imagenet" -> "finetune"' in dag and '"finetune" -> "evaluate"' in dag and '"evaluate" -> "export"' in dag, dag
    sh(["git", "checkout", "params.yaml"], d, env)
    set_params(d / "params.yaml", **{"finetune.ema_window": 0.5})  # the champion's recipe, not the comparison's
    assert set(yaml.safe_load(sh(["dvc", "status", "--json"], d, env).stdout)) == {"validate", "fetch", "finetune"}
    sh(["git", "checkout", "params.yaml"], d, env)
    # a stage reads the chosen budget only (budgets.${budget}): editing another budget reruns nothing
    set_params(d / "params.yaml", **{"budgets.cpu.finetune_epochs": 99})
    assert set(yaml.safe_load(sh(["dvc", "status", "--json"], d, env).stdout)) == {"validate", "fetch"}
    set_params(d / "params.yaml", **{"budgets.demo.finetune_epochs": 99})  # and of it, the keys a stage reads
    changed = set(yaml.safe_load(sh(["dvc", "status", "--json"], d, env).stdout))
    assert changed == {"validate", "fetch", "prepare", "finetune", "evaluate"}, changed
    set_params(d / "params.yaml", **{"budgets.demo.pretrain_epochs": 99})
    changed = set(yaml.safe_load(sh(["dvc", "status", "--json"], d, env).stdout))
    assert changed == {"validate", "fetch", "prepare", "finetune", "evaluate", *(f"pretrain@{m}" for m in SSL)}, changed
    sh(["git", "checkout", "params.yaml"], d, env)
    # every stage depends on the code it runs, and only on that: the report's module reruns evaluate alone,
    # the engine (core/) every training stage, never prepare
    report = d / "src/medssl/report.py"
    report.write_text(report.read_text() + "\n")
    assert yaml.safe_load(sh(["dvc", "status", "--json"], d, env).stdout) == {
        "fetch": ["always changed"], "evaluate": [{"changed deps": {"src/medssl/report.py": "modified"}}]}
    sh(["git", "checkout", "src"], d, env)
    probes = d / "src/medssl/core/probes.py"
    probes.write_text(probes.read_text() + "\n")
    changed = set(yaml.safe_load(sh(["dvc", "status", "--json"], d, env).stdout))
    assert changed == {"fetch", "finetune", "evaluate", "export", *grids, *(f"pretrain@{m}" for m in SSL)}, changed
    sh(["git", "checkout", "src"], d, env)


def test_failed_parity_registers_nothing_and_marks_run_failed(project, tmp_path):
    d, env = project["dir"], project["env"]
    params = tmp_path / "params.yaml"
    shutil.copy(d / "params.yaml", params)
    set_params(params, **{"export.parity_tolerance": 1e-15})
    client = mlflow.MlflowClient()
    before = len(client.search_model_versions("name='derm-e2e'"))
    onnx_before = hashlib.md5((d / "models/champion.onnx").read_bytes()).hexdigest()
    r = sh([str(BIN / "medssl"), "export", "--params", str(params)], d, env, check=False)
    assert r.returncode == 2 and "not registered" in r.stderr
    assert len(client.search_model_versions("name='derm-e2e'")) == before
    assert hashlib.md5((d / "models/champion.onnx").read_bytes()).hexdigest() == onnx_before
    last_export = [x for x in runs_of("e2e") if x.data.tags.get("medssl.run") == "export"][-1]
    assert last_export.info.status == "FAILED"


def test_mlflow_project_entry_point_calls_same_cli(project):
    d, env = project["dir"], project["env"]
    sh([str(BIN / "mlflow"), "run", ".", "-e", "evaluate", "--env-manager", "local", "--experiment-name", "e2e"], d, env)
    runs = [r for r in runs_of("e2e") if r.data.tags.get("mlflow.project.entryPoint") == "evaluate"]
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"


def export(d, env, *args, check=True):
    return sh([str(BIN / "medssl"), "export", *args], d, env, check=check)


def test_alias_moves_only_to_a_better_model(project):
    """Re-exporting the same classifier registers a version that ties the champion: it is not promoted, and says
    why; --force promotes it."""
    d, env = project["dir"], project["env"]
    client = mlflow.MlflowClient()
    held = client.get_model_version_by_alias("derm-e2e", "champion").version
    r = export(d, env)
    ex = yaml.safe_load((d / "metrics/export.json").read_text())
    assert ex["promoted"] is False and "does not beat the current champion" in ex["reason"], ex
    assert client.get_model_version_by_alias("derm-e2e", "champion").version == held
    mv = client.get_model_version("derm-e2e", str(ex["version"]))
    assert mv.tags["promoted"] == "false" and mv.tags["compared_with_version"] == held and "Not promoted" in mv.description
    assert "not promoted" in r.stderr
    export(d, env, "--force")
    ex = yaml.safe_load((d / "metrics/export.json").read_text())
    assert ex["promoted"] is True and ex["reason"].startswith("--force")
    assert client.get_model_version_by_alias("derm-e2e", "champion").version == str(ex["version"])


def test_constant_predictor_is_never_registered(project, tmp_path):
    """A classifier that answers one class for every image fails the sanity gate: no version, run FAILED."""
    d, env = project["dir"], project["env"]
    copy = tmp_path / "copy"
    shutil.copytree(d, copy, ignore=shutil.ignore_patterns(".dvc", ".git"))
    ckpt = torch.load(copy / "models/finetune/model.pt", weights_only=True)
    for k, v in ckpt["state_dict"].items():
        if k.startswith("head"):
            v.zero_()
            if k.endswith("bias"):
                v[5] = 10.0  # always "nv", the majority class
    torch.save(ckpt, copy / "models/finetune/model.pt")
    test = json.loads((copy / "metrics/test.json").read_text())  # as if evaluate had scored this file
    (init, scored), = test.items()
    scored["model_md5"] = hashlib.md5((copy / "models/finetune/model.pt").read_bytes()).hexdigest()
    (copy / "metrics/test.json").write_text(json.dumps(test))
    client = mlflow.MlflowClient()
    before = len(client.search_model_versions("name='derm-e2e'"))
    r = export(copy, env, check=False)
    assert r.returncode == 2 and "no better than a constant majority-class predictor" in r.stderr, r.stderr[-2000:]
    assert len(client.search_model_versions("name='derm-e2e'")) == before
    assert [x for x in runs_of("e2e") if x.data.tags.get("medssl.run") == "export"][-1].info.status == "FAILED"


def test_rest_server_scores_uint8_and_refuses_the_rest(project, tmp_path):
    """`medssl serve` as a real process: valid uint8 images agree with `medssl predict`'s model; floats, wrong sizes,
    non-JSON and oversized bodies get 400/413 with a message; SIGTERM ends it."""
    import json as _json
    import os
    import signal
    import time
    import urllib.error
    import urllib.request

    from conftest import free_port, wait_http

    d, env = project["dir"], project["env"]
    port = free_port()
    proc = subprocess.Popen([str(BIN / "medssl"), "serve", "models:/derm-e2e@champion", "--port", str(port),
                             "--max-request-mb", "1"], cwd=d, env=env, stdout=(tmp_path / "serve.log").open("w"),
                            stderr=subprocess.STDOUT)
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def post(body: bytes, ctype="application/json"):
        req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body, headers={"Content-Type": ctype})
        try:
            with direct.open(req, timeout=60) as r:
                return r.status, _json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, _json.loads(e.read())

    try:
        wait_http(f"http://127.0.0.1:{port}/ping", proc)
        with np.load(d / "data/raw/images.npz") as z:
            x = z["test_images"][:16]
        status, out = post(_json.dumps({"inputs": x.tolist()}).encode())
        assert status == 200 and np.asarray(out["predictions"]).shape == (16, 7)
        pyfunc = mlflow.pyfunc.load_model("models:/derm-e2e@champion").predict(x)
        pyfunc = pyfunc["probabilities"] if isinstance(pyfunc, dict) else np.asarray(pyfunc)
        assert np.allclose(out["predictions"], pyfunc, atol=1e-5)
        cases = {
            "floats in [0, 1]": ({"inputs": (x / 255.0).tolist()}, 400, "multiplied by 255"),
            "values over 255": ({"inputs": (x.astype(int) + 300).tolist()}, 400, "0..255"),
            "wrong size": ({"inputs": x[:, :20].tolist()}, 400, "[N, 28, 28, 3]"),
            "booleans": ({"inputs": (x > 100).tolist()}, 400, "integers"),
            "no inputs key": ({"images": x.tolist()}, 400, '"inputs"'),
        }
        for name, (payload, code, words) in cases.items():
            status, out = post(_json.dumps(payload).encode())
            assert status == code and words in out["message"], (name, status, out)
        assert post(b"{not json")[0] == 400
        t0 = time.time()
        status, out = post(b" " * (2 << 20))  # 2 MiB over a 1 MiB limit: refused before it is parsed
        assert status == 413 and "limit" in out["message"]
        rss = int(next(line.split()[1] for line in open(f"/proc/{proc.pid}/status") if line.startswith("VmHWM")))
        print(f"\nREST: 2 MiB body refused (413) in {time.time() - t0:.2f} s; server peak RSS {rss / 1024:.0f} MiB")
    finally:
        t0 = time.time()
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)
        print(f"SIGTERM: server exited in {time.time() - t0:.1f} s")


def test_predict_refuses_what_it_cannot_score_faithfully(project, tmp_path):
    from PIL import Image

    d, env = project["dir"], project["env"]
    with np.load(d / "data/raw/images.npz") as z:
        img = z["test_images"][0]
    folder = tmp_path / "odd"
    folder.mkdir()
    Image.fromarray(np.zeros((40, 28, 3), np.uint8)).save(folder / "tall.png")
    Image.fromarray(np.zeros((28, 28, 3), np.uint8)).save(folder / "fine.png")
    r = sh([str(BIN / "medssl"), "predict", "models:/derm-e2e@champion", str(folder)], d, env, check=False)
    assert r.returncode == 2 and "tall.png: 28x40" in r.stderr and "--fit" in r.stderr and "fine.png" not in r.stderr
    r = sh([str(BIN / "medssl"), "predict", "models:/derm-e2e@champion", str(folder), "--fit", "crop"], d, env)
    assert len(r.stdout.strip().splitlines()) == 3
    # a 16-bit PNG is scored like its 8-bit original, not as a white image
    Image.fromarray(img).save(tmp_path / "eight.png")
    Image.fromarray(img[..., 1].astype(np.uint16) * 257).save(tmp_path / "sixteen.png")
    Image.fromarray(img[..., 1]).save(tmp_path / "grey.png")
    rows = sh([str(BIN / "medssl"), "predict", "models:/derm-e2e@champion", str(tmp_path / "sixteen.png"),
               str(tmp_path / "grey.png")], d, env).stdout.splitlines()
    assert rows[1].split(",")[1:] == rows[2].split(",")[1:]
    r = sh([str(BIN / "medssl"), "predict", "models:/derm-e2e@nope", str(tmp_path / "eight.png")], d, env, check=False)
    assert r.returncode == 2 and "no such model" in r.stderr and len(r.stderr.strip().splitlines()) <= 3, r.stderr
    assert "registered here: models:/derm-e2e @champion" in r.stderr, r.stderr  # what the user can address instead


def test_diverging_config_never_moves_the_alias(project):
    """Last in this module (it changes the project): a VAE learning rate of 1e6 stops the pipeline at pretrain-vae
    with the epoch and loss, the parent run names the stage, and the registry is untouched."""
    d, env = project["dir"], project["env"]
    client = mlflow.MlflowClient()
    held = client.get_model_version_by_alias("derm-e2e", "champion").version
    versions = len(client.search_model_versions("name='derm-e2e'"))
    tuned = (d / "tuned.yaml").read_text()  # the VAE trains with its tuned values, which take precedence
    set_params(d / "tuned.yaml", **{"tuned.vae.pretrain.vae.lr": 1.0e6})
    try:
        r = sh([str(BIN / "medssl"), "pipeline"], d, env, check=False)
    finally:
        (d / "tuned.yaml").write_text(tuned)
    assert r.returncode != 0 and "diverged at epoch 1" in r.stderr, r.stderr[-3000:]
    parent = [x for x in runs_of("e2e") if x.data.tags.get("stage") == "pipeline"][-1]
    assert parent.info.status == "FAILED" and parent.data.tags["failed_stage"] == "pretrain-vae"
    assert "diverged at epoch 1" in parent.data.tags["error"]
    assert client.get_model_version_by_alias("derm-e2e", "champion").version == held
    assert len(client.search_model_versions("name='derm-e2e'")) == versions
