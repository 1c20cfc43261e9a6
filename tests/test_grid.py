"""Comparison-grid building blocks: imbalance caps and confidence intervals."""
import numpy as np
import pytest

from medssl.grid import capped_imbalance
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
