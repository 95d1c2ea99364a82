"""report.html: one self-contained page (figures embedded as data: URIs) that opens offline in any browser."""

from __future__ import annotations

import base64
import datetime
import importlib.resources
from collections.abc import Callable
from typing import Any

import jinja2
import torch

from densenet_se import __version__
from densenet_se.assessment import Assessment
from densenet_se.bootstrap import BINARY, HEADLINE

# Figure file -> (title, caption) on the page, in page order.
FIGURES = {
    "roc.png": (
        "ROC curve",
        "Sensitivity against false positive rate for every threshold; the circle is the decision rule used "
        "for the table. The legend gives the AUROC with its interval.",
    ),
    "pr.png": (
        "Precision-recall curve",
        "How many called positive really are (precision) against how many positives are found (recall); the "
        "dotted line is the share of positives, what guessing gives.",
    ),
    "calibration.png": (
        "Reliability diagram",
        "Images binned by the model's confidence: on the diagonal, 80 % confidence means 80 % right. Below the "
        "line the model is over-confident.",
    ),
    "confusion_matrix.png": ("Confusion matrix", "Rows: true class; columns: predicted class."),
    "top_losses.png": (
        "Highest-loss images",
        "The images the model is most wrong about (highest loss), as the model saw them, each beside the "
        "Grad-CAM map of where the evidence for the predicted class lies. Look here for label errors and "
        "shortcuts (rulers, ink marks, borders).",
    ),
}
WIDE = {"top_losses.png"}
CALIBRATION_MEANING = {
    "ece": "average gap between confidence and accuracy over 15 confidence bins (0: honest)",
    "nll": "mean of -log(probability given to the true class); punishes confident mistakes",
    "brier": "mean squared error of the probabilities (0: perfect; 0.25 for two classes: always 50 %)",
}
# An interval wider than this (on a 0..1 metric) gets a plain-words warning on the page.
WIDE_INTERVAL = 0.10


def data_uri(png: bytes) -> str:
    """A PNG as a data: URI, so the page needs no other file."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _num(value: Any) -> str:
    """3 decimals, more when 3 would round a value that is not exactly 0 or 1 to 0.000 or 1.000."""
    if value is None:
        return "-"
    if min(abs(value), abs(value - 1.0)) < 1e-6:  # float32 noise of an exact 0 or 1 (AUROC 0.99999994)
        return f"{round(value):.3f}"
    for digits in range(3, 7):
        text = f"{value:.{digits}f}"
        if float(text) not in (0.0, 1.0):
            return text
    return text


def _ci(bounds: Any) -> str:
    return "-" if not bounds else f"{bounds[0]:.3f} to {bounds[1]:.3f}"


def _mark(method: str | None) -> str:
    """The footnote mark of an interval that is not the plain bootstrap one."""
    return "" if method is None else " *" if method == "wilson" else " \u2020"


def leakage_statement(split_report: dict[str, Any] | None) -> str:
    """The split's statement about near-duplicates across splits (from metrics.json / the data module)."""
    if not isinstance(split_report, dict) or "grouped_split" not in split_report:
        return "not recorded for this run"
    groups = split_report.get("groups")
    if split_report.get("grouped_split") and isinstance(groups, dict):
        text = (
            f"grouped by {groups.get('by')}={groups.get('value')!r}: {groups.get('count')} source groups, each "
            "kept whole in one split, so copies of one photo cannot be on both sides"
        )
    else:
        text = "not grouped: images were assigned to splits one by one"
    warning = split_report.get("leakage_warning")
    if isinstance(warning, str) and warning:
        text += f". Warning: {warning[:600]}"
    return text


def _metric_rows(m: dict[str, Any]) -> list[dict[str, Any]]:
    names = {**HEADLINE, **(BINARY if len(m["class_names"]) == 2 else {})}
    plain = m.get("without_tta") or {}
    wilson, plain_wilson = m.get("ci_method") or {}, plain.get("ci_method") or {}
    rows = []
    for key, name in names.items():
        bounds = m.get(f"{key}_ci")
        bar = None
        if bounds and m.get(key) is not None:
            bar = {
                "lo": round(100 * bounds[0], 1),
                "width": round(100 * max(bounds[1] - bounds[0], 0.005), 1),
                "point": round(100 * m[key], 1),
            }
        if key in ("sensitivity", "ppv"):
            name += f" ({m['positive_class']})"
        rows.append(
            {
                "name": name,
                "value": _num(m.get(key)),
                "ci": _ci(bounds) + _mark(wilson.get(key)),
                "bar": bar,
                "plain": _num(plain.get(key)),
                "plain_ci": _ci(plain.get(f"{key}_ci")) + _mark(plain_wilson.get(key)),
            }
        )
    return rows


