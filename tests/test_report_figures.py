"""The report's figures are drawn to be read: a panel per init (or protocol) of a readable size and tick size, and
intervals of different inits that do not sit on top of one another."""
from __future__ import annotations

import numpy as np
import pytest

from medssl import report

INITS = ["random", "imagenet", "vae", "simclr", "mim", "imagenet-simclr", "imagenet-mim"]
FRACTIONS = [0.01, 0.1, 1.0]
PROTOCOLS = ["linear", "finetune", "knn"]


@pytest.fixture
def drawn(monkeypatch):
    """The figures the report closes, kept open for inspection."""
    figs = []
    monkeypatch.setattr(report.plt, "close", figs.append)
    return figs


def panels(fig):
    return [ax for ax in fig.axes if ax.get_visible()]


def test_fraction_figure_dodges_the_inits_so_their_intervals_do_not_overlap(drawn, tmp_path):
    rng = np.random.default_rng(0)
    agg = {("fractions", p, i, f): {"balanced_accuracy": (0.4 + 0.01 * rng.random(), 0.05)}  # all but equal
           for p in PROTOCOLS for i in INITS for f in FRACTIONS}
    report.plot_vs_fraction(agg, PROTOCOLS, INITS, FRACTIONS, tmp_path / "f.png")
    fig = drawn[-1]
    assert (tmp_path / "f.png").stat().st_size > 10_000 and len(panels(fig)) == len(PROTOCOLS)
    for ax in panels(fig):
        w, h = ax.get_window_extent().width, ax.get_window_extent().height  # pixels at the figure's dpi
        assert w >= 300 and h >= 250, (w, h)
        assert ax.get_xscale() == "log" and all(t.get_fontsize() >= 9 for t in ax.get_xticklabels())
        xs = {c.get_label(): c.lines[0].get_xdata() for c in ax.containers}  # errorbar: points + interval
        assert set(xs) == set(INITS)  # a line (a colour) per init
        for k in range(len(FRACTIONS)):  # at each fraction every init's point (and interval) at its own x
            at = sorted(float(x[k]) for x in xs.values())
            assert min(b / a for a, b in zip(at, at[1:])) > 1.05, at


def test_gap_figure_has_a_readable_panel_per_init(drawn, tmp_path):
    epochs = [1, 2, 3]
    over = {i: {"epochs": epochs, "gap_curve": {e: (0.02 * e, 0.01) for e in epochs}, "stop_epoch": (2.0, 0.5)}
            for i in INITS}
    report.plot_gap_curves(over, tmp_path / "g.png")
    fig = drawn[-1]
    shown = panels(fig)
    assert [ax.get_title() for ax in shown] == INITS  # one panel per init, titled with it
    for ax in shown:
        w, h = ax.get_window_extent().width, ax.get_window_extent().height
        assert w >= 250 and h >= 200, (w, h)  # not ~171 px squeezed into one row
        assert all(t.get_fontsize() >= 9 for t in ax.get_yticklabels() + ax.get_xticklabels())
