"""The run's pictures, drawn with NumPy and Pillow: what each pixel region holds."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
from PIL import Image

from densenet_se import plots


def test_blues_matches_matplotlibs_colour_map():
    import matplotlib

    shares = np.linspace(0, 1, 101)
    reference = np.rint(matplotlib.colormaps["Blues"](shares)[:, :3] * 255)
    assert np.abs(plots.blues(shares).astype(int) - reference).max() <= 2


def test_sample_grid_tiles_the_images_in_order_under_their_class_names():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (11, 3, 40, 40), dtype=np.uint8)
    labels = [i % 2 for i in range(11)]
    grid = plots.sample_grid(images, labels, ["Monkeypox", "Others"], cols=4, min_tile=96)
    scale, label_h, pad = 3, 16, 4  # 40 px tiles enlarged 3x (the first integer factor reaching 96 px)
    tile = 40 * scale
    assert grid.shape == (3 * (tile + label_h + pad) + pad, 4 * (tile + pad) + pad, 3)
    for i, image in enumerate(images):
        y = pad + (i // 4) * (tile + label_h + pad) + label_h
        x = pad + (i % 4) * (tile + pad)
        expected = np.kron(image.transpose(1, 2, 0), np.ones((scale, scale, 1), dtype=np.uint8))
        assert np.array_equal(grid[y : y + tile, x : x + tile], expected), i
        strip = grid[y - label_h : y, x : x + tile]
        assert (strip < 128).any(), f"no class name above tile {i}"
    assert (grid[-(tile + pad) :, pad + 3 * (tile + pad) :] == 255).all()  # the 12th cell stays empty


def test_confusion_matrix_cells_are_shaded_by_their_share_of_the_true_class():
    matrix = [[50, 20], [10, 60]]
    image = plots.confusion_matrix_image(matrix, ["Monkeypox", "Others"], "validation, epoch 3")
    shares = np.array(matrix) / np.array(matrix).sum(axis=1, keepdims=True)
    colours = plots.blues(shares)
    flat = image.reshape(-1, 3)
    for i in range(2):
        for j in range(2):
            cell = (flat == colours[i, j]).all(axis=1).sum()
            assert cell > 0.5 * 56 * 56, (i, j, cell)  # most of a 56 px cell (the count is drawn on it)
    assert image.shape[0] > 100 and image.shape[1] > 100


def test_confusion_matrix_of_many_classes_stays_readable():
    k = 40  # above 30 classes the counts are left out, the shading stays
    matrix = np.diag(np.arange(1, k + 1)).tolist()
    image = plots.confusion_matrix_image(matrix, [f"class {i}" for i in range(k)], "test")
    assert max(image.shape[:2]) < 1200
    dark = plots.blues(np.array([1.0]))[0]
    assert (image.reshape(-1, 3) == dark).all(axis=1).sum() >= k * 10 * 10  # the diagonal: 100 % shares


def test_curves_draw_both_series_and_skip_missing_values():
    epochs = [
        {"epoch": e, "train_acc": 0.5 + e / 20, "train_loss": 1 / (e + 1), "val_acc": None, "val_loss": None}
        if e == 2
        else {
            "epoch": e,
            "train_acc": 0.5 + e / 20,
            "train_loss": 1 / (e + 1),
            "val_acc": 0.6,
            "val_loss": 0.7,
        }
        for e in range(6)
    ]
    image = plots.curves_image(epochs)
    assert image.shape == (320, 880, 3)
    for colour in (plots.TRAIN_COLOUR, plots.VAL_COLOUR):
        near = (np.abs(image.astype(int) - colour).sum(axis=2) < 30).sum()
        assert near > 200, colour
    png = plots.png_bytes(image)
    with Image.open(io.BytesIO(png)) as im:
        assert im.size == (880, 320) and np.array_equal(np.asarray(im.convert("RGB")), image)


@pytest.mark.parametrize("lo, hi", [(0.0, 1.0), (0.031, 0.58), (2.0, 2.0), (-3.2, 17.9), (1e-4, 3e-4)])
def test_nice_ticks_cover_the_range_in_round_steps(lo, hi):
    ticks = plots.nice_ticks(lo, hi)
    assert ticks[0] <= lo and ticks[-1] >= hi and 2 <= len(ticks) <= 8
    steps = np.diff(ticks)
    assert np.allclose(steps, steps[0])
    mantissa = steps[0] / 10 ** math.floor(math.log10(steps[0]))
    assert any(math.isclose(mantissa, m, rel_tol=1e-6) for m in (1, 2, 2.5, 5))


@pytest.mark.slow
def test_the_pictures_need_no_matplotlib_and_matplotlib_figures_still_save(tmp_path):
    import subprocess
    import sys

    check = (
        "import sys; from densenet_se import plots; import numpy as np;"
        "plots.sample_grid(np.zeros((2, 3, 32, 32), np.uint8), [0, 1], ['a', 'b']);"
        "plots.confusion_matrix_image([[1, 0], [0, 1]], ['a', 'b'], 't'); plots.curves_image([]);"
        "print('matplotlib' in sys.modules);"
        "from densenet_se.plots import plt; fig = plt.figure(); fig.gca().plot([0, 1]);"
        f"png = plots.save_figure(fig, {str(tmp_path / 'f.png')!r}); print(png[:4] == b'\\x89PNG')"
    )
    out = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "True"]
