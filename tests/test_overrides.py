"""Overrides as text: one key parser (resume, sweeps, folds) and one "did you mean" for every mistyped name."""

from __future__ import annotations

import pytest

from densenet_se.cli import describe
from densenet_se.errors import UserError
from densenet_se.overrides import closest, comma_hint, override_key, override_value, quoting_hint
from densenet_se.train import trainer_kwargs
from helpers.config import compose_cfg, hydra_cfg
from helpers.runs import run_train


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
        "model=densenet_tiny is not a known option; choose one of: convnext_tiny, densenet121_se, densenet_tiny_se, efficientnet_b0, resnet50, torchvision. "
        "Did you mean model=densenet_tiny_se?"
    )


REGEX = r"(\d+)_.*"


def test_an_unparsable_override_gets_the_quoting_rule_and_an_example_that_parses(tmp_path):
    message = quoting_hint(f"data.group_pattern={REGEX}")
    assert message == (
        rf"cannot parse the override data.group_pattern={REGEX}: in a value, ( ) [ ] {{ }} = , ; ^ ~ ! # & < > "
        rf"and quotes are Hydra syntax, so quote a text value: key='value', e.g. "
        rf""""data.group_pattern='{REGEX}'" on the command line."""
    )
    example = message.split("e.g. ")[1].split(" on the command line")[0].strip('"')  # what the shell passes
    assert compose_cfg(tmp_path, [example]).data.group_pattern == REGEX
    assert quoting_hint("model.block_config=[1,").endswith("and write a list whole: key=[1,2].")


def test_a_comma_outside_a_sweep_names_its_three_meanings(tmp_path):
    with pytest.raises(Exception) as info:
        hydra_cfg(["experiment_name=a,b"])
    assert (
        describe(info.value)
        == comma_hint("experiment_name=a,b")
        == (
            "experiment_name=a,b has a comma, so it reads as several values: quote a text value "
            """("experiment_name='a,b'"), write a list as experiment_name=[a,b], or add -m to sweep over the values."""
        )
    )
    assert compose_cfg(tmp_path, ["experiment_name='a,b'"]).experiment_name == "a,b"


@pytest.mark.slow
@pytest.mark.subprocess
def test_train_py_prints_the_quoting_rule_for_an_unquoted_regex(tmp_path):
    proc = run_train([f"data.group_pattern={REGEX}", f"hydra.run.dir={tmp_path}/run"], cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == [f"error: {quoting_hint(f'data.group_pattern={REGEX}')}"], proc.stderr
    assert not (tmp_path / "run").exists()
