"""The numbers of one evaluated split: metrics with intervals, calibration, operating point, TTA comparison.

Shared by eval.py and training's end-of-run report. Input: the logits of every TTA view and the true labels;
output: eval.json's keys and the per-image results (predictions.csv, top losses, figures).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassAUROC,
    MulticlassConfusionMatrix,
)

from densenet_se import bootstrap, calibration, operating_point
from densenet_se.errors import UserError
from densenet_se.inference import combine
from densenet_se.metrics import logged

log = logging.getLogger("densenet_se")


@dataclass
class Outputs:
    """One split's model outputs: float32 logits [V, N, C] of every TTA view, labels [N], paths [N]."""

    split: str
    logits: torch.Tensor
    labels: torch.Tensor
    paths: list[str]


@dataclass
class Settings:
    """How to turn outputs into numbers (eval.py's keys; training's report uses the defaults)."""

    class_names: list[str]
    positive_class: str | None = None
    tta: str = "none"
    bootstrap_n: int = 2000
    bootstrap_seed: int = 0
    bootstrap_level: float = 0.95
    threshold: float | None = None
    target: str | None = None  # target_sensitivity | target_specificity
    target_value: float | None = None
    calibrate: str = "none"


@dataclass
class Assessment:
    """eval.json's numbers for one split, and the per-image results behind them."""

    metrics: dict[str, Any]
    outputs: Outputs
    probs: torch.Tensor
    preds: torch.Tensor
    losses: torch.Tensor
    uncertainty: torch.Tensor
    probs_uncalibrated: torch.Tensor | None = None
    curves: list[dict[str, Any]] = field(default_factory=list)


def compute_metrics(
    probs: torch.Tensor,
    labels: torch.Tensor,
    class_names: list[str],
    positive_class: str | None,
    preds: torch.Tensor | None = None,
) -> dict[str, Any]:
    """Flat metrics; acc/f1/auroc are the definitions training logs on its test split (densenet_se.metrics).

    `preds`: the decisions when they are not the argmax of `probs` (a threshold); AUROC always uses `probs`.
    """
    k = len(class_names)
    decided = probs if preds is None else preds
    out: dict[str, Any] = {"n": int(labels.numel())}
    for m in logged("test", scored=True):
        out[m.name] = float(m.build(k)(probs if m.from_scores else decided, labels))
    out["balanced_acc"] = float(MulticlassAccuracy(k, average="macro")(decided, labels))
    matrix = [[int(v) for v in row] for row in MulticlassConfusionMatrix(k)(decided, labels).tolist()]
    for c, name in enumerate(class_names):
        predicted = sum(matrix[r][c] for r in range(k))
        actual = sum(matrix[c])
        out[f"precision_{name}"] = matrix[c][c] / predicted if predicted else None
        out[f"recall_{name}"] = matrix[c][c] / actual if actual else None
        out[f"support_{name}"] = actual
    if k == 2:
        positive = class_names[operating_point.positive_index(class_names, positive_class)]
        negative = class_names[1 - class_names.index(positive)]
        out["positive_class"] = positive
        out["sensitivity"] = out[f"recall_{positive}"]
        out["specificity"] = out[f"recall_{negative}"]
        out["ppv"] = out[f"precision_{positive}"]
        out["npv"] = out[f"precision_{negative}"]
    else:
        per_class = MulticlassAUROC(k, average=None)(probs, labels).tolist()
        out.update({f"auroc_{name}": float(v) for name, v in zip(class_names, per_class, strict=True)})
    out["class_names"] = list(class_names)
    out["confusion_matrix"] = matrix
    return out


