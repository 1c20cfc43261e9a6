"""The compute core on its own: no MLflow, no paths. Same cells whatever runs them; resume = uninterrupted run."""
import threading
from types import SimpleNamespace as NS

import numpy as np
import pytest
import torch

from medssl.core.cells import CellData, finetune_cell, plan, probe_cell
from medssl.core.engine import extract_features
from medssl.core.train import MIN_WINDOW, FitData, FitSpec, ema_decay, finetune
from medssl.models.classifier import Classifier

CLASSES = [str(i) for i in range(7)]
CFG = NS(lr=1e-3, weight_decay=1e-4, batch_size=16, label_smoothing=0.0, warmup_epochs=0, class_weight="balanced",
         augment=NS(hflip=True, vflip=True, rot90=True, strength=0.5), ema_window=0.0)
GRID = NS(linear_c=1.0, linear_class_weight="balanced", knn_k=5)
BUDGET = NS(epochs=1, steps=None, max_eval=16)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    y = {s: np.arange(n) % 7 for s, n in (("pool", 70), ("val", 28), ("test", 28))}
    x = {s: torch.from_numpy(rng.integers(0, 256, (len(v), 32, 32, 3), dtype=np.uint8)) for s, v in y.items()}
    return x, y


def model(seed: int) -> Classifier:
    return Classifier("mobilenet_v2", 7, dropout=0.2, mean=[0.5] * 3, std=[0.25] * 3, gen=torch.Generator().manual_seed(seed))


def cells_of(seed: int, x, y) -> list[dict]:
    """A few cells of one seed: fine-tune at two fractions, linear and k-NN probes of the seed's encoder."""
    jobs = [j for j in plan(y["pool"], [0.5, 1.0], [], [seed])]
    cd = CellData(y=y, scored=["val", "test"], classes=CLASSES, x=x)
    out = []
    for j in jobs:
        cell, _, probas = finetune_cell(j, model(j.seed), cd, init="random", cfg=CFG, budget=BUDGET,
                                        select="balanced_accuracy")
        out.append((cell, probas["test"].tolist()))
    feats = {s: extract_features(model(seed).backbone, v) for s, v in x.items()}
    for j in jobs:
        for pr in ("linear", "knn"):
            cell, probas = probe_cell(j, feats, cd, init="random", protocol=pr, grid=GRID)
            out.append((cell, probas["test"].tolist()))
    return out


