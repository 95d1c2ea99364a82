"""Pictures a run leaves: training curves, a labelled sample grid and confusion matrices.

Drawn with NumPy and Pillow into RGB uint8 arrays [H, W, 3] (the same array goes to the PNG file and to
TensorBoard): a few milliseconds each, where a matplotlib figure's layout and rendering took 0.1-1 s, so neither
the start of a run, nor an epoch, nor its end waits for a plotting library.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from densenet_se.io import atomic_write_bytes
from densenet_se.names import display_name

# matplotlib's "Blues" colour map (its 9 anchor colours), for shading 0..1.
_BLUES = np.array(
    [
        [247, 251, 255],
        [222, 235, 247],
        [198, 219, 239],
        [158, 202, 225],
        [107, 174, 214],
        [66, 146, 198],
        [33, 113, 181],
        [8, 81, 156],
        [8, 48, 107],
    ],
    dtype=np.float64,
)
TRAIN_COLOUR, VAL_COLOUR = (31, 119, 180), (255, 127, 14)  # matplotlib's first two line colours
_GRID, _TEXT, _WHITE = (225, 225, 225), (0, 0, 0), (255, 255, 255)


@lru_cache(maxsize=8)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _text_size(text: str, size: int) -> tuple[int, int]:
    left, top, right, bottom = _font(size).getbbox(text)
    return int(right - left), int(bottom - top)


def png_bytes(image: np.ndarray) -> bytes:
    """PNG bytes of an RGB uint8 array [H, W, 3]."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def save_png(image: np.ndarray, path: str | Path) -> bytes:
    """Write an RGB uint8 array [H, W, 3] as a PNG atomically; return the bytes."""
    png = png_bytes(image)
    atomic_write_bytes(path, png)
    return png


def blues(shade: np.ndarray) -> np.ndarray:
    """RGB uint8 colours of values in 0..1 on the "Blues" map (white to dark blue)."""
    x = np.clip(np.asarray(shade, dtype=np.float64), 0.0, 1.0) * (len(_BLUES) - 1)
    anchors = np.arange(len(_BLUES))
    channels = [np.interp(x, anchors, _BLUES[:, c]) for c in range(3)]
    return np.rint(np.stack(channels, axis=-1)).astype(np.uint8)


