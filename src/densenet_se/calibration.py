"""Are the probabilities probabilities? ECE, NLL and Brier score, temperature scaling and calibration.json.

Temperature scaling (Guo et al., 2017) divides the logits by one number T fitted on the validation split to
minimise the negative log-likelihood; T > 1 softens an over-confident model. It never changes the argmax of
one view, so accuracy stays and only the probabilities move.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torchmetrics.functional.classification import multiclass_calibration_error

from densenet_se.errors import UserError
from densenet_se.io import read_json_object

log = logging.getLogger("densenet_se")

CALIBRATE_CHOICES = ("none", "temperature")
ECE_BINS = 15
# A fitted temperature outside this range means the validation split cannot pin it down (too small, or
# every image right with a wide margin); the fit stops at the bound and says so.
TEMPERATURE_RANGE = (0.05, 20.0)
FORMAT = "densenet-se calibration"
MAX_FILE_BYTES = 1 << 20


def check_calibrate(value: str) -> str:
    """`calibrate` itself, or UserError naming the choices."""
    if value not in CALIBRATE_CHOICES:
        raise UserError(f"calibrate={value!r} is not allowed; choose one of: {', '.join(CALIBRATE_CHOICES)}.")
    return value


def brier_score(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean squared error of the probability vector (summed over classes); halved for two classes.

    The same convention as scikit-learn's brier_score_loss: 0..1 for two classes, 0..2 for more.
    """
    onehot = F.one_hot(labels, probs.shape[1]).to(probs.dtype)
    score = float(((probs - onehot) ** 2).sum(dim=1).mean())
    return score / 2.0 if probs.shape[1] == 2 else score


def calibration_metrics(
    probs: torch.Tensor, log_probs: torch.Tensor, labels: torch.Tensor
) -> dict[str, float]:
    """ECE (15 equal-width bins of the top-class confidence, torchmetrics), NLL (mean -log p_true), Brier."""
    ece = multiclass_calibration_error(probs, labels, probs.shape[1], n_bins=ECE_BINS, norm="l1")
    return {
        "ece": float(ece),
        "nll": float(F.nll_loss(log_probs, labels)),
        "brier": brier_score(probs, labels),
    }


def _nll(logits: torch.Tensor, labels: torch.Tensor, log_t: torch.Tensor) -> torch.Tensor:
    """Mean NLL of the view-averaged softmax of `logits` [V, N, C] at temperature exp(log_t)."""
    per_view = (logits / log_t.exp()).log_softmax(dim=2)
    log_mean = torch.logsumexp(per_view, dim=0) - math.log(logits.shape[0])
    return F.nll_loss(log_mean, labels)


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The temperature minimising the NLL of the view-averaged softmax of `logits` [V, N, C] on `labels`."""
    z = logits.detach().double()
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=1.0, max_iter=100, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = _nll(z, labels, log_t)
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    low, high = TEMPERATURE_RANGE
    t = float(log_t.detach().exp())
    if not math.isfinite(t) or not low <= t <= high:
        t = low if not math.isfinite(t) or t < low else high
        log.warning(
            "the validation split does not pin the temperature down (the fit ran to its bound); using %g",
            t,
        )
    return t


def calibration_record(
    temperature: float, class_names: list[str], fitted_on: dict[str, Any], source: dict[str, Any]
) -> dict[str, Any]:
    """What calibration.json holds: the temperature, the classes it is for, where and how it was fitted."""
    return {
        "format": FORMAT,
        "method": "temperature",
        "temperature": temperature,
        "apply": "probabilities = softmax(logits / temperature)",
        "class_names": list(class_names),
        "fitted_on": fitted_on,
        **source,
    }


def load_calibration(path: str | Path, class_names: list[str], key: str = "calibration") -> dict[str, Any]:
    """calibration.json written by eval.py calibrate=temperature, checked for these classes; UserError else."""
    data = read_json_object(
        path, key, "the calibration.json written by eval.py calibrate=temperature", MAX_FILE_BYTES
    )
    temperature = data.get("temperature")
    low, high = TEMPERATURE_RANGE
    if (
        data.get("method") != "temperature"
        or isinstance(temperature, bool)
        or not isinstance(temperature, (int, float))
        or not low <= float(temperature) <= high
    ):
        raise UserError(
            f"{key}={path} holds no temperature in [{low:g}, {high:g}]; give the calibration.json written by "
            "eval.py calibrate=temperature."
        )
    if data.get("class_names") != list(class_names):
        raise UserError(
            f"{key}={path} is for classes {json.dumps(data.get('class_names'))[:200]} but the checkpoint predicts "
            f"{class_names}; give the calibration.json of an eval of this checkpoint."
        )
    fitted = data.get("fitted_on") if isinstance(data.get("fitted_on"), dict) else {}
    return {"temperature": float(temperature), "tta": fitted.get("tta"), "path": str(path)}
