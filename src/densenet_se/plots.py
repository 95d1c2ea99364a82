"""Figures a run leaves: training curves, a labelled sample grid and confusion matrices."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and cluster nodes
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from densenet_se.io import atomic_write_bytes  # noqa: E402
from densenet_se.names import display_name  # noqa: E402


def figure_png(fig: Figure, dpi: int = 110, tight: bool = True) -> bytes:
    """A figure rendered as PNG bytes; closes it. tight=False skips the extra layout pass (fixed margins)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight" if tight else None)
    plt.close(fig)
    return buffer.getvalue()


def save_figure(fig: Figure, path: str | Path, dpi: int = 110) -> bytes:
    """Write a figure as PNG atomically, close it, and return the PNG bytes."""
    png = figure_png(fig, dpi)
    atomic_write_bytes(path, png)
    return png


def png_to_array(png: bytes) -> np.ndarray:
    """RGB uint8 [3, H, W] of PNG bytes (for TensorBoard images)."""
    from PIL import Image

    with Image.open(io.BytesIO(png)) as im:
        return np.ascontiguousarray(np.asarray(im.convert("RGB")).transpose(2, 0, 1))


def curves_figure(epochs: Sequence[dict]) -> Figure:
    """The notebook's two panels: accuracy and loss, train vs validation, per epoch."""
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(11, 4))
    x = [row["epoch"] + 1 for row in epochs]
    for ax, metric, title in ((ax_acc, "acc", "Accuracy"), (ax_loss, "loss", "Loss")):
        for stage, style in (("train", "-o"), ("val", "-s")):
            points = [(e, row.get(f"{stage}_{metric}")) for e, row in zip(x, epochs, strict=True)]
            points = [(e, v) for e, v in points if v is not None]
            if points:
                ax.plot(
                    *zip(*points, strict=True),
                    style,
                    markersize=3,
                    label="train" if stage == "train" else "validation",
                )
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend()
    ax_acc.set_ylim(0, 1.02)
    fig.tight_layout()
    return fig


def sample_grid_figure(images: np.ndarray, labels: Sequence[int], class_names: Sequence[str]) -> Figure:
    """A labelled grid of uint8 images shaped [N, 3, H, W]."""
    n = len(images)
    cols = min(8, n)
    rows = max(1, math.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.8 * rows), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < n:
            ax.imshow(np.transpose(images[i], (1, 2, 0)))
            # parse_math=False: a class named like "$x$" is a folder name, not a formula.
            ax.set_title(display_name(class_names[int(labels[i])]), fontsize=8, parse_math=False)
    fig.tight_layout()
    return fig


def confusion_matrix_figure(
    matrix: Sequence[Sequence[int]], class_names: Sequence[str], title: str
) -> Figure:
    """Counts with row-normalised shading (rows: true class, columns: predicted)."""
    counts = np.asarray(matrix, dtype=np.int64)
    totals = counts.sum(axis=1, keepdims=True)
    shade = np.divide(counts, np.maximum(totals, 1))
    k = len(class_names)
    size = max(3.5, 0.6 * k + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(shade, cmap="Blues", vmin=0, vmax=1)
    shown = [display_name(name) for name in class_names]
    ax.set_xticks(range(k), shown, rotation=45, ha="right", parse_math=False)
    ax.set_yticks(range(k), shown, parse_math=False)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(display_name(title), parse_math=False)
    if k <= 30:
        for i in range(k):
            for j in range(k):
                ax.text(
                    j,
                    i,
                    str(counts[i, j]),
                    ha="center",
                    va="center",
                    color="white" if shade[i, j] > 0.5 else "black",
                    fontsize=9,
                )
    fig.tight_layout()
    return fig


def figure_to_array(fig: Figure) -> np.ndarray:
    """RGB uint8 [3, H, W] of a figure (for TensorBoard images), closing it."""
    fig.canvas.draw()
    rgba = np.asarray(fig.canvas.buffer_rgba())
    plt.close(fig)
    return np.ascontiguousarray(rgba[..., :3].transpose(2, 0, 1))