def _notes(m: dict[str, Any], missing: int) -> list[str]:
    notes = []
    if m["split"] == "all":
        notes.append(
            "split=all includes the training images: these numbers are not an estimate for new images."
        )
    if m["split"] == "val":
        notes.append(
            "Training picks best.ckpt by its validation accuracy, so the validation numbers of that checkpoint "
            "flatter it a little. Numbers to publish come from a held-out test split (train with "
            "data.test_fraction, then eval.py split=test)."
        )
    bounds = m.get("acc_ci")
    if bounds and bounds[1] - bounds[0] > WIDE_INTERVAL:
        notes.append(
            f"Only {m['n']} images: the accuracy on new images like these could plausibly be anywhere from "
            f"{bounds[0]:.3f} to {bounds[1]:.3f}. Report the interval with the number; more test images narrow it."
        )
    if missing:
        notes.append(f"{missing} image(s) of this split are missing or unreadable now and were left out.")
    return notes


def _decision(m: dict[str, Any]) -> list[str]:
    names = m["class_names"]
    point = m.get("operating_point")
    lines = []
    if len(names) > 2:
        lines.append("Each image gets its most probable class (a threshold needs two classes).")
    elif point is None:
        lines.append(
            f"An image is called {m['positive_class']} when that is the more probable class (a threshold of 0.5)."
        )
    else:
        lines.append(f"Rule: {point['rule']}.")
        if point.get("chosen_on"):
            ((what, target),) = point["target"].items()
            val = point.get("val") or {}
            lines.append(
                f"The threshold was chosen on the validation split to reach {what} >= {target:g} there "
                f"(validation sensitivity {_num(val.get('sensitivity'))}, specificity "
                f"{_num(val.get('specificity'))}) and is applied unchanged to this split."
            )
        else:
            lines.append("The threshold was given (threshold=).")
        if point.get("optimistic"):
            lines.append(
                "Optimistic: the threshold was chosen on images this split contains. Evaluate split=test for "
                "numbers that hold on new images."
            )
    tta = m.get("tta", "none")
    if tta != "none":
        lines.append(
            f"Test-time augmentation tta={tta}: the softmax is averaged over flipped views of each image."
        )
    return lines


def _calibration(m: dict[str, Any]) -> dict[str, Any]:
    cal = m.get("calibration")
    keys = ("ece", "nll", "brier")
    if cal:
        columns = ["before", f"after (T = {cal['temperature']:.3f})"]
        values = {k: [_num(cal["before"][k]), _num(cal["after"][k])] for k in keys}
        notes = [
            "The temperature was fitted on the validation split and divides every logit before the softmax."
        ]
        if cal.get("optimistic"):
            notes.append("Fitted on images this split contains: the 'after' values are optimistic.")
    else:
        columns, values, notes = ["value"], {k: [_num(m[k])] for k in keys}, []
    if m.get("without_tta"):
        columns.append("without TTA")
        for k in keys:
            values[k].append(_num(m["without_tta"].get(k)))
    rows = [
        {
            "name": k.upper() if k != "brier" else "Brier",
            "values": values[k],
            "meaning": CALIBRATION_MEANING[k],
        }
        for k in keys
    ]
    return {"columns": columns, "rows": rows, "notes": notes}