# ------------------------------------------------------------------------------------------------ samples
def sample_grid(
    images: np.ndarray, labels: Sequence[int], class_names: Sequence[str], cols: int = 8, min_tile: int = 96
) -> np.ndarray:
    """A labelled grid of uint8 images [N, 3, H, W]: tiles placed by NumPy, class names drawn by Pillow.

    Small images are enlarged by an integer factor (nearest neighbour) to at least `min_tile` pixels.
    """
    n, _, h, w = images.shape
    cols = max(1, min(cols, n))
    rows = max(1, math.ceil(n / cols))
    scale = max(1, math.ceil(min_tile / max(h, w)))
    th, tw, label_h, pad = h * scale, w * scale, 16, 4
    cell_h, cell_w = th + label_h + pad, tw + pad
    canvas = np.full((rows * cell_h + pad, cols * cell_w + pad, 3), 255, dtype=np.uint8)
    tiles = images.transpose(0, 2, 3, 1)
    if scale > 1:
        tiles = tiles.repeat(scale, axis=1).repeat(scale, axis=2)
    for i in range(n):
        y, x = pad + (i // cols) * cell_h + label_h, pad + (i % cols) * cell_w
        canvas[y : y + th, x : x + tw] = tiles[i]
    picture = Image.fromarray(canvas)
    draw = ImageDraw.Draw(picture)
    for i, label in enumerate(labels[:n]):
        name = _fit(_class_name(class_names, int(label)), tw, 11)
        width, _ = _text_size(name, 11)
        x = pad + (i % cols) * cell_w + (tw - width) // 2
        draw.text((x, pad + (i // cols) * cell_h + 1), name, fill=_TEXT, font=_font(11))
    return np.asarray(picture)


def _class_name(class_names: Sequence[str], label: int) -> str:
    # One printable line, whatever bytes the folder name holds (undecodable, newlines, tabs).
    return display_name(class_names[label]) if 0 <= label < len(class_names) else str(label)


def _fit(text: str, width: int, size: int) -> str:
    """`text`, shortened with an ellipsis until it fits `width` pixels."""
    if _text_size(text, size)[0] <= width:
        return text
    while len(text) > 1 and _text_size(text + "…", size)[0] > width:
        text = text[:-1]
    return text + "…"


# ------------------------------------------------------------------------------------------------ confusion
def confusion_matrix_image(
    matrix: Sequence[Sequence[int]], class_names: Sequence[str], title: str
) -> np.ndarray:
    """Counts with row-normalised shading (rows: true class, columns: predicted), as an RGB array."""
    counts = np.asarray(matrix, dtype=np.int64)
    k = len(counts)
    shade = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    names = [display_name(c) for c in class_names] if len(class_names) == k else [str(i) for i in range(k)]
    title = display_name(title)
    show_counts = k <= 30
    font = 13
    count_w = max(_text_size(str(int(v)), font)[0] for v in counts.flat) if k else 0
    cell = max(56, count_w + 16) if show_counts else max(8, 400 // max(k, 1))
    label_w = max([_text_size(n, font)[0] for n in names] + [0])
    vertical = show_counts and label_w > cell - 6  # column names that do not fit across a cell stand up
    top = 8 + _text_size(title, 15)[1] + 12
    left = 8 + 18 + label_w + 8  # caption "true", row names
    bottom_names = (label_w if vertical else _text_size("Ag", font)[1]) + 10
    width = max(left + k * cell + 12, 8 + _text_size(title, 15)[0] + 16)
    height = top + k * cell + bottom_names + 8 + 18 + 8  # column names, caption "predicted"
    canvas = np.full((height, width, 3), 255, dtype=np.uint8)
    colours = blues(shade)
    for i in range(k):
        for j in range(k):
            y, x = top + i * cell, left + j * cell
            canvas[y : y + cell, x : x + cell] = colours[i, j]
    picture = Image.fromarray(canvas)
    draw = ImageDraw.Draw(picture)
    draw.rectangle((left - 1, top - 1, left + k * cell, top + k * cell), outline=(90, 90, 90))
    draw.text((8, 8), title, fill=_TEXT, font=_font(15))
    for i, name in enumerate(names):
        tw, th = _text_size(name, font)
        draw.text((left - 8 - tw, top + i * cell + (cell - th) // 2 - 2), name, fill=_TEXT, font=_font(font))
        x = left + i * cell
        if vertical:
            _text_up(picture, name, x + (cell - th) // 2 - 2, top + k * cell + 6, font)
        else:
            draw.text((x + (cell - tw) // 2, top + k * cell + 6), name, fill=_TEXT, font=_font(font))
    if show_counts:
        for i in range(k):
            for j in range(k):
                text = str(int(counts[i, j]))
                tw, th = _text_size(text, font)
                colour = _WHITE if shade[i, j] > 0.5 else _TEXT
                y, x = top + i * cell, left + j * cell
                draw.text(
                    (x + (cell - tw) // 2, y + (cell - th) // 2 - 2), text, fill=colour, font=_font(font)
                )
    cw = _text_size("predicted", font)[0]
    draw.text((left + (k * cell - cw) // 2, height - 8 - 16), "predicted", fill=_TEXT, font=_font(font))
    _text_up(
        picture, "true", 8, top + (k * cell + _text_size("true", font)[0]) // 2, font, anchor_bottom=True
    )
    return np.asarray(picture)


def _text_up(picture: Image.Image, text: str, x: int, y: int, size: int, anchor_bottom: bool = False) -> None:
    """Draw `text` turned 90 degrees (reading upwards) with its top-left corner at (x, y) (bottom-left if
    `anchor_bottom`)."""
    tw, th = _text_size(text, size)
    strip = Image.new("RGB", (tw + 2, th + 6), _WHITE)
    ImageDraw.Draw(strip).text((0, -1), text, fill=_TEXT, font=_font(size))
    turned = strip.rotate(90, expand=True)
    picture.paste(turned, (x, y - turned.height if anchor_bottom else y))


# ------------------------------------------------------------------------------------------------ curves
def curves_image(epochs: Sequence[dict[str, Any]], scale: int = 2) -> np.ndarray:
    """The notebook's two panels, accuracy and loss, train vs validation per epoch, as an RGB array.

    Drawn `scale` times larger and reduced, which smooths the lines.
    """
    panel_w, panel_h = 440 * scale, 320 * scale
    canvas = Image.new("RGB", (2 * panel_w, panel_h), _WHITE)
    x = [int(row["epoch"]) + 1 for row in epochs]
    for p, (metric, title) in enumerate((("acc", "Accuracy"), ("loss", "Loss"))):
        series = {
            stage: [
                (e, float(row[f"{stage}_{metric}"]))
                for e, row in zip(x, epochs, strict=True)
                if row.get(f"{stage}_{metric}") is not None
            ]
            for stage in ("train", "val")
        }
        values = [v for points in series.values() for _, v in points]
        if metric == "acc":
            y_lo, y_hi = 0.0, 1.02
        else:
            y_lo, y_hi = (min(values), max(values)) if values else (0.0, 1.0)
        _panel(canvas, p * panel_w, panel_w, panel_h, scale, title, x, series, y_lo, y_hi)
    return np.asarray(
        canvas.resize((canvas.width // scale, canvas.height // scale), Image.Resampling.LANCZOS)
    )


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """About `count` round tick values (1, 2, 2.5 or 5 times a power of ten) covering lo..hi."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return [0.0]
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5, hi + 0.5
    raw = (hi - lo) / max(count - 1, 1)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw)
    first = math.floor(lo / step + 1e-9) * step
    ticks, value = [], first
    while value <= hi + step * 1e-9:
        ticks.append(round(value, 10))
        value += step
    if ticks[-1] < hi - 1e-12:
        ticks.append(round(value, 10))
    return ticks


def _panel(
    canvas: Image.Image,
    x0: int,
    w: int,
    h: int,
    s: int,
    title: str,
    epochs: list[int],
    series: dict[str, list[tuple[int, float]]],
    y_lo: float,
    y_hi: float,
) -> None:
    draw = ImageDraw.Draw(canvas)
    font, small = _font(14 * s), _font(11 * s)
    left, right, top, bottom = x0 + 58 * s, x0 + w - 14 * s, 30 * s, h - 44 * s
    yticks = nice_ticks(y_lo, y_hi) if title == "Loss" else [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    y_lo, y_hi = min(y_lo, yticks[0]), max(y_hi, yticks[-1])
    first, last = (min(epochs), max(epochs)) if epochs else (1, 1)
    step = max(1, math.ceil((last - first + 1) / 10))
    xticks = list(range(first, last + 1, step))
    span_x = max(last - first, 1)

    def px(e: float) -> float:
        pad = 0.04 * (right - left)
        return left + pad + (e - first) / span_x * (right - left - 2 * pad)

    def py(v: float) -> float:
        return bottom - (v - y_lo) / max(y_hi - y_lo, 1e-12) * (bottom - top)

    for v in yticks:
        draw.line((left, py(v), right, py(v)), fill=_GRID, width=s)
        label = f"{v:g}"
        tw = draw.textlength(label, font=small)
        draw.text((left - 6 * s - tw, py(v) - 7 * s), label, fill=_TEXT, font=small)
    for e in xticks:
        draw.line((px(e), top, px(e), bottom), fill=_GRID, width=s)
        label = str(e)
        draw.text(
            (px(e) - draw.textlength(label, font=small) / 2, bottom + 5 * s), label, fill=_TEXT, font=small
        )
    draw.rectangle((left, top, right, bottom), outline=(60, 60, 60), width=s)
    draw.text(((left + right - draw.textlength(title, font=font)) / 2, 6 * s), title, fill=_TEXT, font=font)
    caption = "epoch"
    draw.text(
        ((left + right - draw.textlength(caption, font=small)) / 2, bottom + 22 * s),
        caption,
        fill=_TEXT,
        font=small,
    )
    r = 3 * s
    for stage, colour in (("train", TRAIN_COLOUR), ("val", VAL_COLOUR)):
        points = [(px(e), py(v)) for e, v in series.get(stage, [])]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2 * s, joint="curve")
        for cx, cy in points:
            if stage == "train":
                draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
            else:
                draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=colour)
    # Legend in the upper right corner for loss (falls), lower right for accuracy (rises).
    lx = right - 110 * s
    ly = top + 8 * s if title == "Loss" else bottom - 50 * s
    draw.rectangle((lx, ly, right - 8 * s, ly + 42 * s), fill=_WHITE, outline=(200, 200, 200), width=s)
    for i, (name, colour) in enumerate((("train", TRAIN_COLOUR), ("validation", VAL_COLOUR))):
        y = ly + 12 * s + i * 18 * s
        draw.line((lx + 8 * s, y, lx + 30 * s, y), fill=colour, width=2 * s)
        draw.text((lx + 36 * s, y - 8 * s), name, fill=_TEXT, font=small)


# ------------------------------------------------------------------------------------------------ matplotlib
# For figures that need real axes (evaluation curves, the LR finder). matplotlib is imported on first use only
# (this module itself needs just NumPy and Pillow).
def __getattr__(name: str) -> Any:
    if name == "plt":  # `from densenet_se.plots import plt`: pyplot with the file-only Agg backend
        import matplotlib

        matplotlib.use("Agg")  # files only: no display on servers and cluster nodes
        import matplotlib.pyplot as plt

        return plt
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def figure_png(fig: Any, dpi: int = 110, tight: bool = True) -> bytes:
    """A matplotlib figure rendered as PNG bytes; closes it. tight=False skips the extra layout pass."""
    from densenet_se.plots import plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight" if tight else None)
    plt.close(fig)
    return buffer.getvalue()


def save_figure(fig: Any, path: str | Path, dpi: int = 110) -> bytes:
    """Write a matplotlib figure as PNG atomically, close it, and return the PNG bytes."""
    png = figure_png(fig, dpi)
    atomic_write_bytes(path, png)
    return png
