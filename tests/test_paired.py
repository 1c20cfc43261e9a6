"""Paired bootstrap on known cases: weighted metrics agree with scikit-learn, a fixed difference is found,
equal models get an interval that covers zero, Holm's adjustment matches a hand computation."""
import numpy as np
import pytest
from sklearn.metrics import accuracy_score, balanced_accuracy_score, roc_auc_score

from medssl.core.paired import Bootstrap, holm, paired_difference, stratified_counts, weighted_accuracy, weighted_auc, \
    weighted_auc_macro, weighted_balanced_accuracy
from medssl.metrics import classification_metrics

RNG = np.random.default_rng(0)
Y = np.repeat(np.arange(4), [120, 60, 30, 30])  # imbalanced, as the test split


def probas_with_accuracy(y: np.ndarray, correct: np.ndarray, rng) -> np.ndarray:
    """(N, C) probabilities whose argmax is y where `correct`, another class elsewhere; noisy scores."""
    n, c = len(y), y.max() + 1
    p = rng.random((n, c))
    wrong = (y + 1 + rng.integers(0, c - 1, n)) % c
    target = np.where(correct, y, wrong)
    p[np.arange(n), target] += 1.5
    return p / p.sum(1, keepdims=True)


def test_stratified_counts_keep_class_sizes():
    w = stratified_counts(Y, 50, seed=1)
    for c, n in zip(range(4), [120, 60, 30, 30]):
        assert (w[:, Y == c].sum(1) == n).all()
    assert (w == stratified_counts(Y, 50, seed=1)).all() and not (w == stratified_counts(Y, 50, seed=2)).all()


def test_weighted_metrics_match_scikit_learn_with_sample_weights():
    proba = probas_with_accuracy(Y, RNG.random(len(Y)) < 0.7, RNG)
    tied = proba.copy()
    tied[:40, 0] = tied[40:80, 0]  # ties in class 0's scores
    w = stratified_counts(Y, 5, seed=3)
    for row in w:
        assert weighted_accuracy(row[None], Y, proba)[0] == pytest.approx(accuracy_score(Y, proba.argmax(1), sample_weight=row))
        assert weighted_balanced_accuracy(row[None], Y, proba)[0] == pytest.approx(
            balanced_accuracy_score(Y, proba.argmax(1), sample_weight=row))
        for c in range(4):
            assert weighted_auc(row[None], Y == c, tied[:, c])[0] == pytest.approx(
                roc_auc_score(Y == c, tied[:, c], sample_weight=row))
    ones = np.ones((1, len(Y)))
    assert weighted_auc_macro(ones, Y, proba)[0] == pytest.approx(roc_auc_score(Y, proba, multi_class="ovr", average="macro"))


def test_macro_auc_with_an_absent_class_is_the_reports():
    """A test split without one of the model's classes: the bootstrap's macro AUC on the full split is the one the
    report shows (classification_metrics: scores renormalised over the classes present), not the raw columns'."""
    y = Y[Y != 2]  # class 2 of 4 absent
    proba = probas_with_accuracy(y, RNG.random(len(y)) < 0.6, RNG)
    proba[:, 2] = RNG.random(len(y)) * 3  # mass on the absent class, unrelated to the label: it reorders the rest
    proba /= proba.sum(1, keepdims=True)
    ones = np.ones((1, len(y)))
    shown = classification_metrics(y, proba)["auc_macro"]
    raw = np.mean([roc_auc_score(y == c, proba[:, c]) for c in (0, 1, 3)])
    assert abs(shown - raw) > 1e-3  # the two definitions differ on this case
    assert weighted_auc_macro(ones, y, proba)[0] == pytest.approx(shown)
    assert Bootstrap(y, n_boot=50).replicates(proba[None])["auc_macro"][0][0] == pytest.approx(shown)


