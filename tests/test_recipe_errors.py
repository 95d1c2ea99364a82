"""Bad recipe values from the command line: one sentence on stderr, exit status 2, nothing written."""

from __future__ import annotations

import pytest

from helpers.runs import run_cli


@pytest.mark.slow
@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("augment=heavy", "augment=heavy is not a known option; choose one of: custom, light, none, strong."),
        (
            "augment.auto=autoaugment",
            "augment.auto='autoaugment' is not allowed; choose one of: none, randaugment, trivialaugment.",
        ),
        (
            "augment.mixup_alpha=-0.2",
            "augment.mixup_alpha=-0.2 is out of range; it must be a number >= 0 (0: no MixUp; 0.2-0.4 is usual).",
        ),
        ("augment.mix_prob=1.5", "augment.mix_prob=1.5 is out of range; it must be a probability in [0, 1]."),
        ("augment.vflip=2", "augment.vflip=2.0 is out of range; it must be a probability in [0, 1]."),
        (
            "augment.magnitude=31",
            "augment.magnitude=31 must be below augment.magnitude_bins=31 (RandAugment's strongest setting",
        ),
        ("ema.decay=1", "ema.decay=1.0 is out of range; it must be a number in (0, 1), e.g. 0.999."),
        ("optim.freeze_epochs=-1", "optim.freeze_epochs=-1 is out of range; it must be an integer >= 0"),
        ("data.augment=true", "data.augment=true is replaced by the augment group: use augment=light"),
        ("logger=neptune", "logger=neptune is not a known option; choose one of:"),
    ],
)
def test_bad_recipe_values_are_one_line_and_exit_2(tmp_path, monkeypatch, capsys, override, expected):
    monkeypatch.chdir(tmp_path)
    assert run_cli("train", [override, f"hydra.run.dir={tmp_path}/run"], monkeypatch) == 2
    lines = [line for line in capsys.readouterr().err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: {expected}"), lines
    assert not (tmp_path / "run" / "checkpoints").exists()
