"""Shared fixtures: tiny image folders and tiny training configs (32-64 px, a few batches, CPU)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"

# Tiny, fast, deterministic runs for every test that trains.
TINY = [
    "model=densenet_tiny_se",
    "model.growth_rate=4",
    "model.block_config=[1,1]",
    "model.num_init_features=8",
    "model.se_reduction=2",
    "data.image_size=32",
    "data.batch_size=8",
    "trainer=cpu",
    "trainer.max_epochs=2",
    "trainer.num_sanity_val_steps=0",
    "trainer.log_every_n_steps=1",
    "optim.lr=0.01",
    # The end-of-run report.html costs about a second of figures; tests/test_trust.py turns it on.
    "best_report=false",
]


def make_image_folder(
    root: Path, classes: dict[str, int] | None = None, size: int = 40, seed: int = 0, ext: str = "png"
) -> Path:
    """An ImageFolder tree whose classes differ by a learnable pattern (bright disc vs. stripes)."""
    classes = classes or {"Monkeypox": 12, "Others": 12}
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    for c, (name, count) in enumerate(classes.items()):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            base = rng.integers(60, 160, size=3)
            img = np.ones((size, size, 3)) * base
            if c % 2 == 0:
                cy, cx = rng.integers(size // 4, 3 * size // 4, size=2)
                img[(yy - cy) ** 2 + (xx - cx) ** 2 < (size // 5) ** 2] = 240
            else:
                img[:, (xx[0] // max(2, c + 1)) % 2 == 0] = 20
            img += rng.normal(0, 8, img.shape)
            Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(folder / f"{name.lower()}_{i:03d}.{ext}")
    return root


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    return make_image_folder(tmp_path / "images")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Tests never touch the user's cache.
    monkeypatch.setenv("DENSENET_SE_CACHE", str(tmp_path / "cache"))


def subprocess_env() -> dict[str, str]:
    """Environment for `python train.py ...` subprocesses: no terminal tricks, quiet progress."""
    env = dict(os.environ)
    env.pop("HYDRA_FULL_ERROR", None)
    env["PYTHONUNBUFFERED"] = "1"
    env["MPLBACKEND"] = "Agg"
    return env


def split_files(split_json: Path, name: str) -> list:
    """The [relative path, label] entries of one split in a run's split.json."""
    import json

    return json.loads(Path(split_json).read_text())[name]


def class_files(counts: list[int]) -> tuple[list[str], list[int]]:
    """Relative paths and labels of `counts[c]` files per class c (for split tests that need no images)."""
    files, labels = [], []
    for label, n in enumerate(counts):
        files += [f"c{label}/img_{i:04d}.jpg" for i in range(n)]
        labels += [label] * n
    return files, labels