def test_binary_macro_auc_is_the_reports():
    """Two classes: the bootstrap's macro AUC is the positive column's AUC, as the report's. A saturated float32
    softmax ties many positives at 1.0 while the other column keeps them apart, so averaging both columns differs."""
    from test_metrics import saturated

    y = np.repeat([0, 1], [300, 100])
    p = saturated(y, 2, 1).numpy()
    shown = classification_metrics(y, p.astype(np.float64))["auc_macro"]
    assert shown == pytest.approx(roc_auc_score(y, p[:, 1]), abs=1e-12)
    assert abs(shown - np.mean([roc_auc_score(y == c, p[:, c]) for c in (0, 1)])) > 1e-4  # the two definitions differ
    assert weighted_auc_macro(np.ones((1, len(y))), y, p)[0] == pytest.approx(shown, abs=1e-9)
    assert Bootstrap(y, n_boot=50).replicates(p[None])["auc_macro"][0][0] == pytest.approx(shown, abs=1e-9)


def test_a_fixed_difference_is_found():
    """Model a is right on every image b is right on, plus 12 % more in every class, in every seed."""
    boot = Bootstrap(Y, n_boot=1000, seed=0)
    a, b = [], []
    for seed in range(3):
        rng = np.random.default_rng(seed)
        u = rng.random(len(Y))
        b.append(probas_with_accuracy(Y, u < 0.6, rng))
        a.append(probas_with_accuracy(Y, u < 0.72, rng))
    d = paired_difference(boot.replicates(np.stack(a)), boot.replicates(np.stack(b)), "balanced_accuracy")
    assert d["diff"] == pytest.approx(0.12, abs=0.04)
    assert 0 < d["lo"] < d["diff"] < d["hi"] and d["p"] < 0.01
    back = paired_difference(boot.replicates(np.stack(b)), boot.replicates(np.stack(a)), "balanced_accuracy")
    assert back["diff"] == pytest.approx(-d["diff"]) and back["hi"] < 0


def test_equal_models_get_an_interval_covering_zero():
    """Two inits of the same quality (independent errors at the same rate): no difference is claimed."""
    boot = Bootstrap(Y, n_boot=1000, seed=0)
    rng = np.random.default_rng(7)
    a = np.stack([probas_with_accuracy(Y, rng.random(len(Y)) < 0.65, rng) for _ in range(3)])
    b = np.stack([probas_with_accuracy(Y, rng.random(len(Y)) < 0.65, rng) for _ in range(3)])
    for metric in ("balanced_accuracy", "auc_macro"):
        d = paired_difference(boot.replicates(a), boot.replicates(b), metric)
        assert d["lo"] < 0 < d["hi"] and d["p"] > 0.05, (metric, d)
    same = paired_difference(boot.replicates(a), boot.replicates(a), "auc_macro")
    assert same["diff"] == same["lo"] == same["hi"] == 0 and same["p"] == 1


def test_unpaired_inputs_are_refused():
    boot = Bootstrap(Y, n_boot=100, seed=0)
    a = np.stack([probas_with_accuracy(Y, RNG.random(len(Y)) < 0.6, RNG) for _ in range(3)])
    with pytest.raises(ValueError, match="unpaired"):
        paired_difference(boot.replicates(a), boot.replicates(a[:2]), "balanced_accuracy")


def test_holm_matches_a_hand_computation():
    # sorted 0.005, 0.01, 0.03, 0.04 -> x4, x3, x2, x1 = 0.02, 0.03, 0.06, 0.04 -> running max 0.02, 0.03, 0.06, 0.06
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0]) and len(holm([])) == 0


def _row(init, fraction, diff, decision, protocol="finetune", ref="imagenet"):
    return {"split": "test", "protocol": protocol, "regime": "fractions", "fraction": fraction, "init": init,
            "reference": ref, "metric": "balanced_accuracy", "diff": diff, "lo": diff - 0.03, "hi": diff + 0.03,
            "p": 0.001, "p_holm": 0.01 if decision != "no difference" else 0.5, "family_size": 6, "decision": decision}


def design(fractions, budget, n_test, training):
    """The comparison of these tests: fine-tune cells, two baselines, two SSL inits, three seeds."""
    from medssl.compare import Design

    return Design(protocols=["finetune"], baselines=["random", "imagenet"], ssl=["vae", "simclr"], fractions=fractions,
                  budget=budget, n_test=n_test, n_seeds=3, training=training)