def add_intervals(
    metrics: dict[str, Any],
    probs: torch.Tensor,
    labels: torch.Tensor,
    preds: torch.Tensor,
    settings: Settings,
) -> None:
    """`<metric>_ci: [low, high]` beside every headline metric (null where the metric is undefined)."""
    if settings.bootstrap_n <= 0:
        return
    k = len(settings.class_names)
    positive = (
        operating_point.positive_index(settings.class_names, settings.positive_class) if k == 2 else None
    )
    found = bootstrap.bootstrap_intervals(
        probs.double().numpy(),
        labels.numpy(),
        preds.numpy(),
        settings.bootstrap_n,
        settings.bootstrap_seed,
        settings.bootstrap_level,
        positive,
    )
    names = [*bootstrap.HEADLINE, *(bootstrap.BINARY if k == 2 else ())]
    for name in names:
        metrics[f"{name}_ci"] = found.get(name) if metrics.get(name) is not None else None
    if k > 2 and found.get("auroc_per_class") is not None:
        for name, bounds in zip(settings.class_names, found["auroc_per_class"], strict=True):
            metrics[f"auroc_{name}_ci"] = bounds
            names.append(f"auroc_{name}")
    # Every resample gives the same value when each class is entirely right or entirely wrong (no errors at
    # all, or a model that calls everything one class): a zero-width interval that claims certainty. A
    # proportion then gets the Wilson score interval; any other metric no interval, said in ci_method.
    metrics["ci_method"] = {}
    proportions = _proportions(metrics, positive)
    for name in names:
        bounds = metrics.get(f"{name}_ci")
        if bounds is None or bounds[1] - bounds[0] > 1e-12:
            continue
        successes, trials = proportions.get(name, (0, 0))
        if trials:
            metrics[f"{name}_ci"] = bootstrap.wilson_interval(successes, trials, settings.bootstrap_level)
            metrics["ci_method"][name] = "wilson"
        else:
            metrics[f"{name}_ci"] = None
            metrics["ci_method"][name] = "none: every resample gave the same value"


def _proportions(metrics: dict[str, Any], positive: int | None) -> dict[str, tuple[int, int]]:
    """(successes, trials) of each proportion metric, from the confusion matrix (rows: true class)."""
    cm = metrics["confusion_matrix"]
    out = {"acc": (sum(cm[i][i] for i in range(len(cm))), sum(map(sum, cm)))}
    if positive is not None:
        p, n = positive, 1 - positive
        out["sensitivity"] = (cm[p][p], cm[p][0] + cm[p][1])
        out["specificity"] = (cm[n][n], cm[n][0] + cm[n][1])
        out["ppv"] = (cm[p][p], cm[0][p] + cm[1][p])
        out["npv"] = (cm[n][n], cm[0][n] + cm[1][n])
    return out


def headline(metrics: dict[str, Any]) -> dict[str, Any]:
    """The headline metrics and their intervals only (for the without-TTA comparison)."""
    names = (*bootstrap.HEADLINE, *bootstrap.BINARY)
    return {k: metrics[k] for n in names for k in (n, f"{n}_ci") if k in metrics} | {
        "ci_method": metrics.get("ci_method", {})
    }


