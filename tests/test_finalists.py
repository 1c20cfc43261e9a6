"""budgets.<budget>.finalists: the grid's short cells rank the inits, its best few are each trained with the shipped
recipe, and the best on its own validation ships, whatever order the grid put them in."""
import mlflow
import pytest
import torch

from medssl import finetune as finetune_stage
from medssl import tracking
from medssl.checkpoints import how_chosen, user_named
from medssl.config import load_params
from medssl.evaluate import run_evaluate
from medssl.export import champion_line, run_export
from medssl.grid import run_grid
from medssl.io import read_json

from conftest import ROOT
from test_resume import prepared

SMALL = {"data.image_size": 32, "inits.baselines": ["random", "imagenet"], "inits.ssl": [], "grid.fusion": [],
         "grid.protocols": ["finetune"], "grid.fractions": [1.0], "grid.imbalance": [], "grid.shift": None,
         "budgets.demo.grid": {"epochs": 1, "max_train": None, "max_eval": None}, "budgets.demo.finetune_epochs": 2,
         "budgets.demo.finalists": 2, "finetune.batch_size": 16, "mlflow.experiment": "finalists"}


def weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def runs():
    """(medssl.run tag, status) of each fine-tune run in the test's experiment."""
    found = mlflow.search_runs(experiment_names=["finalists"], filter_string="tags.stage = 'finetune'", output_format="list")
    return [(r.data.tags[tracking.RUN_TAG], r.info.status) for r in found]


def test_finalists_trained_with_the_shipped_recipe_and_the_best_on_validation_ships(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")  # whatever an earlier test on this worker set
    monkeypatch.chdir(tmp_path)
    p = load_params(ROOT / "params.yaml", SMALL, tuned=False)
    lay = prepared(tmp_path / "run", p)
    for init in p.inits.all:
        run_grid(p, init, lay)
    select = p.export.select_metric
    order, means = finetune_stage.choose_champion(p, lay)

    first = finetune_stage.run_finetune(p, lay=lay)
    vals = first["finalists_val"]
    assert sorted(vals) == sorted(order) and first["candidates_val"] == pytest.approx(means)
    # each finalist's score is its own checkpoint's validation; the shipped file is the best one's, bit for bit
    assert vals == {i: weights(lay.finalist(i))["val"][select] for i in order}
    assert first["init"] == finetune_stage.ranked({i: weights(lay.finalist(i))["val"] for i in order}, select)[0]
    shipped, best = weights(lay.classifier), weights(lay.finalist(first["init"]))
    assert shipped.pop("finalists_val") == vals and shipped["run_id"] == first["run_id"]
    assert shipped.keys() == best.keys() and all(torch.equal(v, best["state_dict"][k]) for k, v in shipped.pop("state_dict").items())
    assert shipped == {k: v for k, v in best.items() if k != "state_dict"}
    assert read_json(lay.finetune_metrics)["finalists_val"] == vals
    assert sorted(runs()) == [("finetune-imagenet", "FINISHED"), ("finetune-random", "FINISHED")]
    assert all(i in how_chosen(select, first) and "best 2" in how_chosen(select, first) for i in order)

    # the grid's order the other way round: the same winner (in one of the two orders it was listed second)
    monkeypatch.setattr(finetune_stage, "choose_champion", lambda p, lay: (order[::-1], means))
    again = finetune_stage.run_finetune(p, lay=lay)
    assert again["init"] == first["init"] and again["finalists_val"] == pytest.approx(vals)
    monkeypatch.setattr(finetune_stage, "choose_champion", lambda p, lay: (order, means))

    # stopped during the second finalist's first epoch: the shipped file stays the last complete run's, and the
    # rerun resumes the second from its own state; the first, finished, is neither trained nor logged again
    good = lay.classifier.read_bytes()
    calls = []

    def stop_at_second(epoch, value):
        calls.append(epoch)
        if len(calls) > p.run_budget.finetune_epochs:
            raise KeyboardInterrupt("stopped")

    with pytest.raises(KeyboardInterrupt):
        finetune_stage.run_finetune(p, lay=lay, on_epoch=stop_at_second)
    assert lay.classifier.read_bytes() == good
    stopped = runs()
    finished_first = weights(lay.finalist(order[0]))["run_id"]
    resumed, real = {}, finetune_stage.finetune

    def spy(model, data, spec, *, desc, on_epoch=None, resume=None, **kw):
        resumed[desc.split()[-1]] = None if resume is None else resume["epoch"]
        return real(model, data, spec, desc=desc, on_epoch=on_epoch, resume=resume, **kw)

    monkeypatch.setattr(finetune_stage, "finetune", spy)
    last = finetune_stage.run_finetune(p, lay=lay)
    assert resumed == {order[1]: 1}  # epochs count from 1
    assert last["init"] == first["init"] and last["finalists_val"] == pytest.approx(vals)
    assert sorted(runs()) == sorted(stopped + [(f"finetune-{order[1]}", "FINISHED")])
    assert weights(lay.finalist(order[0]))["run_id"] == finished_first
    assert not any(lay.resume(f"finetune-{i}").exists() for i in order)  # cleared once the winner is in place

    # the report, the registry version and the champion's log line say how it was chosen, with each finalist's score
    client = mlflow.MlflowClient()
    trained = client.get_run(last["run_id"]).info
    run_evaluate(p, lay)
    # its test scores join the shipped finalist's run, whose end (and so its duration in the UI) stays its training's
    assert (client.get_run(last["run_id"]).info.end_time, client.get_run(last["run_id"]).info.status) == (
        trained.end_time, "FINISHED")
    assert "summary/test.json" in {a.path for a in client.list_artifacts(last["run_id"], "summary")}
    said = how_chosen(select, last)
    report = lay.report_md.read_text()
    assert f"{last['init']} was {said}." in report
    ex = run_export(p, lay)
    version = client.get_model_version(p.export.registered_model, str(ex["version"]))
    assert ex["finalists_val"] == last["finalists_val"] and said in version.description and said in champion_line(ex)


def test_one_finalist_ships_the_grids_best_without_a_finalists_record(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.chdir(tmp_path)
    p = load_params(ROOT / "params.yaml", {**SMALL, "budgets.demo.finalists": 1}, tuned=False)
    lay = prepared(tmp_path / "run", p)
    for init in p.inits.all:
        run_grid(p, init, lay)
    summary = finetune_stage.run_finetune(p, lay=lay)
    assert summary["init"] == finetune_stage.choose_champion(p, lay)[0][0] and "finalists_val" not in summary
    assert not lay.finalist(summary["init"]).parent.exists() and "finalists_val" not in weights(lay.classifier)
    assert how_chosen(p.export.select_metric, summary).endswith("of the grid's 100 % fine-tune cells")

    # an init the user names is trained and reported as named, not as the comparison's choice
    other = next(i for i in p.inits.all if i != summary["init"])
    named = finetune_stage.run_finetune(p, other, lay=lay)
    assert named["init"] == other and user_named(named) and user_named(weights(lay.classifier))
    run_evaluate(p, lay)
    report = lay.report_md.read_text()
    assert f"{other} was {how_chosen(p.export.select_metric, named)}. It was trained" in report
    assert "chosen on validation" not in report and "mean validation `balanced_accuracy` over seeds" not in report
