"""Comparison-grid building blocks: imbalance caps and confidence intervals."""
import numpy as np
import pytest

from medssl.core.cells import capped_imbalance, plan
from medssl.report import ci95


@pytest.mark.parametrize("ratio", [1, 3, 10])
def test_capped_imbalance_reaches_ratio_and_keeps_every_class(ratio):
    y = np.repeat(np.arange(7), [40, 60, 130, 12, 140, 700, 15])
    idx = capped_imbalance(y, ratio, seed=0)
    counts = np.bincount(y[idx], minlength=7)
    assert counts.min() == 12 and counts.max() <= np.ceil(ratio * 12) and counts.max() / counts.min() <= ratio + 1 / 12
    assert len(set(idx)) == len(idx) and np.array_equal(idx, np.sort(idx))
    assert np.array_equal(idx, capped_imbalance(y, ratio, seed=0)) and not np.array_equal(idx, capped_imbalance(y, ratio, 1))


def test_ci95_is_the_student_t_interval():
    mean, half = ci95([0.5, 0.6, 0.7])
    assert mean == pytest.approx(0.6) and half == pytest.approx(4.302653 * 0.1 / np.sqrt(3), rel=1e-5)
    assert ci95([0.4, 0.4, 0.4]) == (pytest.approx(0.4), pytest.approx(0.0, abs=1e-12))


def test_plan_is_nested_and_independent_of_order():
    """Each seed's fractions are nested; the plan depends only on labels, settings and seeds."""
    y = np.repeat(np.arange(7), [40, 60, 130, 12, 140, 700, 15])
    jobs = plan(y, [0.1, 0.5, 1.0], [1, 10], [0, 1, 2])
    assert len(jobs) == 3 * (3 + 2)
    by = {j.key: j.idx for j in jobs}
    for s in (0, 1, 2):
        assert set(by[f"fractions_f0.1_s{s}"]) <= set(by[f"fractions_f0.5_s{s}"]) <= set(by[f"fractions_f1_s{s}"])
    again = {j.key: j.idx for j in plan(y, [1.0, 0.5, 0.1], [1, 10], [2, 1, 0])}
    assert all(np.array_equal(by[k], again[k]) for k in by)


def test_one_class_cells_are_marked_in_the_report_tables():
    """A cell whose model predicts one class on test in some seeds says so beside its scores; others do not."""
    from medssl.report import aggregate, protocol_table

    def cell(seed, n_pred, ba):
        return {"init": "random", "protocol": "finetune", "regime": "fractions", "fraction": 1.0, "seed": seed,
                "n_train": 10, "gap_accuracy": 0.0, "test_classes_predicted": n_pred,
                "test": {"balanced_accuracy": ba, "auc_macro": 0.5}}

    agg = aggregate([cell(0, 1, 1 / 7), cell(1, 1, 1 / 7), cell(2, 3, 0.3)])
    assert agg[("fractions", "finetune", "random", 1.0)]["one_class"] == 2
    assert "**one class** (2 of 3 seeds)" in protocol_table(agg, "fractions", "finetune", ["random"], [1.0])
    agg = aggregate([cell(s, 4, 0.3) for s in range(3)])
    assert "one class" not in protocol_table(agg, "fractions", "finetune", ["random"], [1.0])


def test_champion_line_says_how_it_was_chosen_and_whether_the_alias_moved():
    from medssl.checkpoints import how_chosen
    from medssl.export import champion_line

    select = "balanced_accuracy"
    grid = how_chosen(select, {"candidates_val": {"imagenet": 0.61, "random": 0.42}})  # one finalist: the grid's best
    assert "chosen on validation balanced_accuracy of the grid's" in grid
    finals = how_chosen(select, {"candidates_val": {"imagenet": 0.61}, "finalists_val": {"imagenet-simclr": 0.5675, "imagenet": 0.6158}})
    assert "the best 2 were each trained with the shipped recipe" in finals and "imagenet 0.6158" in finals
    assert "tie" not in finals and "a tie, broken by the higher validation macro AUC" in how_chosen(
        select, {"finalists_val": {"imagenet-simclr": 1.0, "imagenet": 1.0}})
    named = how_chosen(select, {"candidates_val": None})  # `medssl finetune <init>`: no candidates it was chosen among
    assert "named by the user" in named and "chosen on validation" not in named

    ex = {"champion": "imagenet", "select_metric": select, "chosen": grid, "model_uri": "models:/m@champion",
          "version_uri": "models:/m/2", "promoted": False, "reason": "does not beat the current champion"}
    line = champion_line(ex)
    assert f"({grid}) registered as models:/m/2" in line and "not promoted, models:/m@champion unchanged" in line
    assert "now points at it" in champion_line({**ex, "promoted": True})
