"""Overrides as text: one key parser (resume, sweeps, folds) and one "did you mean" for every mistyped name."""

from __future__ import annotations

import pytest

from densenet_se.cli import describe
from densenet_se.errors import UserError
from densenet_se.overrides import closest, override_key, override_value
from densenet_se.train import trainer_kwargs
from helpers.config import compose_cfg, hydra_cfg


@pytest.mark.parametrize(
    ("override", "key", "value"),
    [
        ("data.fold=2", "data.fold", "2"),
        ("+trainer.precision=16-mixed", "trainer.precision", "16-mixed"),
        ("++seed=3", "seed", "3"),
        ("~data.groups", "data.groups", None),
        ("model=densenet_tiny_se", "model", "densenet_tiny_se"),
        ("hydra/launcher@hydra.launcher=slurm", "hydra/launcher", "slurm"),
        ("data.group_pattern='(\\d+)_a=b'", "data.group_pattern", "'(\\d+)_a=b'"),
    ],
)
def test_override_key_and_value(override, key, value):
    assert override_key(override) == key
    assert override_value(override) == value


def test_closest_suggests_only_a_near_name():
    assert closest("max_epoch", ["max_epochs", "min_epochs", "devices"]) == "max_epochs"
    assert closest("densenet_tiny", ["densenet121_se", "densenet_tiny_se"]) == "densenet_tiny_se"
    assert closest("xyz", ["max_epochs", "devices"]) is None


def test_an_added_trainer_key_with_a_typo_names_the_trainer_argument(tmp_path):
    cfg = compose_cfg(tmp_path, ["+trainer.acumulate_grad_batches=2"])
    with pytest.raises(UserError) as err:
        trainer_kwargs(cfg)
    assert str(err.value) == (
        "trainer.acumulate_grad_batches is not a Trainer argument; did you mean trainer.accumulate_grad_batches?"
    )


def test_an_unknown_config_group_option_names_the_closest_one():
    with pytest.raises(Exception) as info:
        hydra_cfg(["model=densenet_tiny"])
    assert describe(info.value) == (
        "model=densenet_tiny is not a known option; choose one of: densenet121_se, densenet_tiny_se. "
        "Did you mean model=densenet_tiny_se?"
    )
