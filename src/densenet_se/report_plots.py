"""The evaluation figures: ROC and precision-recall curves with the operating point, reliability diagram,
and the images with the highest loss beside their Grad-CAM overlays."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure

from densenet_se.calibration import ECE_BINS
from densenet_se.plots import plt

# Fixed margins instead of tight_layout: each layout pass is a full draw, and these figures never change shape.
MARGINS = {"left": 0.13, "right": 0.97, "bottom": 0.1, "top": 0.93}


def _interval(bounds: Sequence[float] | None) -> str:
    return f" [{bounds[0]:.3f}, {bounds[1]:.3f}]" if bounds else ""


def _decision(metrics: dict[str, Any]) -> str:
    threshold = metrics.get("threshold")
    return f"threshold {threshold:.3g}" if threshold is not None else "most probable class"


def _one_vs_rest(metrics: dict[str, Any], c: int) -> tuple[float, float, float | None]:
    """(false positive rate, recall, precision) of class `c` under the decisions behind the confusion matrix."""
    matrix = np.asarray(metrics["confusion_matrix"], dtype=np.float64)
    tp, actual, called = matrix[c, c], matrix[c].sum(), matrix[:, c].sum()
    negatives = matrix.sum() - actual
    fpr = (called - tp) / negatives if negatives else math.nan
    return fpr, tp / actual if actual else math.nan, tp / called if called else None


def _label(metrics: dict[str, Any], curve: dict[str, Any]) -> tuple[str, str]:
    """(class name as shown, key prefix of its AUROC in metrics)."""
    names = metrics["class_names"]
    name = names[curve["class"]]
    if len(names) == 2:
        return f"{name} (positive)", "auroc"
    return f"{name} vs rest", f"auroc_{name}"


def roc_figure(metrics: dict[str, Any], curves: list[dict[str, Any]], title: str) -> Figure:
    """ROC curve per class (one for two classes), AUROC with its interval in the legend, operating point."""
    fig, ax = plt.subplots(figsize=(5.6, 5.2))
    for curve in curves:
        name, key = _label(metrics, curve)
        (line,) = ax.plot(
            curve["fpr"],
            curve["tpr"],
            lw=1.8,
            label=f"{name}: AUROC {metrics[key]:.3f}{_interval(metrics.get(f'{key}_ci'))}",
        )
        fpr, tpr, _ = _one_vs_rest(metrics, curve["class"])
        ax.plot([fpr], [tpr], "o", ms=8, mfc="white", mec=line.get_color(), mew=2)
    ax.plot(
        [], [], "o", ms=8, mfc="white", mec="black", mew=2, label=f"operating point ({_decision(metrics)})"
    )
    ax.plot([0, 1], [0, 1], ":", color="grey", lw=1, label="chance")
    ax.set(xlim=(-0.01, 1.01), ylim=(-0.01, 1.01), xlabel="false positive rate (1 - specificity)")
    ax.set_ylabel("true positive rate (sensitivity)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.subplots_adjust(**MARGINS)
    return fig


def pr_figure(metrics: dict[str, Any], curves: list[dict[str, Any]], title: str) -> Figure:
    """Precision-recall curve per class, average precision in the legend, prevalence line, operating point."""
    fig, ax = plt.subplots(figsize=(5.6, 5.2))
    for curve in curves:
        name, _ = _label(metrics, curve)
        (line,) = ax.plot(curve["recall"], curve["precision"], lw=1.8, label=f"{name}: AP {curve['ap']:.3f}")
        ax.axhline(curve["prevalence"], ls=":", lw=1, color=line.get_color())
        _, recall, precision = _one_vs_rest(metrics, curve["class"])
        if precision is not None:
            ax.plot([recall], [precision], "o", ms=8, mfc="white", mec=line.get_color(), mew=2)
    ax.plot(
        [], [], "o", ms=8, mfc="white", mec="black", mew=2, label=f"operating point ({_decision(metrics)})"
    )
    ax.plot([], [], ":", color="grey", lw=1, label="prevalence (a model that guesses)")
    ax.set(xlim=(-0.01, 1.01), ylim=(-0.01, 1.01), xlabel="recall (sensitivity)", ylabel="precision (PPV)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    fig.subplots_adjust(**MARGINS)
    return fig


def reliability(probs: torch.Tensor, labels: torch.Tensor, bins: int = ECE_BINS) -> dict[str, np.ndarray]:
    """Per equal-width bin of the top-class confidence: mean confidence, accuracy and image count."""
    confidence, predicted = probs.max(dim=1)
    confidence, correct = confidence.double().numpy(), (predicted == labels).double().numpy()
    # Bins (lo, hi] like torchmetrics' calibration error; a confidence of exactly 0 cannot occur.
    index = np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)
    count = np.bincount(index, minlength=bins).astype(np.float64)
    with np.errstate(invalid="ignore"):
        mean_conf = np.bincount(index, confidence, minlength=bins) / count
        accuracy = np.bincount(index, correct, minlength=bins) / count
    return {"confidence": mean_conf, "accuracy": accuracy, "count": count}


def calibration_figure(
    probs: torch.Tensor,
    labels: torch.Tensor,
    metrics: dict[str, Any],
    title: str,
    probs_uncalibrated: torch.Tensor | None = None,
) -> Figure:
    """Reliability diagram (accuracy against confidence per bin) over a histogram of confidences."""
    fig, (ax, hist) = plt.subplots(
        2, 1, figsize=(5.6, 6.0), gridspec_kw={"height_ratios": [3, 1]}, sharex=True
    )
    edges = np.linspace(0, 1, ECE_BINS + 1)
    ax.plot([0, 1], [0, 1], ":", color="grey", lw=1, label="perfectly calibrated")
    series = [("after temperature scaling", probs, metrics["ece"])]
    if probs_uncalibrated is not None:
        series.insert(0, ("before", probs_uncalibrated, metrics["calibration"]["before"]["ece"]))
    for i, (name, p, ece) in enumerate(series):
        r = reliability(p, labels)
        shown = r["count"] > 0
        label = f"{name}: ECE {ece:.3f}" if probs_uncalibrated is not None else f"model: ECE {ece:.3f}"
        ax.plot(r["confidence"][shown], r["accuracy"][shown], "o-", lw=1.6, ms=5, label=label)
        hist.bar(
            edges[:-1] + (i + 0.5) / (len(series) + 1) / ECE_BINS,
            r["count"],
            width=1 / ECE_BINS / (len(series) + 1),
            align="center",
            alpha=0.8,
        )
    ax.set(xlim=(0, 1.01), ylim=(-0.01, 1.01), ylabel="accuracy in the bin")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    hist.set(xlabel=f"confidence (probability of the predicted class), {ECE_BINS} bins", ylabel="images")
    hist.grid(alpha=0.3)
    fig.subplots_adjust(**MARGINS, hspace=0.08)
    return fig


def top_losses_png(panels: list[dict[str, Any]], title: str, tile: int = 160, cols: int = 4) -> bytes:
    """PNG grid: per panel, the image as the model saw it beside its Grad-CAM overlay, caption above.

    Drawn with PIL, not matplotlib: sixteen image pairs are a paste each, where axes cost a second to lay out.
    """
    import io

    from PIL import Image, ImageDraw, ImageFont

    font, bold = ImageFont.load_default(size=13), ImageFont.load_default(size=17)
    line, gap, pad = 17, 6, 26
    cols = max(1, min(cols, len(panels)))
    rows = max(1, math.ceil(len(panels) / cols))
    cell_w, cell_h = 2 * tile + gap, 3 * line + 6 + tile
    sheet = Image.new("RGB", (cols * cell_w + (cols + 1) * pad, 40 + rows * (cell_h + pad)), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((pad, 10), title, fill="black", font=bold)
    for i, panel in enumerate(panels):
        r, c = divmod(i, cols)
        x, y = pad + c * (cell_w + pad), 40 + r * (cell_h + pad)
        colours = ("#444444", "#c62828" if panel.get("wrong") else "black", "black")  # a mistake in red
        for j, text in enumerate(panel["caption"].splitlines()[:3]):
            draw.text((x, y + j * line), text, fill=colours[j], font=font)
        for j, key in enumerate(("image", "overlay")):
            picture = Image.fromarray(np.asarray(panel[key], dtype=np.uint8)).resize(
                (tile, tile), Image.Resampling.NEAREST
            )
            sheet.paste(picture, (x + j * (tile + gap), y + 3 * line + 6))
    buffer = io.BytesIO()
    sheet.save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()


def top_loss_panels(
    result: Any,
    indices: list[int],
    images: torch.Tensor,
    module: torch.nn.Module,
    hparams: dict[str, Any],
    device: torch.device,
) -> list[dict[str, Any]]:
    """Panels for top_losses_figure: uint8 `images` [k,3,S,S] of rows `indices`, Grad-CAM of the prediction."""
    from densenet_se.explain import gradcam_overlays

    if not indices:
        return []
    names = result.metrics["class_names"]
    targets = result.preds[indices]
    overlays = gradcam_overlays(module, images, targets, hparams, device)
    panels = []
    for j, i in enumerate(indices):
        label, pred = names[int(result.outputs.labels[i])], names[int(targets[j])]
        path = result.outputs.paths[i]
        short = path if len(path) <= 30 else "..." + path[-27:]
        caption = (
            f"{short}\ntrue {label}, predicted {pred}\n"
            f"p({pred}) {float(result.probs[i, int(targets[j])]):.3f}, loss {float(result.losses[i]):.2f}"
        )
        panels.append(
            {
                "image": images[j].permute(1, 2, 0).cpu().numpy(),
                "overlay": np.asarray(overlays[j]),
                "caption": caption,
                "wrong": label != pred,
            }
        )
    return panels


def section_figures(result: Any, title: str, panels: list[dict[str, Any]]) -> dict[str, bytes]:
    """PNG bytes of every figure of one evaluated split (an Assessment), keyed by file name."""
    from densenet_se.plots import confusion_matrix_image, figure_png, png_bytes

    m = result.metrics
    figures = {
        "roc.png": figure_png(roc_figure(m, result.curves, f"ROC, {title}"), tight=False),
        "pr.png": figure_png(pr_figure(m, result.curves, f"Precision-recall, {title}"), tight=False),
        "calibration.png": figure_png(
            calibration_figure(
                result.probs, result.outputs.labels, m, f"Reliability, {title}", result.probs_uncalibrated
            ),
            tight=False,
        ),
        "confusion_matrix.png": png_bytes(
            confusion_matrix_image(m["confusion_matrix"], m["class_names"], title)
        ),
    }
    if panels:
        figures["top_losses.png"] = top_losses_png(panels, f"The {len(panels)} highest-loss images, {title}")
    return figures