def assess(outputs: Outputs, settings: Settings, val: Outputs | None = None) -> Assessment:
    """Everything eval.json reports for `outputs`; `val` fits the temperature and chooses the threshold."""
    names = settings.class_names
    reported_holds_val = outputs.split in ("val", "all")
    if (settings.calibrate == "temperature" or settings.target) and (val is None or not len(val.labels)):
        key = "calibrate=temperature" if settings.calibrate == "temperature" else settings.target
        raise UserError(
            f"{key} needs a validation split, and this run has none; give threshold= or leave it out."
        )
    temperature = 1.0
    fit: dict[str, Any] = {}
    if settings.calibrate == "temperature":
        assert val is not None
        temperature = calibration.fit_temperature(val.logits, val.labels)
        before, after = combine(val.logits, 1.0), combine(val.logits, temperature)
        fit = {
            "n": len(val.labels),
            "val_nll_before": calibration.calibration_metrics(before.probs, before.log_probs, val.labels)[
                "nll"
            ],
            "val_nll_after": calibration.calibration_metrics(after.probs, after.log_probs, val.labels)["nll"],
        }
    combined = combine(outputs.logits, temperature)
    positive = operating_point.positive_index(names, settings.positive_class) if len(names) == 2 else 0
    point: dict[str, Any] | None = None
    threshold = settings.threshold
    if settings.target:
        assert val is not None and settings.target_value is not None
        val_probs = combine(val.logits, temperature).probs
        threshold = operating_point.choose_threshold(
            val_probs, val.labels, positive, settings.target, settings.target_value
        )
        point = {
            "chosen_on": "val",
            "target": {settings.target.removeprefix("target_"): settings.target_value},
            "val": operating_point.rates(
                operating_point.decide(val_probs, threshold, positive), val.labels, positive
            ),
            # A threshold chosen on images it is then scored on looks better than it will on new images.
            "optimistic": reported_holds_val,
        }
    elif threshold is not None:
        point = {"chosen_on": None, "target": None, "optimistic": False}
    if point is not None:
        point = {
            "threshold": threshold,
            "positive_class": names[positive],
            "rule": f"{names[positive]} when its probability is >= {threshold:.6g}, else {names[1 - positive]}",
            **point,
            "tta": settings.tta,
            "temperature": temperature,
        }
    preds = operating_point.decide(combined.probs, threshold, positive)
    metrics: dict[str, Any] = {
        "split": outputs.split,
        **compute_metrics(combined.probs, outputs.labels, names, settings.positive_class, preds),
    }
    add_intervals(metrics, combined.probs, outputs.labels, preds, settings)
    metrics["bootstrap"] = {
        "n": settings.bootstrap_n,
        "seed": settings.bootstrap_seed,
        "level": settings.bootstrap_level,
        "method": "stratified percentile bootstrap over images (classes keep their counts); where every "
        "resample gives the same value, the Wilson score interval for a proportion, else none (ci_method)",
    }
    metrics["threshold"] = threshold
    metrics["operating_point"] = point
    metrics["tta"] = settings.tta
    after = calibration.calibration_metrics(combined.probs, combined.log_probs, outputs.labels)
    metrics.update(after)
    probs_uncalibrated = None
    if settings.calibrate == "temperature":
        plain = combine(outputs.logits, 1.0)
        probs_uncalibrated = plain.probs
        metrics["calibration"] = {
            "method": "temperature",
            "temperature": temperature,
            "fitted_on": "val",
            **fit,
            "before": calibration.calibration_metrics(plain.probs, plain.log_probs, outputs.labels),
            "after": after,
            "optimistic": reported_holds_val,
        }
    else:
        metrics["calibration"] = None
    if outputs.logits.shape[0] > 1:  # the same numbers from the image itself alone, to see what TTA buys
        alone = combine(outputs.logits[:1], temperature)
        alone_preds = operating_point.decide(alone.probs, threshold, positive)
        plain_metrics = compute_metrics(
            alone.probs, outputs.labels, names, settings.positive_class, alone_preds
        )
        add_intervals(plain_metrics, alone.probs, outputs.labels, alone_preds, settings)
        plain_metrics.update(calibration.calibration_metrics(alone.probs, alone.log_probs, outputs.labels))
        metrics["without_tta"] = {
            **headline(plain_metrics),
            **{k: plain_metrics[k] for k in ("ece", "nll", "brier")},
        }
    losses = -combined.log_probs.gather(1, outputs.labels.view(-1, 1)).squeeze(1)
    classes = [positive] if len(names) == 2 else list(range(len(names)))
    return Assessment(
        metrics=metrics,
        outputs=outputs,
        probs=combined.probs,
        preds=preds,
        losses=losses,
        uncertainty=combined.uncertainty,
        probs_uncalibrated=probs_uncalibrated,
        curves=operating_point.curves(combined.probs, outputs.labels, classes),
    )


def top_losses(result: Assessment, k: int) -> list[int]:
    """Indices of the `k` images with the highest loss, highest first."""
    k = min(k, len(result.losses))
    if k <= 0:
        return []
    return result.losses.topk(k).indices.tolist()


def prediction_rows(result: Assessment) -> tuple[list[str], list[dict[str, Any]]]:
    """predictions.csv: path, label, predicted, one probability per class, loss, correct (+ uncertainty)."""
    names = result.metrics["class_names"]
    columns = ["path", "label", "predicted", *names, "loss", "correct"]
    with_tta = result.outputs.logits.shape[0] > 1
    if with_tta:
        columns.append("uncertainty")
    rows = []
    for i, path in enumerate(result.outputs.paths):
        label, pred = int(result.outputs.labels[i]), int(result.preds[i])
        row: dict[str, Any] = {"path": path, "label": names[label], "predicted": names[pred]}
        row.update({name: f"{float(p):.8g}" for name, p in zip(names, result.probs[i], strict=True)})
        row["loss"] = f"{float(result.losses[i]):.6g}"
        row["correct"] = int(label == pred)
        if with_tta:
            row["uncertainty"] = f"{float(result.uncertainty[i]):.6g}"
        rows.append(row)
    return columns, rows
