"""Config errors: every range-checked key names itself and its allowed values in one line; a mistyped key
names the closest valid one."""

from __future__ import annotations

import copy
from dataclasses import fields

import pytest

from densenet_se import config
from densenet_se.config import (
    AugmentConfig,
    DataConfig,
    EmaConfig,
    ModelConfig,
    OptimConfig,
    TrainConfig,
    TuneConfig,
    closest_key,
    validate,
)
from densenet_se.errors import UserError
from test_train import compose_cfg, run_train

# key -> (an out-of-range value, the allowed values as the message states them)
BAD: dict[str, tuple[object, str]] = {
    "data.image_size": (16, "an integer >= 32"),
    "data.batch_size": (0, "an integer >= 1"),
    "data.val_fraction": (0.0, "a number in (0, 1)"),
    "data.test_fraction": (1.0, "a number in [0, 1)"),
    "data.num_workers": (-1, "an integer >= 0"),
    "data.max_image_pixels": (100, "an integer >= 1024"),
    "data.folds": (1, "0 (no folds) or an integer >= 2"),
    "data.fold": (-1, "an integer >= 0"),
    "model.growth_rate": (0, "an integer >= 1"),
    "model.num_init_features": (0, "an integer >= 1"),
    "model.bn_size": (0, "an integer >= 1"),
    "model.compression_rate": (0.0, "a number in (0, 1]"),
    "model.drop_rate": (1.0, "a number in [0, 1)"),
    "model.se_reduction": (0, "an integer >= 1"),
    "model.block_config": ([6, 0], "a non-empty list of integers >= 1"),
    "optim.lr": (0.0, "a number in (0, 10]"),
    "optim.weight_decay": (-0.1, "a number >= 0"),
    "optim.momentum": (1.0, "a number in [0, 1)"),
    "optim.warmup_epochs": (-1, "an integer >= 0"),
    "optim.label_smoothing": (1.0, "a number in [0, 1)"),
    "seed": (-1, "an integer in [0, 2**32)"),
    "trainer.max_epochs": (0, "an integer >= 1, or -1 for no limit"),
    "trainer.min_epochs": (-1, "an integer >= 0"),
    "trainer.max_steps": (-2, "an integer >= 1, or -1 for no limit"),
    "trainer.accumulate_grad_batches": (0, "an integer >= 1"),
    "trainer.check_val_every_n_epoch": (0, "an integer >= 1 (or null)"),
    "trainer.log_every_n_steps": (0, "an integer >= 1"),
    "trainer.num_sanity_val_steps": (-2, "an integer >= 0, or -1 for all"),
    "trainer.gradient_clip_val": (-1.0, "a number >= 0 (or null)"),
    "trainer.val_check_interval": (0, "a fraction in (0, 1] or a number of batches >= 1"),
    "trainer.limit_train_batches": (1.5, "a fraction in [0, 1] or a number of batches >= 0"),
    "trainer.limit_val_batches": (-1, "a fraction in [0, 1] or a number of batches >= 0"),
    "trainer.limit_test_batches": (-0.5, "a fraction in [0, 1] or a number of batches >= 0"),
}
# The recipe keys (checked beside their code: data/augment.py, data/mixing.py, ema.py, tune.py, finetune.py).
BAD_RECIPE: dict[str, tuple[object, str]] = {
    "augment.crop_scale_min": (0.0, "a number in (0, 1] (1: no random crop)"),
    "augment.hflip": (1.5, "a probability in [0, 1]"),
    "augment.vflip": (-0.1, "a probability in [0, 1]"),
    "augment.rotation": (200.0, "a number of degrees in [0, 180]"),
    "augment.brightness": (1.5, "a number in [0, 1]"),
    "augment.contrast": (-0.1, "a number in [0, 1]"),
    "augment.saturation": (2.0, "a number in [0, 1]"),
    "augment.hue": (0.6, "a number in [0, 0.5]"),
    "augment.magnitude": (-1, "an integer >= 0 (and below augment.magnitude_bins)"),
    "augment.num_ops": (0, "an integer >= 1"),
    "augment.magnitude_bins": (1, "an integer >= 2"),
    "augment.mixup_alpha": (-0.5, "a number >= 0 (0: no MixUp; 0.2-0.4 is usual)"),
    "augment.cutmix_alpha": (-1.0, "a number >= 0 (0: no CutMix; 1.0 is usual)"),
    "augment.mix_prob": (1.5, "a probability in [0, 1]"),
    "ema.decay": (1.0, "a number in (0, 1), e.g. 0.999"),
    "tune.min_lr": (0.0, "a number in (0, 10]"),
    "tune.max_lr": (20.0, "a number in (0, 10]"),
    "tune.num_training": (10, "an integer >= 20 (the suggestion skips the first 10 steps)"),
    "optim.freeze_epochs": (-1, "an integer >= 0 (0: the backbone is never frozen)"),
    "optim.backbone_lr_mult": (1.5, "a number in [0, 1] (1: one learning rate for all)"),
}
BAD_RECIPE_CHOICE: dict[str, tuple[str, str]] = {
    "augment.policy": ("heavy", "none, light, strong, custom"),
    "augment.auto": ("autoaugment", "none, randaugment, trivialaugment"),
}
BAD_CHOICE: dict[str, tuple[str, str]] = {
    "data.cache": ("gpu", "none, memory, disk, device"),
    "data.on_bad_file": ("ignore", "skip, error"),
    "model.se_placement": ("tail", "head, blocks, none"),
    "optim.optimizer": ("rmsprop", "adam, adamw, sgd"),
    "optim.scheduler": ("linear", "none, cosine, step, plateau"),
}
# Numeric keys without a range, and why.
UNCHECKED = {"data.split_seed": "any integer seeds the split"}