def test_cells_are_identical_sequential_or_on_concurrent_threads(data):
    """Every draw comes from generators seeded by the cell: two seeds on two threads, with process-wide random
    state disturbed in between, give exactly the cells of a sequential run."""
    x, y = data
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as concurrent stages on a CPU do (no oversubscription); same for both runs
    try:
        sequential = {s: cells_of(s, x, y) for s in (0, 1)}
        torch.manual_seed(999)
        np.random.seed(999)
        concurrent = {}
        workers = [threading.Thread(target=lambda s=s: concurrent.__setitem__(s, cells_of(s, x, y))) for s in (0, 1)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
    finally:
        torch.set_num_threads(threads)
    assert concurrent == sequential


@pytest.mark.parametrize("ema_window", [0.0, 1.0])  # 1.0: an average over the run's 15 steps
def test_resumed_finetune_equals_uninterrupted(data, ema_window):
    """Killed after epoch 1 and resumed from its state: the same best state, curves and metrics as 3 epochs in one go
    (with a weight average too: its state travels with the rest)."""
    x, y = data
    train = (x["pool"], torch.from_numpy(y["pool"]).long())
    cfg = NS(**{**vars(CFG), "ema_window": ema_window})
    args = (FitData(train=train, val=(x["val"], y["val"]), sub=train),
            FitSpec(cfg=cfg, epochs=3, select="balanced_accuracy", classes=CLASSES, seed=7, device=torch.device("cpu")))
    full = finetune(model(7), *args)

    saved = {}

    class Killed(Exception):
        pass

    def kill_after_first(epoch, row, state):
        saved["state"] = state()
        raise Killed

    with pytest.raises(Killed):
        finetune(model(7), *args, on_epoch=kill_after_first)
    resumed = finetune(model(7), *args, resume=saved["state"])
    assert resumed.curves == full.curves and resumed.best_epoch == full.best_epoch and resumed.val == full.val
    assert all(torch.equal(resumed.state[k], full.state[k]) for k in full.state)


def test_weight_average_is_what_finetune_scores_and_keeps(data):
    """finetune.ema_window: validation scores, and the state returned is, the moving average of the weights over the
    run (decay 1 - 1/(window x steps), every step averaged in), not the last step's weights."""
    x, y = data
    train = (x["pool"], torch.from_numpy(y["pool"]).long())
    seen = {}

    def last(epoch, row, state):
        seen["state"], seen["row"] = state(), row

    fit = finetune(model(3), FitData(train=train, val=(x["val"], y["val"]), sub=train),
                   FitSpec(cfg=NS(**{**vars(CFG), "ema_window": 0.5}), epochs=1, steps=MIN_WINDOW * 2,
                           select="balanced_accuracy", classes=CLASSES, seed=3, device=torch.device("cpu")),
                   on_epoch=last, quiet=True)
    raw, avg = seen["state"]["model"], seen["state"]["ema"]
    steps = MIN_WINDOW * 2
    assert int(avg["n_averaged"]) == steps and fit.ema_decay == pytest.approx(1 - 1 / (0.5 * steps))
    assert all(torch.equal(fit.state[k], avg[f"module.{k}"]) for k in fit.state)  # kept: the average
    assert not all(torch.equal(fit.state[k], raw[k]) for k in raw)  # not the last step's weights
    m = model(3)
    m.load_state_dict(fit.state)
    from medssl.core.engine import predict_proba
    from medssl.core.train import scores

    assert scores(y["val"], predict_proba(m, x["val"]), CLASSES)["balanced_accuracy"] == seen["row"]["val_balanced_accuracy"]
    assert ema_decay(MIN_WINDOW - 1) is None  # too few steps to average: the last step's weights


@pytest.mark.parametrize("n", [10, 70])
def test_fixed_steps_train_the_same_number_of_steps_at_any_subset_size(data, n):
    """With `steps`, a cell takes exactly that many optimizer steps (batches of the configured size) whether
    its subset holds 10 images or 70, with full batches, and evaluates `epochs` times."""
    x, y = data
    seen, taken = [], []
    m = model(0)
    forward = m.forward

    def counting(inp):
        seen.append(len(inp))
        return forward(inp)

    m.forward = counting
    train = (x["pool"][:n], torch.as_tensor(y["pool"][:n]).long())
    orig = torch.optim.AdamW.step

    def step(self, *a, **k):
        taken.append(1)
        return orig(self, *a, **k)

    torch.optim.AdamW.step = step
    try:
        fit = finetune(m, FitData(train=train, val=(x["val"], y["val"]), sub=train),
                       FitSpec(cfg=CFG, epochs=3, steps=12, select="balanced_accuracy", classes=CLASSES, seed=0,
                               device=torch.device("cpu")), quiet=True)
    finally:
        torch.optim.AdamW.step = orig
    assert len(taken) == 12 and len(fit.curves) == 3
    assert seen.count(min(CFG.batch_size, n)) >= 12  # every training batch full-sized (the rest: evaluation)


def test_pretraining_traces_a_curve_from_one_epoch_and_resumes_to_the_same_trace(data):
    """The loss by optimizer step: ~TRACE_POINTS windows per epoch (a one-epoch run is a curve, not a dot), their
    step counts and means consistent with the epoch means; killed after epoch 1 and resumed: the same trace."""
    from medssl.core.methods import METHODS
    from medssl.core.train import TRACE_POINTS, PretrainSpec, pretrain

    x, _ = data
    images = x["pool"]  # 70 images, batch 2: 35 steps per epoch
    cfg = NS(latent_dim=16, beta=1.0, lr=1e-3, weight_decay=0.0)
    spec = PretrainSpec(cfg=cfg, batch_size=2, epochs=2, aug=CFG.augment, seed=3, device=torch.device("cpu"))

    def method():
        return METHODS["vae"](cfg, "mobilenet_v2", 32, [0.5] * 3, [0.25] * 3, torch.Generator().manual_seed(3))

    full = pretrain(method(), images, spec)
    assert [r["epoch"] for r in full.curves] == [1, 2]
    for epoch, row in zip((1, 2), full.curves):
        pts = [t for t in full.trace if t["epoch"] == epoch]
        assert TRACE_POINTS // 2 <= len(pts) <= TRACE_POINTS and pts[-1]["step"] == 35 * epoch
        assert set(pts[0]) == {"step", *row}  # epoch, loss and the method's parts
        assert min(t["loss"] for t in pts) <= row["loss"] <= max(t["loss"] for t in pts)  # windows around the mean
    saved = {}

    class Killed(Exception):
        pass

    def kill_after_first(epoch, row, state):
        assert row["points"] == [t for t in full.trace if t["epoch"] == 1]
        saved["state"] = state()
        raise Killed

    with pytest.raises(Killed):
        pretrain(method(), images, spec, on_epoch=kill_after_first)
    resumed = pretrain(method(), images, spec, resume=saved["state"])
    assert resumed.trace == full.trace and resumed.curves == full.curves


def test_a_cells_train_val_gap_scores_a_fixed_part_of_its_subset_whatever_its_size(data, monkeypatch):
    """The gap curve scores max_eval (else finetune.train_eval_size) images of the cell's subset each evaluation,
    not the whole subset: at the full budget that was ~15.8 M extra forward passes."""
    from medssl.core import cells

    x, y = data
    seen = []

    class Seen(Exception):
        pass

    def fit(model, fd, spec, **kw):
        seen.append((len(fd.train[0]), len(fd.sub[0])))
        raise Seen

    monkeypatch.setattr(cells, "finetune", fit)
    cd = CellData(y=y, scored=["val", "test"], classes=CLASSES, x=x)
    job = plan(y["pool"], [1.0], [], [0])[0]
    unbounded = NS(epochs=1, steps=None, max_eval=None)
    for budget, cfg, n in ((BUDGET, CFG, 16), (unbounded, NS(**{**vars(CFG), "train_eval_size": 20}), 20)):
        with pytest.raises(Seen):
            finetune_cell(job, model(0), cd, init="random", cfg=cfg, budget=budget, select="balanced_accuracy")
        assert seen[-1] == (70, n), seen


def test_the_champion_trains_at_least_as_long_as_a_grid_cell():
    """A few hundred images at finetune.batch_size 128 make 2 steps per epoch: the demo's 2 epochs were 4 optimizer
    steps against its grid cells' 14, and a 300-image folder shipped a champion that called nearly every image one
    class. Its epochs are raised to a grid cell's steps on the whole pool; DermaMNIST's stay the budgets'."""
    from medssl.config import load_params
    from medssl.core.train import champion_epochs, epoch_steps

    for budget in ("demo", "cpu"):
        b = load_params("params.yaml", {"budget": budget}, tuned=False).run_budget
        assert champion_epochs(b, 128, 7007) == b.finetune_epochs  # 2 and 15: the reference runs' schedule
        cell = b.grid.steps or b.grid.epochs * epoch_steps(min(210, b.grid.max_train or 210), b.grid.batch_size)
        assert b.finetune_epochs * epoch_steps(210, 128) < cell  # the old schedule: fewer steps than a cell
        epochs = champion_epochs(b, 128, 210)
        assert epochs * epoch_steps(210, 128) >= cell > (epochs - 1) * epoch_steps(210, 128)
    assert epoch_steps(210, 128) == 2 and epoch_steps(129, 128) == 1 and epoch_steps(60, 128) == 1
