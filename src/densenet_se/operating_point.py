"""Decisions at a probability threshold (two classes), ROC and precision-recall curves (torchmetrics).

A threshold is either given (`threshold=`) or chosen on the validation split for a target sensitivity or
specificity: the highest threshold whose validation sensitivity reaches the target (so specificity is as high as
it can be), or the lowest whose validation specificity does. It is then applied, unchanged, to the split being
reported. The positive class is called when its probability is >= the threshold.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torchmetrics.functional.classification import (
    binary_average_precision,
    binary_precision_recall_curve,
    binary_recall,
    binary_roc,
    binary_sensitivity_at_specificity,
    binary_specificity,
    binary_specificity_at_sensitivity,
)

from densenet_se.errors import UserError
from densenet_se.io import read_json_object

TARGETS = ("target_sensitivity", "target_specificity")
DECISION_KEYS = ("threshold", *TARGETS)


def check_decision(values: dict[str, float | None], class_names: list[str]) -> str | None:
    """The one decision key given among threshold/target_* (or None); UserError for a bad value or combination."""
    given = [k for k in DECISION_KEYS if values.get(k) is not None]
    if len(given) > 1:
        raise UserError(
            f"{' and '.join(given)} are both set; give one of threshold, target_sensitivity, target_specificity."
        )
    if not given:
        return None
    key = given[0]
    value = float(values[key])  # type: ignore[arg-type]
    if key == "threshold" and not 0.0 <= value <= 1.0:
        raise UserError(f"threshold={value:g} is out of range; it must be a probability in [0, 1].")
    if key != "threshold" and not 0.0 < value <= 1.0:
        raise UserError(f"{key}={value:g} is out of range; it must be in (0, 1], e.g. {key}=0.9.")
    if len(class_names) != 2:
        raise UserError(
            f"{key} needs two classes, but the checkpoint predicts {len(class_names)} "
            f"({', '.join(class_names)}); drop it to decide by the most probable class."
        )
    return key


def positive_index(class_names: list[str], positive_class: str | None) -> int:
    """Index of `positive_class` (default: the first class); UserError if it is not a class."""
    positive = positive_class if positive_class is not None else class_names[0]
    if positive not in class_names:
        raise UserError(
            f"positive_class={positive!r} is not a class; choose one of: {', '.join(class_names)}."
        )
    return class_names.index(positive)


def decide(probs: torch.Tensor, threshold: float | None, positive: int) -> torch.Tensor:
    """Predicted labels [N]: the positive class where its probability >= `threshold`, else argmax (None)."""
    if threshold is None:
        return probs.argmax(dim=1)
    return torch.where(probs[:, positive] >= threshold, positive, 1 - positive)


def rates(preds: torch.Tensor, labels: torch.Tensor, positive: int) -> dict[str, float]:
    """Sensitivity (recall of the positive class) and specificity of two-class decisions (torchmetrics)."""
    called, actual = (preds == positive).long(), (labels == positive).long()
    return {
        "sensitivity": float(binary_recall(called, actual)),
        "specificity": float(binary_specificity(called, actual)),
    }


def choose_threshold(
    probs: torch.Tensor, labels: torch.Tensor, positive: int, target: str, value: float, split: str = "val"
) -> float:
    """The threshold meeting `target` (target_sensitivity|target_specificity) = `value` on these images."""
    scores, actual = probs[:, positive].float(), (labels == positive).long()
    if int(actual.sum()) in (0, len(actual)):
        missing = "positive" if int(actual.sum()) == 0 else "negative"
        raise UserError(
            f"the {split} split has no {missing} images, so {target}={value:g} cannot be chosen on it; "
            "give threshold= instead."
        )
    if target == "target_sensitivity":
        _, threshold = binary_specificity_at_sensitivity(scores, actual, min_sensitivity=float(value))
    else:
        _, threshold = binary_sensitivity_at_specificity(scores, actual, min_specificity=float(value))
    chosen = min(float(threshold), 1.0)
    # torchmetrics' curve starts at threshold 1.0 "call nothing positive"; a probability of exactly 1.0
    # is still >= 1.0, so check the rate the rule really gives.
    met = rates(decide(probs, chosen, positive), labels, positive)[target.removeprefix("target_")]
    if met < value:
        raise UserError(
            f"{target}={value:g} cannot be met on the {split} split by any threshold (best {met:.3f}); "
            "choose a lower target."
        )
    return chosen


def curves(probs: torch.Tensor, labels: torch.Tensor, classes: list[int]) -> list[dict[str, Any]]:
    """One-vs-rest ROC and precision-recall curves (and average precision) of each class in `classes`."""
    out = []
    for c in classes:
        scores, actual = probs[:, c].float(), (labels == c).long()
        fpr, tpr, _ = binary_roc(scores, actual)
        precision, recall, _ = binary_precision_recall_curve(scores, actual)
        out.append(
            {
                "class": c,
                "fpr": fpr.tolist(),
                "tpr": tpr.tolist(),
                "precision": precision.tolist(),
                "recall": recall.tolist(),
                "ap": float(binary_average_precision(scores, actual)),
                "prevalence": float(actual.float().mean()),
            }
        )
    return out


def load_operating_point(
    path: str | Path, class_names: list[str], tta: str, temperature: float
) -> dict[str, Any]:
    """The operating point stored in an eval.json, checked against this checkpoint, TTA and calibration."""
    key, what = "operating_point", "an eval.json written by eval.py with threshold= or target_sensitivity="
    data = read_json_object(path, key, what)
    if data.get("class_names") != list(class_names):
        raise UserError(
            f"{key}={path} is for classes {json.dumps(data.get('class_names'))[:200]} but the checkpoint predicts "
            f"{class_names}; give the eval.json of an eval of this checkpoint."
        )
    point = data.get("operating_point")
    if not isinstance(point, dict):
        raise UserError(f"{key}={path} holds no operating point; give {what}.")
    threshold, positive = point.get("threshold"), point.get("positive_class")
    if (
        isinstance(threshold, bool)
        or not isinstance(threshold, (int, float))
        or not 0.0 <= threshold <= 1.0
        or positive not in class_names
    ):
        raise UserError(f"{key}={path} has no valid threshold in [0, 1] and positive class; give {what}.")
    chosen_tta, chosen_t = point.get("tta", "none"), point.get("temperature", 1.0)
    if chosen_tta != tta or not isinstance(chosen_t, (int, float)) or not math.isclose(chosen_t, temperature):
        calibration = (
            "calibration=<the calibration.json of that eval>" if chosen_t != 1.0 else "no calibration"
        )
        raise UserError(
            f"{key}={path} was chosen on probabilities with tta={chosen_tta} and temperature {chosen_t:.4g}, not "
            f"tta={tta} and temperature {temperature:g}; pass tta={chosen_tta} and {calibration}."
        )
    return {"threshold": float(threshold), "positive": class_names.index(positive), "path": str(path)}