def section(result: Assessment, figures: dict[str, bytes], heading: str, missing: int = 0) -> dict[str, Any]:
    """The page section of one evaluated split."""
    m = result.metrics
    names = m["class_names"]
    per_class = [
        {
            "name": name,
            "support": m[f"support_{name}"],
            "precision": _num(m[f"precision_{name}"]),
            "recall": _num(m[f"recall_{name}"]),
            "auroc": _num(m.get(f"auroc_{name}")),
            "auroc_ci": _ci(m.get(f"auroc_{name}_ci"))
            + _mark((m.get("ci_method") or {}).get(f"auroc_{name}")),
        }
        for name in names
    ]
    boot = m["bootstrap"]
    level = f"{100 * boot['level']:g} %"
    interval_note = (
        f"Interval: the middle {level} of the metric over {boot['n']:,} resamples of these {m['n']} images "
        f"(stratified percentile bootstrap, seed {boot['seed']}). It shows how far the number could move on "
        "another sample of images like these; it does not cover images from another clinic or camera."
        if boot["n"] > 0
        else "Intervals are off (bootstrap.n=0)."
    )
    methods = set((m.get("ci_method") or {}).values()) | set(
        (m.get("without_tta") or {}).get("ci_method", {}).values()
    )
    if "wilson" in methods:
        interval_note += (
            " * Every resample gave the same value (each class entirely right or entirely wrong), so the "
            "Wilson score interval of the proportion is shown instead of a zero-width one."
        )
    if methods - {"wilson"}:
        interval_note += (
            " \u2020 Every resample gave the same value, so the bootstrap cannot say how far this metric could "
            "move: no interval, which is not certainty."
        )
    counts = ", ".join(f"{name} {m[f'support_{name}']}" for name in names)
    return {
        "heading": f"{heading}: {m['n']} images ({counts})",
        "notes": _notes(m, missing),
        "level": level,
        "has_tta": bool(m.get("without_tta")),
        "metrics": _metric_rows(m),
        "interval_note": interval_note,
        "per_class": per_class,
        "per_class_auroc": len(names) > 2,
        "calibration": _calibration(m),
        "decision": _decision(m),
        "figures": [
            {
                "title": FIGURES[name][0],
                "caption": FIGURES[name][1],
                "uri": data_uri(figures[name]),
                "cls": "wide" if name in WIDE else "",
            }
            for name in FIGURES
            if name in figures
        ],
    }


def render(title: str, subtitle: str, facts: list[tuple[str, str]], sections: list[dict[str, Any]]) -> str:
    """The whole page as one HTML string (autoescaped: file and class names cannot inject markup)."""
    source = importlib.resources.files("densenet_se").joinpath("templates/report.html").read_text("utf-8")
    template = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined).from_string(source)
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    footer = f"densenet-se {__version__}, written {now}. Every figure is embedded: this file opens offline."
    return template.render(title=title, subtitle=subtitle, facts=facts, sections=sections, footer=footer)


def method_facts(m: dict[str, Any]) -> list[tuple[str, str]]:
    """How the numbers were made: TTA, calibration, decision rule, intervals."""
    cal = m.get("calibration")
    point = m.get("operating_point")
    boot = m["bootstrap"]
    return [
        (
            "test-time augmentation",
            {"none": "none", "flip": "flip: image + mirror image", "flip4": "flip4: image + 3 flips"}.get(
                m.get("tta", "none"), str(m.get("tta"))
            ),
        ),
        (
            "calibration",
            f"temperature {cal['temperature']:.4f}, fitted on the validation split ({cal.get('n', '?')} images)"
            if cal
            else "none (softmax as the model gives it)",
        ),
        ("decision", point["rule"] if point else "most probable class"),
        (
            "intervals",
            f"{100 * boot['level']:g} % stratified percentile bootstrap, {boot['n']:,} resamples, seed {boot['seed']}"
            if boot["n"]
            else "off (bootstrap.n=0)",
        ),
    ]


def split_section(
    result: Assessment,
    images_of: Callable[[list[int]], torch.Tensor],
    module: torch.nn.Module,
    hparams: dict[str, Any],
    device: torch.device,
    top_k: int,
    heading: str,
    missing: int = 0,
) -> tuple[dict[str, bytes], dict[str, Any]]:
    """(figures as PNG bytes by file name, page section) of one evaluated split.

    `images_of(indices)`: the uint8 images [k,3,S,S] of those rows, for the highest-loss panel.
    """
    from densenet_se.assessment import top_losses
    from densenet_se.report_plots import section_figures, top_loss_panels

    indices = top_losses(result, top_k)
    panels = top_loss_panels(result, indices, images_of(indices), module, hparams, device) if indices else []
    figures = section_figures(result, f"{result.outputs.split} split", panels)
    return figures, section(result, figures, heading, missing)
