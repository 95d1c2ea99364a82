"""Calibration: ECE/NLL/Brier against numpy and scikit-learn, temperature scaling against scipy's optimiser,
and calibration.json read as untrusted input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy.optimize import minimize_scalar
from scipy.special import logsumexp, softmax
from sklearn.metrics import brier_score_loss, log_loss

from densenet_se import calibration
from densenet_se.errors import UserError
from densenet_se.inference import combine


def overconfident(n: int = 600, k: int = 3, scale: float = 4.0, seed: int = 0):
    """(logits [1, n, k] of a model `scale` times too confident, labels drawn from the honest probabilities)."""
    rng = np.random.default_rng(seed)
    honest = rng.normal(size=(n, k)) * 1.5
    labels = np.array([rng.choice(k, p=p) for p in softmax(honest, axis=1)])
    return torch.tensor(scale * honest, dtype=torch.float32)[None], torch.tensor(labels)


def numpy_ece(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """Top-label expected calibration error with equal-width bins (lo, hi], the textbook definition."""
    confidence, correct = probs.max(1), probs.argmax(1) == labels
    edges = np.linspace(0, 1, bins + 1)
    total = 0.0
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        inside = (confidence > lo) & (confidence <= hi)
        if inside.any():
            total += inside.mean() * abs(correct[inside].mean() - confidence[inside].mean())
    return total


@pytest.mark.parametrize("k", [2, 4])
def test_ece_nll_brier_match_numpy_and_sklearn(k):
    logits, labels = overconfident(400, k, scale=2.0, seed=k)
    out = combine(logits)
    got = calibration.calibration_metrics(out.probs, out.log_probs, labels)
    probs, y = out.probs.double().numpy(), labels.numpy()
    probs /= probs.sum(1, keepdims=True)  # float32 sums are 1 to 1e-7; scikit-learn checks it tighter
    assert got["ece"] == pytest.approx(numpy_ece(probs, y), abs=1e-5)
    assert got["nll"] == pytest.approx(log_loss(y, probs, labels=list(range(k))), abs=1e-5)
    expected = brier_score_loss(y, probs[:, 1], pos_label=1) if k == 2 else brier_score_loss(y, probs)
    assert got["brier"] == pytest.approx(expected, abs=1e-6)


def test_temperature_scaling_lowers_nll_of_an_overconfident_model_to_scipys_optimum():
    logits, labels = overconfident(scale=4.0)
    t = calibration.fit_temperature(logits, labels)
    z, y = logits[0].double().numpy(), labels.numpy()

    def nll(temperature: float) -> float:
        return log_loss(y, softmax(z / temperature, axis=1), labels=[0, 1, 2])

    best = minimize_scalar(nll, bounds=(0.05, 20.0), method="bounded", options={"xatol": 1e-8}).x
    assert t == pytest.approx(best, rel=1e-3)
    assert 3.0 < t < 5.5  # the model was made four times too confident
    before = calibration.calibration_metrics(combine(logits).probs, combine(logits).log_probs, labels)
    after_out = combine(logits, t)
    after = calibration.calibration_metrics(after_out.probs, after_out.log_probs, labels)
    assert after["nll"] < before["nll"] - 0.2 and after["ece"] < before["ece"]
    assert after["nll"] == pytest.approx(nll(t), abs=1e-5)
    # One view: a temperature never changes which class is most probable.
    assert torch.equal(after_out.probs.argmax(1), combine(logits).probs.argmax(1))


def test_temperature_with_tta_views_minimises_the_nll_of_the_averaged_softmax():
    logits, labels = overconfident(300, 2, scale=3.0, seed=4)
    noise = torch.randn(logits.shape, generator=torch.Generator().manual_seed(0))
    views = torch.cat([logits, logits + 2.0 * noise])  # two views that disagree
    t = calibration.fit_temperature(views, labels)
    z, y = views.double().numpy(), labels.numpy()

    def nll(temperature: float) -> float:
        log_p = logsumexp(
            z / temperature - logsumexp(z / temperature, axis=2, keepdims=True), axis=0
        ) - np.log(2)
        return -log_p[np.arange(len(y)), y].mean()

    best = minimize_scalar(nll, bounds=(0.05, 20.0), method="bounded", options={"xatol": 1e-8}).x
    assert t == pytest.approx(best, rel=1e-3)


def write(path, data) -> str:
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return str(path)


def test_calibration_json_is_checked_before_use(tmp_path):
    good = calibration.calibration_record(1.7, ["a", "b"], {"split": "val", "n": 10, "tta": "flip"}, {})
    loaded = calibration.load_calibration(write(tmp_path / "c.json", good), ["a", "b"])
    assert loaded["temperature"] == 1.7 and loaded["tta"] == "flip"
    cases = [
        (tmp_path / "missing.json", "calibration=.*missing.json does not exist or is not a file"),
        (write(tmp_path / "corrupt.json", '{"temperature": 1.'), "cannot be read as JSON"),
        (write(tmp_path / "list.json", "[1, 2]"), "holds no JSON object"),
        (write(tmp_path / "other.json", {**good, "class_names": ["x", "y"]}), r"is for classes \["),
        (write(tmp_path / "t0.json", {**good, "temperature": 0}), r"holds no temperature in \[0.05, 20\]"),
        (write(tmp_path / "tstr.json", {**good, "temperature": "2"}), "holds no temperature"),
        (write(tmp_path / "big.json", " " * (2 << 20) + "{}"), "larger than 1 MiB"),
    ]
    for path, message in cases:
        with pytest.raises(UserError, match=message):
            calibration.load_calibration(path, ["a", "b"])
