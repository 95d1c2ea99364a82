"""benchmarks/recipes.py: the digits ImageFolder matches scikit-learn, the table's numbers match numpy, and a
tiny sweep runs end to end."""

from __future__ import annotations

import importlib.util
import json
import re

import numpy as np
import pytest
from PIL import Image

from helpers.config import ROOT, TINY


@pytest.fixture(scope="module")
def recipes():
    spec = importlib.util.spec_from_file_location("bench_recipes", ROOT / "benchmarks" / "recipes.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_digits_image_folder_is_scikit_learns_digits(recipes, tmp_path):
    from sklearn.datasets import load_digits

    root = recipes.write_digits(tmp_path / "digits", size=32)
    digits = load_digits()
    counts = {int(d.name): len(list(d.glob("*.png"))) for d in root.iterdir() if d.is_dir()}
    assert counts == dict(enumerate(np.bincount(digits.target).tolist()))
    with Image.open(root / str(digits.target[5]) / "digit_0005.png") as im:
        assert im.size == (32, 32) and im.mode == "RGB"
        small = np.asarray(im.convert("L").resize((8, 8), Image.Resampling.BOX), dtype=float)
    # Down again to 8x8, the picture is sklearn's (0..16 scaled to 0..255), up to the blur of resizing twice.
    assert np.corrcoef(small.ravel(), digits.images[5].ravel())[0, 1] > 0.9


def test_table_gives_mean_and_sample_std_per_recipe(recipes):
    runs = {"baseline": [0.8, 0.9, 0.85], "ema": [0.9, 0.95, 0.92]}
    results = {"digits": {k: [{"test_acc": v} for v in values] for k, values in runs.items()}}
    text = recipes.table(results, ["digits"])
    ema = next(line for line in text.splitlines() if line.startswith("| ema "))
    want = np.array(runs["ema"])
    assert f"{want.mean():.3f} ± {want.std(ddof=1):.3f} (n=3)" in ema
    assert f"{want.mean() - np.mean(runs['baseline']):+.3f}" in ema
    assert re.search(r"\| augment=light \| - \| - \|", text)  # not run: shown as missing, not as zero


@pytest.mark.slow
def test_a_tiny_sweep_runs_end_to_end(recipes, tmp_path):
    summary = recipes.main(
        [
            "--datasets", "digits", "--recipes", "baseline", "ema", "--seeds", "2", "--digits-epochs", "1",
            "--digits-per-class", "6", "--out", str(tmp_path), "--override", "trainer.limit_train_batches=1",
            *[o for o in TINY if o.startswith("model.")],
        ]
    )  # fmt: skip
    written = json.loads((tmp_path / "recipes.json").read_text())
    assert written["table"] == summary["table"] and set(written["results"]["digits"]) == {"baseline", "ema"}
    for rows in written["results"]["digits"].values():
        assert len(rows) == 2 and all(0.0 <= r["test_acc"] <= 1.0 for r in rows)