@pytest.fixture(scope="module")
def base_cfg(tmp_path_factory):
    return compose_cfg(tmp_path_factory.mktemp("cfg"), ["model=densenet_tiny_se"])


def test_every_range_and_choice_is_tested():
    assert set(BAD) == set(config._RANGES)
    assert set(BAD_CHOICE) == set(config._CHOICES)
    recipe_choices, recipe_ranges, _ = config._recipe_checks()
    assert set(BAD_RECIPE) == set(recipe_ranges) and set(BAD_RECIPE_CHOICE) == set(recipe_choices)


def test_every_numeric_key_is_range_checked():
    for prefix, schema in (
        ("data.", DataConfig),
        ("model.", ModelConfig),
        ("optim.", OptimConfig),
        ("", TrainConfig),
        ("augment.", AugmentConfig),
        ("ema.", EmaConfig),
        ("tune.", TuneConfig),
    ):
        for f in fields(schema):
            if f.type in ("int", "float", int, float):
                key = prefix + f.name
                assert key in BAD or key in BAD_RECIPE or key in UNCHECKED, f"{key} has no range check"


@pytest.mark.parametrize("key", sorted(BAD | BAD_RECIPE))
def test_out_of_range_values_name_the_key_and_the_range(base_cfg, key):
    cfg = copy.deepcopy(base_cfg)
    value, words = (BAD | BAD_RECIPE)[key]
    config.OmegaConf.update(cfg, key, value, force_add=True)
    with pytest.raises(UserError) as err:
        validate(cfg)
    assert str(err.value) == f"{key}={value} is out of range; it must be {words}."


@pytest.mark.parametrize("key", sorted(BAD_CHOICE | BAD_RECIPE_CHOICE))
def test_unknown_choices_list_the_allowed_ones(base_cfg, key):
    cfg = copy.deepcopy(base_cfg)
    value, allowed = (BAD_CHOICE | BAD_RECIPE_CHOICE)[key]
    config.OmegaConf.update(cfg, key, value)
    with pytest.raises(UserError) as err:
        validate(cfg)
    assert str(err.value) == f"{key}={value!r} is not allowed; choose one of: {allowed}."


def test_a_string_where_a_number_belongs_is_a_range_error(base_cfg):
    cfg = copy.deepcopy(base_cfg)
    cfg.trainer.max_epochs = "ten"
    with pytest.raises(
        UserError, match=r"^trainer.max_epochs='ten' is out of range; it must be an integer >= 1"
    ):
        validate(cfg)


def test_good_values_pass(base_cfg):
    cfg = copy.deepcopy(base_cfg)
    for key, value in {
        "trainer.max_epochs": -1,
        "trainer.val_check_interval": 0.25,
        "trainer.limit_train_batches": 3,
        "trainer.num_sanity_val_steps": -1,
        "data.folds": 5,
        "data.fold": 4,
    }.items():
        config.OmegaConf.update(cfg, key, value)
    validate(cfg)


def _typos(name: str) -> list[str]:
    typos = [name + name[-1], name[:-1] if len(name) > 3 else name + "s"]
    if len(name) >= 4:
        typos.append(name[0] + name[2] + name[1] + name[3:])  # two letters swapped
    return typos


def test_a_mistyped_key_names_the_closest_valid_one():
    keys = [
        f"{p}{f.name}"
        for p, s in (("data.", DataConfig), ("model.", ModelConfig), ("optim.", OptimConfig))
        for f in fields(s)
    ]
    keys += [f.name for f in fields(TrainConfig) if f.name not in ("data", "model", "optim")]
    keys += ["trainer.max_epochs", "trainer.accumulate_grad_batches", "trainer.precision", "trainer.devices"]
    for key in keys:
        group, _, name = key.rpartition(".")
        for typo in _typos(name):
            wrong = f"{group}.{typo}" if group else typo
            if wrong not in keys:  # data.folds minus its last letter is data.fold, a key of its own
                assert closest_key(wrong) == key, (wrong, closest_key(wrong))


def test_command_line_range_error_is_one_line(tmp_path):
    proc = run_train(["trainer.accumulate_grad_batches=0", f"hydra.run.dir={tmp_path}/run"], cwd=tmp_path)
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert (
        lines[-1] == "error: trainer.accumulate_grad_batches=0 is out of range; it must be an integer >= 1."
    )
    assert "Traceback" not in proc.stderr
