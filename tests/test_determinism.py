"""Determinism: the same config and seed on CPU give the same metrics.json (timings and paths aside) and
bit-identical weights; another seed gives another run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from densenet_se.train import run
from helpers.config import TINY, compose_cfg
from helpers.images import make_image_folder

# Dropout, augmentation and a test split on: every random draw and every report field is compared.
ARGS = [*TINY, "model.drop_rate=0.2", "augment=light", "data.test_fraction=0.2", "print_config=false"]


def train(tmp_path: Path, images: Path, *extra: str) -> tuple[dict, dict]:
    """metrics.json without its timings and paths, and last.ckpt's weights, of one in-process run."""
    run(compose_cfg(tmp_path, [*ARGS, f"data.root={images}", *extra]))
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    for key in ("total_seconds", "best_checkpoint"):
        assert metrics.pop(key) is not None
    for row in metrics["epochs"]:
        assert row.pop("seconds") > 0
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    return metrics, ckpt["state_dict"]


@pytest.mark.slow
def test_same_config_and_seed_give_the_same_run(tmp_path):
    images = make_image_folder(tmp_path / "images", {"Monkeypox": 24, "Others": 24})
    first, first_weights = train(tmp_path / "a", images)
    second, second_weights = train(tmp_path / "b", images)
    assert [e["epoch"] for e in first["epochs"]] == [0, 1] and first["test"] is not None
    assert first == second
    assert first_weights.keys() == second_weights.keys()
    assert all(torch.equal(first_weights[k], second_weights[k]) for k in first_weights)

    other, _ = train(tmp_path / "c", images, "seed=7", "trainer.max_epochs=1")
    assert other["hparams"]["seed"] == 7
    assert other["epochs"][0]["train_loss"] != first["epochs"][0]["train_loss"]