def test_verdict_answers_per_label_budget():
    from dataclasses import replace

    from medssl.compare import verdict

    rows = [_row("simclr", 0.01, 0.06, "better"), _row("vae", 0.01, 0.01, "no difference"),
            _row("simclr", 0.1, 0.04, "better"), _row("vae", 0.1, 0.0, "no difference"),
            _row("simclr", 1.0, -0.05, "worse"), _row("vae", 1.0, -0.08, "worse")]
    text = verdict(rows, design([0.01, 0.1, 1.0], "full", 2005, "30 epochs of batch 128"))
    assert "at 1–10 % labels, **SimCLR beats ImageNet** (+0.060 [+0.030, +0.090] at 1 %; +0.040 [+0.010, +0.070] at 10 %)" in text
    assert "at 100 % labels, **ImageNet leads every self-supervised init** (closest: SimCLR -0.050" in text
    assert "The VAE never beats ImageNet." in text and "too small to decide" not in text
    assert text.endswith("one pretraining run, shared by the 3 seeds: the intervals leave out the pretraining's own variance.")
    per_seed = verdict(rows, replace(design([0.01, 0.1, 1.0], "cpu", 2005, "96 steps"), pretrain_per_seed=True))
    assert per_seed.endswith("pretrained once per seed (3 runs): the intervals include the pretraining's own variance.")


def test_verdict_says_when_the_budget_cannot_decide():
    from medssl.compare import verdict

    rows = [_row(i, f, 0.01, "no difference") for i in ("vae", "simclr") for f in (0.1, 1.0)]
    text = verdict(rows, design([0.1, 1.0], "demo", 200, "2 epochs of batch 32"))
    assert text.startswith("**The `demo` budget is too small to decide**") and "200 test images, 3 seeds" in text
    assert "fine-tune cells of 2 epochs of batch 32" in text and "make answer" in text
    assert "at 10–100 % labels, no self-supervised init beats ImageNet at this budget" in text


def test_story_counts_the_cells_the_verdict_decides():
    """The one line repeated by the report, the parent run, the registry and the Prefect log agrees with the
    verdict: cells an SSL init wins, cells the reference leads or ties at the top, open cells; "too small to
    decide" exactly when the verdict says it."""
    from medssl.compare import decided, story, verdict

    rows = [_row("simclr", 0.01, 0.06, "better"), _row("vae", 0.01, 0.01, "no difference"),
            _row("simclr", 0.1, 0.0, "no difference"), _row("vae", 0.1, -0.04, "worse"),
            _row("simclr", 1.0, 0.01, "no difference"), _row("vae", 1.0, 0.0, "no difference")]
    d = decided(rows, ["finetune"], ["random", "imagenet"], ["vae", "simclr"])
    assert (d["ssl"], d["reference"], d["open"], d["cells"]) == (1, 1, 1, 3)
    line = story("cpu", d)
    assert "a self-supervised init beats ImageNet in 1 of 3" in line and "leads or ties at the top in 1, 1 undecided" in line
    none = [_row(i, f, 0.01, "no difference") for i in ("vae", "simclr") for f in (0.1, 1.0)]
    d = decided(none, ["finetune"], ["random", "imagenet"], ["vae", "simclr"])
    assert d["open"] == 2 and "too small to decide" in story("demo", d) and "not an answer" in story("demo", d)
    for rs, fs in ((rows, [0.01, 0.1, 1.0]), (none, [0.1, 1.0])):
        said = "too small to decide" in verdict(rs, design(fs, "cpu", 2005, "96 steps"))
        assert said == ("too small to decide" in story("cpu", decided(rs, ["finetune"], ["random", "imagenet"], ["vae", "simclr"])))


