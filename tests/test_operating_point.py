"""Operating points: ROC points and AUROC against scikit-learn, targets met on the split they are chosen on,
bad decision keys as one sentence; TTA leaves a flip-invariant image unchanged."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sklearn.metrics import (
    average_precision_score,
    precision_recall_curve,
    recall_score,
    roc_auc_score,
    roc_curve,
)

from densenet_se import operating_point as op
from densenet_se.errors import UserError
from densenet_se.inference import combine, view_logits
from densenet_se.module import Classifier


def two_class(n: int = 200, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(probabilities [n, 2] with ties, labels [n]); class 0 is the positive class."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    p0 = np.clip(np.round(rng.normal(0.65 - 0.3 * labels, 0.2), 2), 0, 1)
    return torch.tensor(np.stack([p0, 1 - p0], 1), dtype=torch.float32), torch.tensor(labels)


def test_roc_points_average_precision_and_auroc_equal_sklearn():
    probs, labels = two_class()
    (curve,) = op.curves(probs, labels, [0])
    y, score = (labels == 0).numpy(), probs[:, 0].double().numpy()
    fpr, tpr, _ = roc_curve(y, score, drop_intermediate=False)
    assert curve["fpr"] == pytest.approx(fpr.tolist(), abs=1e-6)
    assert curve["tpr"] == pytest.approx(tpr.tolist(), abs=1e-6)
    precision, recall, _ = precision_recall_curve(y, score)
    ours = np.array(sorted(zip(curve["recall"], curve["precision"], strict=True)))
    np.testing.assert_allclose(ours, np.array(sorted(zip(recall, precision, strict=True))), atol=1e-6)
    assert curve["ap"] == pytest.approx(average_precision_score(y, score), abs=1e-6)
    area = np.trapezoid(curve["tpr"], curve["fpr"])
    assert area == pytest.approx(roc_auc_score(y, score), abs=1e-6)


@pytest.mark.parametrize("target", [0.5, 0.8, 0.93, 1.0])
def test_target_sensitivity_is_met_with_the_best_specificity(target):
    probs, labels = two_class(seed=1)
    t = op.choose_threshold(probs, labels, 0, "target_sensitivity", target)
    y, score = (labels == 0).numpy(), probs[:, 0].numpy()
    called = score >= t
    assert recall_score(y, called) >= target
    # No threshold reaching the target has a better specificity (brute force over every score).
    fpr, tpr, _ = roc_curve(y, score, drop_intermediate=False)
    assert 1 - np.mean(called[~y]) == pytest.approx(1 - fpr[tpr >= target].min())


@pytest.mark.parametrize("target", [0.6, 0.9, 1.0])
def test_target_specificity_is_met_with_the_best_sensitivity(target):
    probs, labels = two_class(seed=2)
    t = op.choose_threshold(probs, labels, 0, "target_specificity", target)
    y, score = (labels == 0).numpy(), probs[:, 0].numpy()
    called = score >= t
    assert recall_score(~y, ~called) >= target
    fpr, tpr, _ = roc_curve(y, score, drop_intermediate=False)
    assert recall_score(y, called) == pytest.approx(tpr[1 - fpr >= target].max())


def test_decisions_follow_the_threshold_on_the_positive_class():
    probs = torch.tensor([[0.3, 0.7], [0.31, 0.69], [0.9, 0.1]])
    assert op.decide(probs, 0.31, 0).tolist() == [1, 0, 0]
    assert op.decide(probs, 0.69, 1).tolist() == [1, 1, 0]
    assert op.decide(probs, None, 0).tolist() == [1, 1, 0]


def test_target_that_no_threshold_meets_is_one_sentence():
    probs = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.2, 0.8]])  # a negative at probability 1.0
    labels = torch.tensor([0, 1, 1])
    with pytest.raises(
        UserError, match=r"target_specificity=1 cannot be met on the val split .* lower target"
    ):
        op.choose_threshold(probs, labels, 0, "target_specificity", 1.0)
    with pytest.raises(UserError, match="the val split has no negative images"):
        op.choose_threshold(probs, torch.tensor([0, 0, 0]), 0, "target_sensitivity", 0.9)


@pytest.mark.parametrize(
    ("values", "names", "message"),
    [
        (
            {"threshold": 1.5},
            ["a", "b"],
            r"threshold=1.5 is out of range; it must be a probability in \[0, 1\]",
        ),
        ({"threshold": -0.1}, ["a", "b"], "threshold=-0.1 is out of range"),
        (
            {"target_sensitivity": 0.0},
            ["a", "b"],
            r"target_sensitivity=0 is out of range; it must be in \(0, 1\]",
        ),
        ({"target_specificity": 1.2}, ["a", "b"], "target_specificity=1.2 is out of range"),
        ({"threshold": 0.5}, ["a", "b", "c"], "threshold needs two classes, but the checkpoint predicts 3"),
        ({"target_sensitivity": 0.9}, list("abcd"), "target_sensitivity needs two classes"),
        (
            {"threshold": 0.5, "target_sensitivity": 0.9},
            ["a", "b"],
            "threshold and target_sensitivity are both",
        ),
    ],
)
def test_bad_decision_keys_are_one_sentence(values, names, message):
    with pytest.raises(UserError, match=message):
        op.check_decision(values, names)


def test_operating_point_file_must_match_classes_tta_and_temperature(tmp_path):
    point = {"threshold": 0.3, "positive_class": "a", "tta": "flip", "temperature": 1.5}
    path = tmp_path / "eval.json"
    path.write_text(json.dumps({"class_names": ["a", "b"], "operating_point": point}))
    loaded = op.load_operating_point(path, ["a", "b"], "flip", 1.5)
    assert loaded["threshold"] == 0.3 and loaded["positive"] == 0
    with pytest.raises(
        UserError, match=r"was chosen on probabilities with tta=flip and temperature 1.5.*pass tta=flip"
    ):
        op.load_operating_point(path, ["a", "b"], "none", 1.0)
    with pytest.raises(UserError, match=r"is for classes \[\"a\", \"b\"\] but the checkpoint predicts"):
        op.load_operating_point(path, ["x", "y"], "flip", 1.5)
    path.write_text(json.dumps({"class_names": ["a", "b"], "operating_point": None}))
    with pytest.raises(UserError, match="holds no operating point"):
        op.load_operating_point(path, ["a", "b"], "flip", 1.5)
    path.write_text(json.dumps({"class_names": ["a", "b"], "operating_point": {**point, "threshold": 7}}))
    with pytest.raises(UserError, match=r"has no valid threshold in \[0, 1\]"):
        op.load_operating_point(path, ["a", "b"], "flip", 1.5)


def test_tta_on_a_flip_invariant_image_changes_nothing():
    torch.manual_seed(0)
    module = Classifier(
        3, image_size=32, model={"growth_rate": 4, "block_config": [1, 1], "num_init_features": 8}
    ).eval()
    half = torch.randint(0, 256, (4, 3, 32, 16), dtype=torch.uint8)
    mirrored = torch.cat([half, half.flip(3)], dim=3)  # left-right symmetric
    symmetric = torch.cat([mirrored[:, :, :16], mirrored[:, :, :16].flip(2)], dim=2)  # and top-bottom
    hp = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "num_classes": 3}
    plain = view_logits(module, symmetric, hp, 2, torch.device("cpu"), "none")
    for tta, views in (("flip", 2), ("flip4", 4)):
        logits = view_logits(module, symmetric, hp, 2, torch.device("cpu"), tta)
        assert logits.shape == (views, 4, 3)
        assert torch.equal(combine(logits).probs, combine(plain).probs)
        assert torch.equal(combine(logits).uncertainty, torch.zeros(4))
    # On an image that is not symmetric the views disagree, and the spread is their standard deviation.
    logits = view_logits(module, mirrored[:, :, :, :24].contiguous(), hp, 4, torch.device("cpu"), "flip4")
    out = combine(logits)
    per_view = logits.softmax(2).numpy()
    predicted = out.probs.argmax(1).numpy()
    expected = per_view[:, np.arange(4), predicted].std(axis=0)
    assert out.uncertainty.numpy() == pytest.approx(expected, abs=1e-6) and expected.max() > 0
    assert out.probs.numpy() == pytest.approx(per_view.mean(0), abs=1e-6)
