"""Confidence intervals: every resampled statistic equals scikit-learn's on the resampled images, and the
intervals agree with a plain stratified bootstrap loop written with numpy."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from scipy.stats import binomtest
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
)

from densenet_se import bootstrap
from densenet_se.assessment import Outputs, Settings, assess, compute_metrics
from densenet_se.errors import UserError
from helpers.config import ROOT


def scored(n: int, k: int, seed: int, decimals: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities [n, k] summing to 1 with many ties, labels [n]) of a mediocre classifier."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, k, n)
    logits = rng.normal(size=(n, k))
    logits[np.arange(n), labels] += 1.2
    probs = np.round(np.exp(logits) / np.exp(logits).sum(1, keepdims=True), decimals)
    probs[:, -1] = 1.0 - probs[:, :-1].sum(1)  # rounded, so scores tie, and still a distribution
    return probs, labels


@pytest.mark.parametrize("k", [2, 3])
def test_each_resampled_statistic_equals_sklearn_on_the_resampled_images(k):
    probs, labels = scored(120, k, seed=k)
    preds = probs.argmax(1)
    rng = np.random.default_rng(7)
    draws = [rng.integers(0, len(labels), len(labels)) for _ in range(25)]
    counts = np.stack([np.bincount(d, minlength=len(labels)) for d in draws]).astype(np.float64)
    positive = 0 if k == 2 else None
    stats = bootstrap.resampled_statistics(counts, probs, labels, preds, positive)
    for b, d in enumerate(draws):
        y, p, yhat = labels[d], probs[d], preds[d]
        assert stats["acc"][b] == pytest.approx(accuracy_score(y, yhat), abs=1e-12)
        assert stats["balanced_acc"][b] == pytest.approx(balanced_accuracy_score(y, yhat), abs=1e-12)
        assert stats["f1"][b] == pytest.approx(f1_score(y, yhat, average="macro"), abs=1e-12)
        expected_auc = roc_auc_score(y, p[:, 1]) if k == 2 else roc_auc_score(y, p, multi_class="ovr")
        assert stats["auroc"][b] == pytest.approx(expected_auc, abs=1e-12)
        if k == 2:  # class 0 is positive
            assert stats["sensitivity"][b] == pytest.approx(recall_score(y, yhat, pos_label=0), abs=1e-12)
            assert stats["specificity"][b] == pytest.approx(recall_score(y, yhat, pos_label=1), abs=1e-12)
            assert stats["ppv"][b] == pytest.approx(precision_score(y, yhat, pos_label=0), abs=1e-12)
            assert stats["npv"][b] == pytest.approx(precision_score(y, yhat, pos_label=1), abs=1e-12)


def test_point_estimates_of_torchmetrics_equal_sklearn():
    probs, labels = scored(150, 3, seed=11)
    m = compute_metrics(torch.tensor(probs), torch.tensor(labels), ["a", "b", "c"], None)
    preds = probs.argmax(1)
    assert m["acc"] == pytest.approx(accuracy_score(labels, preds), abs=1e-6)
    assert m["balanced_acc"] == pytest.approx(balanced_accuracy_score(labels, preds), abs=1e-6)
    assert m["f1"] == pytest.approx(f1_score(labels, preds, average="macro"), abs=1e-6)
    assert m["auroc"] == pytest.approx(roc_auc_score(labels, probs, multi_class="ovr"), abs=1e-6)
    for c, name in enumerate("abc"):
        assert m[f"auroc_{name}"] == pytest.approx(roc_auc_score(labels == c, probs[:, c]), abs=1e-6)


def reference_intervals(probs, labels, preds, n, level, seed):
    """A plain stratified percentile bootstrap loop with the textbook definitions, in numpy (class 0 positive)."""
    rng = np.random.default_rng(seed)
    members = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    values = {"acc": [], "f1": [], "auroc": [], "sensitivity": [], "npv": []}
    for _ in range(n):
        d = np.concatenate([rng.choice(m, size=len(m), replace=True) for m in members])
        y, yhat, score = labels[d], preds[d], probs[d, 0]
        tp = [np.sum((y == c) & (yhat == c)) for c in (0, 1)]
        fp = [np.sum((y != c) & (yhat == c)) for c in (0, 1)]
        fn = [np.sum((y == c) & (yhat != c)) for c in (0, 1)]
        values["acc"].append(np.mean(y == yhat))
        values["f1"].append(np.mean([2 * tp[c] / (2 * tp[c] + fp[c] + fn[c]) for c in (0, 1)]))
        pos, neg = score[y == 0], score[y == 1]  # P(score of a positive > score of a negative), ties half
        values["auroc"].append(np.mean((pos[:, None] > neg) + 0.5 * (pos[:, None] == neg)))
        values["sensitivity"].append(tp[0] / (tp[0] + fn[0]))
        values["npv"].append(tp[1] / (tp[1] + fp[1]) if tp[1] + fp[1] else np.nan)
    tail = 100 * (1 - level) / 2
    return {k: np.nanpercentile(v, [tail, 100 - tail]) for k, v in values.items()}


def test_intervals_agree_with_a_plain_bootstrap_loop():
    probs, labels = scored(300, 2, seed=3)
    preds = probs.argmax(1)
    ours = bootstrap.bootstrap_intervals(probs, labels, preds, 2000, seed=0, level=0.95, positive=0)
    reference = reference_intervals(probs, labels, preds, 2000, 0.95, seed=1)
    for name, (low, high) in reference.items():
        # Two independent Monte Carlo runs: their percentiles differ by ~0.002 (standard error) here.
        assert ours[name] == pytest.approx([low, high], abs=0.012), name
        assert ours[name][0] < ours[name][1]
    # The interval brackets the point estimate, and a wider level gives a wider interval.
    assert ours["acc"][0] <= np.mean(labels == preds) <= ours["acc"][1]
    wide = bootstrap.bootstrap_intervals(probs, labels, preds, 2000, seed=0, level=0.99, positive=0)
    assert wide["acc"][0] < ours["acc"][0] and wide["acc"][1] > ours["acc"][1]


def test_same_seed_same_intervals_and_classes_keep_their_counts():
    probs, labels = scored(90, 3, seed=5)
    preds = probs.argmax(1)
    first = bootstrap.bootstrap_intervals(probs, labels, preds, 300, seed=4, level=0.9)
    assert bootstrap.bootstrap_intervals(probs, labels, preds, 300, seed=4, level=0.9) == first
    assert bootstrap.bootstrap_intervals(probs, labels, preds, 300, seed=5, level=0.9) != first
    shuffled = np.random.default_rng(0).permutation(len(labels))
    for block in bootstrap.stratified_counts(labels[shuffled], 250, seed=1, chunk=100):
        assert block.shape[1] == len(labels)
        for c in range(3):
            # Stratified: every resample holds exactly as many images of each class as the split.
            assert (block[:, labels[shuffled] == c].sum(1) == (labels == c).sum()).all()


def test_percentile_interval_is_numpys_percentile():
    values = np.random.default_rng(2).normal(size=1001)
    low, high = bootstrap.percentile_interval(values, 0.9)
    assert [low, high] == pytest.approx(np.percentile(values, [5, 95]), abs=1e-12)


@pytest.mark.parametrize(
    ("n", "level", "message"),
    [
        (-1, 0.95, "bootstrap.n=-1 is out of range"),
        (10**6, 0.95, "bootstrap.n=1000000 is out of range"),
        (100, 1.0, "bootstrap.level=1 is out of range; it must be in (0, 1)"),
        (100, 0.0, "bootstrap.level=0 is out of range"),
    ],
)
def test_bad_bootstrap_settings_are_one_sentence(n, level, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        bootstrap.check_settings(n, level)


def test_bootstrap_speed_benchmark_prints_its_table(capsys):
    spec = importlib.util.spec_from_file_location(
        "bootstrap_speed", ROOT / "benchmarks" / "bootstrap_speed.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(["--images", "300", "--resamples", "50", "--repeats", "2", "--baseline-resamples", "3"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("50 resamples of 300 images, 2 classes")
    ours = next(line for line in lines if line.startswith("vectorised"))
    assert float(ours.split()[-2]) > 0 and float(lines[-2].split(":")[1].rstrip("x")) > 0
    assert lines[-1].startswith("target <= 5 s: ")


@pytest.mark.parametrize(
    ("successes", "trials", "level"), [(70, 70, 0.95), (0, 12, 0.95), (69, 70, 0.9), (5, 9, 0.99)]
)
def test_wilson_interval_equals_scipys(successes, trials, level):
    expected = binomtest(successes, trials).proportion_ci(confidence_level=level, method="wilson")
    assert bootstrap.wilson_interval(successes, trials, level) == pytest.approx([expected.low, expected.high])


def test_a_proportion_without_errors_gets_a_wilson_interval_not_a_zero_width_one():
    # 40 negatives all right, 2 of 40 positives missed: specificity 1 and PPV 1 exactly.
    labels = torch.tensor([0] * 40 + [1] * 40)
    p0 = torch.cat([torch.linspace(0.6, 0.99, 38), torch.tensor([0.3, 0.4]), torch.linspace(0.01, 0.45, 40)])
    logits = torch.stack([p0, 1 - p0], 1).log()[None]
    result = assess(
        Outputs("test", logits, labels, [f"{i}.png" for i in range(80)]), Settings(["pos", "neg"])
    )
    m = result.metrics
    assert m["specificity"] == 1.0 and m["ppv"] == 1.0
    expected = binomtest(40, 40).proportion_ci(confidence_level=0.95, method="wilson")
    assert m["specificity_ci"] == pytest.approx([expected.low, 1.0]) and m["specificity_ci"][0] < 0.95
    expected = binomtest(38, 38).proportion_ci(confidence_level=0.95, method="wilson")  # 38 called positive
    assert m["ppv_ci"] == pytest.approx([expected.low, 1.0])
    assert m["ci_method"] == {"specificity": "wilson", "ppv": "wilson"}
    low, high = m["sensitivity_ci"]  # 38 of 40: the bootstrap varies, and is kept
    assert low < 0.95 < high < 1.0 + 1e-12


def test_a_model_that_calls_everything_one_class_gets_no_false_certainty():
    # Three classes of 4, 5 and 3 images, every image called "a": each class is entirely right or wrong,
    # so every stratified resample gives accuracy 4/12. The bootstrap alone would print [0.333, 0.333].
    labels = torch.tensor([0] * 4 + [1] * 5 + [2] * 3)
    logits = torch.tensor([[2.0, 0.0, 0.0]]).repeat(12, 1)[None]
    result = assess(Outputs("test", logits, labels, [f"{i}.png" for i in range(12)]), Settings(list("abc")))
    m = result.metrics
    expected = binomtest(4, 12).proportion_ci(confidence_level=0.95, method="wilson")
    assert m["acc"] == pytest.approx(4 / 12) and m["acc_ci"] == pytest.approx([expected.low, expected.high])
    assert m["ci_method"]["acc"] == "wilson"
    # Balanced accuracy and F1 are not one proportion: no interval, and the reason, instead of a fake one.
    for name in ("balanced_acc", "f1"):
        assert m[f"{name}_ci"] is None and m["ci_method"][name].startswith("none")