def test_verdict_says_when_the_data_cannot_separate_the_inits():
    """Open cells where the reference and every SSL init score at the ceiling say so instead of asking for a
    larger budget, per protocol; the story agrees; a verdict with open cells below the ceiling still calls the
    budget too small; a significant difference at the ceiling is reported as one."""
    from dataclasses import replace

    from medssl.compare import CEILING, at_ceiling, decided, story, verdict

    both, inits = ["finetune", "linear"], ["random", "imagenet"]
    rows = [_row(i, f, 0.0, "no difference", pr) for i in ("vae", "simclr") for f in (0.1, 1.0) for pr in both]
    means = {(pr, i, f): 1.0 for pr in both for i in ("imagenet", "vae", "simclr") for f in (0.1, 1.0)}
    means[("finetune", "random", 0.1)] = 0.5  # the random init is not compared in the verdict
    ceiling = at_ceiling(means, both, inits, ["vae", "simclr"], [0.1, 1.0])
    assert ceiling == {(pr, f) for pr in both for f in (0.1, 1.0)}
    plan = replace(design([0.1, 1.0], "cpu", 600, "96 steps"), protocols=both)
    text = verdict(rows, replace(plan, ceiling=ceiling))
    assert text.startswith("**This data cannot tell the self-supervised inits from ImageNet**") and "too small" not in text
    assert text.count("at 10–100 % labels, ImageNet and every self-supervised init are at the ceiling") == 2
    assert "budget: full" not in text
    d = decided(rows, both, inits, ["vae", "simclr"], ceiling)
    assert (d["open"], d["ceiling"]) == (0, 4) and "cannot show" in story("cpu", d) and "too small" not in story("cpu", d)

    means[("linear", "simclr", 0.1)] = CEILING - 0.01  # one compared init below the ceiling, linear probe at 10 %
    ceiling = at_ceiling(means, both, inits, ["vae", "simclr"], [0.1, 1.0])
    assert ceiling == {("finetune", 0.1), ("finetune", 1.0), ("linear", 1.0)}
    text = verdict(rows, replace(plan, ceiling=ceiling))
    assert text.startswith("**The `cpu` budget is too small to decide**")
    assert "**Fine-tune:** at 10–100 % labels, ImageNet and every self-supervised init are at the ceiling" in text
    assert "at 10 % labels, no self-supervised init beats ImageNet at this budget" in text
    assert "at 100 % labels, ImageNet and every self-supervised init are at the ceiling" in text
    d = decided(rows, both, inits, ["vae", "simclr"], ceiling)
    assert (d["open"], d["ceiling"]) == (1, 3) and "too small to decide" in story("cpu", d)

    rows[0] = _row("vae", 0.1, -0.004, "worse", "finetune")  # significant, though at the ceiling
    assert rows[0]["fraction"] == 0.1 and ("finetune", 0.1) in ceiling
    text = verdict(rows, replace(plan, ceiling=ceiling))
    assert "too small" not in text and "at 10 % labels, no self-supervised init beats ImageNet" in text
    assert "the VAE trails it" in text
    d = decided(rows, both, inits, ["vae", "simclr"], ceiling)
    assert (d["reference"], d["open"], d["ceiling"]) == (1, 1, 2) and "2 at the ceiling" in story("cpu", d)


def test_one_models_interval_covers_its_score_and_narrows_with_more_images():
    """A model right on 70 % of the images: each metric's interval holds its full-split value, the interval of 4x the
    images (the same accuracy) is about half as wide, and one that is always right gets [1, 1]."""
    rng = np.random.default_rng(5)  # its own draws, whatever ran before it
    proba = probas_with_accuracy(Y, rng.random(len(Y)) < 0.7, rng)
    ci = Bootstrap(Y, n_boot=1000, seed=0).interval(proba)
    ones = np.ones((1, len(Y)))
    for metric, fn in (("accuracy", weighted_accuracy), ("balanced_accuracy", weighted_balanced_accuracy),
                       ("auc_macro", weighted_auc_macro)):
        lo, hi = ci[metric]
        assert lo < fn(ones, Y, proba)[0] < hi, metric
    y4 = np.repeat(np.arange(4), [480, 240, 120, 120])
    ci4 = Bootstrap(y4, n_boot=1000, seed=0).interval(probas_with_accuracy(y4, rng.random(len(y4)) < 0.7, rng))
    width, width4 = (np.diff(c["balanced_accuracy"])[0] for c in (ci, ci4))
    assert 0.3 < width4 / width < 0.7, (width, width4)  # 1/sqrt(4), give or take the draws
    perfect = probas_with_accuracy(Y, np.ones(len(Y), bool), rng)
    assert Bootstrap(Y, n_boot=200, seed=0).interval(perfect)["balanced_accuracy"] == (1.0, 1.0)
