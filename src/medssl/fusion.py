"""Fusion cells of the evaluate stage: the linear probe on concatenated frozen embeddings of each grid.fusion
group (features saved by the grid stages), at the grid's fractions and seeds, on each group's own subsets."""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from medssl.config import Params
from medssl.checkpoints import encoder_seed_of
from medssl.core.cells import CellData, Job, probe_cell
from medssl.core.engine import pick_device
from medssl.layout import Layout
from medssl.resume import read_grid


def fusion_cells(p: Params, classes: list[str], lay: Layout) -> tuple[list[dict], dict]:
    """Linear probe on concatenated frozen embeddings of each grid.fusion group, same fractions and seeds.
    Returns the cells and their held-out probabilities, keyed as report.load_probas."""
    device = pick_device()  # on a GPU the probes run there (torch L-BFGS), on a CPU as the grid's own probes do
    feats = {}
    for init in {i for group in p.grid.fusion for i in group}:
        read_grid(p, init, lay)  # a grid of other inputs (encoders, settings) is refused with one line, not half-read
        with np.load(lay.grid_features(init)) as z:
            feats[init] = {k: z[k] for k in z.files}
    def cell(group, seed, fraction):
        name, first = "+".join(group), feats[group[0]]
        y = {s[:-2]: first[s].astype(np.int64) for s in first if s.endswith("_y")}
        data = CellData(y=y, scored=[s for s in y if s != "pool"], classes=classes)
        # the probe standardises every feature, so each encoder enters with unit-variance features;
        # each encoder contributes the draw its own cells of this seed probed (random's; SSL inits' pretrained per seed)
        es = {i: encoder_seed_of(p, i, seed) for i in group}
        x = {s: torch.from_numpy(np.concatenate([feats[i][f"{s}_x_s{es[i]}"] for i in group], 1)).to(device) for s in y}
        job = Job("fractions", fraction, seed, first[f"subset_fractions_f{fraction:g}_s{seed}"])  # the single encoders' subset
        c, held = probe_cell(job, x, data, init=name, protocol="linear", grid=p.grid)
        return {**c, "regime": "fusion"}, {(name, "linear", "fusion", fraction, seed, s): pr for s, pr in held.items()}

    jobs = [(g, s, f) for g in p.grid.fusion for s in p.grid.seeds for f in p.grid.fractions]
    # one probe per core (each on one BLAS thread): the evaluate stage runs alone at the end of the pipeline
    with ThreadPoolExecutor(max(1, len(os.sched_getaffinity(0)))) as pool:
        done = list(pool.map(lambda j: cell(*j), jobs))
    cells, probas = [c for c, _ in done], {}
    for _, held in done:
        probas |= held
    return cells, probas
