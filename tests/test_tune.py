"""tune.lr_find=true: Lightning's range test writes its curve and suggestion, and applies it only when asked."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from densenet_se.config import validate
from densenet_se.errors import UserError
from densenet_se.train import run
from helpers.config import TINY, compose_cfg
from helpers.images import make_image_folder

FIND = [
    "tune.lr_find=true",
    "tune.num_training=24",
    "tune.min_lr=1e-5",
    "tune.max_lr=1.0",
    "print_config=false",
]


def steepest_descent_lr(lrs: list[float], losses: list[float | None]) -> float:
    """Lightning's documented rule, in numpy: the steepest negative slope of loss over lr, skipping the first 10
    and the last point."""
    lr, loss = np.array(lrs[10:-1]), np.array([np.nan if v is None else v for v in losses[10:-1]])
    finite = np.isfinite(loss)
    return float(lr[finite][np.argmin(np.gradient(loss[finite], lr[finite]))])


@pytest.mark.slow
@pytest.mark.parametrize("apply", [True, False])
def test_lr_find_writes_its_curve_and_applies_the_suggestion_only_when_asked(tmp_path, capsys, apply):
    images = make_image_folder(tmp_path / "images", {"a": 16, "b": 16})
    cfg = compose_cfg(tmp_path, [*TINY, f"data.root={images}", *FIND, f"tune.apply={apply}"])
    run(cfg)
    # Lightning's range test draws no progress bar of its own where training draws none (not a terminal).
    assert "Finding best initial lr" not in capsys.readouterr().err
    out = tmp_path / "run"
    assert (out / "lr_find.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    found = json.loads((out / "lr_find.json").read_text())
    assert found["steps"] == len(found["lr"]) == len(found["loss"]) and 12 <= found["steps"] <= 24
    assert 1e-5 <= found["lr"][0] < found["lr"][-1] <= 1.0
    suggested = found["suggested_lr"]
    assert suggested == pytest.approx(steepest_descent_lr(found["lr"], found["loss"]))
    assert found["applied"] is apply and found["configured_lr"] == 0.01
    hparams = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["hyper_parameters"]
    assert hparams["lr"] == (pytest.approx(suggested) if apply else 0.01)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["hparams"]["optim"]["lr"] == hparams["lr"]
    assert not list(out.glob(".lr_find*"))  # its temporary copy of the initial weights is gone


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["tune.min_lr=0.1", "tune.max_lr=0.01"], "tune.min_lr=0.1 must be below tune.max_lr=0.01"),
        (["trainer.devices=2"], "tune.lr_find=true runs on one device, not trainer.devices=2"),
        (["tune.num_training=5"], "tune.num_training=5 is out of range; it must be an integer >= 20"),
    ],
)
def test_bad_lr_find_settings_are_one_sentence(tmp_path, overrides, message):
    with pytest.raises(UserError, match=f"^{message}"):
        validate(compose_cfg(tmp_path, ["tune.lr_find=true", *overrides]))


def test_a_resumed_run_keeps_the_rate_its_first_session_applied(tmp_path):
    from densenet_se.tune import RESULT_FILE, resumed_lr

    (tmp_path / RESULT_FILE).write_text(json.dumps({"suggested_lr": 0.02, "applied": True}))
    assert resumed_lr(tmp_path) == 0.02
    (tmp_path / RESULT_FILE).write_text(json.dumps({"suggested_lr": 0.02, "applied": False}))
    assert resumed_lr(tmp_path) is None
    (tmp_path / RESULT_FILE).write_text("{not json")
    assert resumed_lr(tmp_path) is None
    assert OmegaConf.select(compose_cfg(tmp_path, []), "tune.lr_find") is False
