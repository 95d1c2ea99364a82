"""Config errors: every range-checked key names itself and its allowed values in one line; a mistyped key
names the closest valid one."""

from __future__ import annotations

import copy
from dataclasses import fields

import pytest

from densenet_se import config
from densenet_se.backbones.densenet_se import DenseNetSEConfig
from densenet_se.backbones.torchvision import TorchvisionConfig
from densenet_se.config import (
    AugmentConfig,
    DataConfig,
    EmaConfig,
    OptimConfig,
    TrainConfig,
    TuneConfig,
    closest_key,
    validate,
)
from densenet_se.data import ImageFolderDataModule
from densenet_se.errors import UserError
from densenet_se.models import DenseNetSE
from densenet_se.module import Classifier
from helpers.config import compose_cfg
from helpers.runs import run_train

# key -> (an out-of-range value, the allowed values as the message states them)
BAD: dict[str, tuple[object, str]] = {
    "data.image_size": (5000, "an integer in [32, 4096]"),
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
    "model.block_config": ([6, 0], "a non-empty list of integers >= 1, at most 1000 layers in all"),
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
    "trainer.min_steps": (-1, "an integer >= 0"),
    "trainer.num_nodes": (0, "an integer >= 1"),
    "trainer.reload_dataloaders_every_n_epochs": (-1, "an integer >= 0"),
    "trainer.fast_dev_run": (-1, "true, false or an integer >= 0"),
    "trainer.overfit_batches": (1.5, "a fraction in [0, 1] or a number of batches >= 0"),
    "trainer.gradient_clip_val": (-1.0, "a number >= 0 (or null)"),
    "trainer.val_check_interval": (0, "a fraction in (0, 1] or a number of batches >= 1"),
    "trainer.limit_train_batches": (1.5, "a fraction in [0, 1] or a number of batches >= 0"),
    "trainer.limit_val_batches": (-1, "a fraction in [0, 1] or a number of batches >= 0"),
    "trainer.limit_test_batches": (-0.5, "a fraction in [0, 1] or a number of batches >= 0"),
    "print_config": (3, "compact, full or false (true: full)"),
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
    "data.source": ("parquet", "csv, folders"),
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
    rules = config.rules()
    assert set(BAD) | set(BAD_RECIPE) == {key for key, rule in rules.items() if not isinstance(rule, tuple)}
    assert {key: ", ".join(rule) for key, rule in rules.items() if isinstance(rule, tuple)} == {
        key: allowed for key, (_, allowed) in (BAD_CHOICE | BAD_RECIPE_CHOICE).items()
    }


def test_every_numeric_key_is_range_checked():
    for prefix, schema in (
        ("data.", DataConfig),
        ("model.", DenseNetSEConfig),
        ("model.", TorchvisionConfig),
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


@pytest.mark.slow
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


# group -> (the code that uses its values, built with one of them; what it raises; what its message lacks)
OWNERS = {
    "data": (lambda tmp, **kw: ImageFolderDataModule(root=str(tmp), **kw), UserError, ""),
    "model": (lambda tmp, **kw: DenseNetSE(2, **kw), ValueError, "model."),
    "optim": (lambda tmp, **kw: Classifier(2, model={"block_config": [1]}, **kw), UserError, ""),
}


@pytest.mark.parametrize("key", sorted(k for k in [*BAD, *BAD_CHOICE] if k.split(".")[0] in OWNERS))
def test_the_code_using_a_value_refuses_what_the_config_refuses_in_the_same_words(base_cfg, key, tmp_path):
    group, name = key.split(".", 1)
    build, error, prefix = OWNERS[group]
    cfg = copy.deepcopy(base_cfg)
    value = BAD[key][0] if key in BAD else BAD_CHOICE[key][0]
    config.OmegaConf.update(cfg, key, value)
    with pytest.raises(UserError) as from_config:
        validate(cfg)
    with pytest.raises(error) as from_owner:
        build(tmp_path, **{name: value})
    assert f"{prefix}{from_owner.value}" == str(from_config.value)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"data.val_fraction": 0.6, "data.test_fraction": 0.4},
            "data.val_fraction=0.6 plus data.test_fraction=0.4 must be below 1 so that some images are left "
            "for training.",
        ),
        ({"data.folds": 3, "data.fold": 3}, "data.fold=3 must be in 0..2 for data.folds=3."),
        ({"data.fold": 2}, "data.fold=2 needs data.folds, e.g. data.folds=5 data.fold=2."),
    ],
)
def test_rules_across_keys_are_the_splits_own(base_cfg, overrides, message):
    cfg = copy.deepcopy(base_cfg)
    for key, value in overrides.items():
        config.OmegaConf.update(cfg, key, value)
    with pytest.raises(UserError) as err:
        validate(cfg)
    assert str(err.value) == message


def test_a_string_where_a_number_belongs_is_a_range_error(base_cfg):
    cfg = copy.deepcopy(base_cfg)
    cfg.trainer.max_epochs = "ten"
    with pytest.raises(
        UserError, match=r"^trainer.max_epochs='ten' is out of range; it must be an integer >= 1"
    ):
        validate(cfg)


def _int_only_trainer_keys() -> list[str]:
    """The Trainer arguments Lightning types as int or Optional[int], from its own signature."""
    import inspect
    from typing import Optional

    import lightning as L

    params = inspect.signature(L.Trainer.__init__).parameters.items()
    return sorted(f"trainer.{name}" for name, p in params if p.annotation in (int, Optional[int]))  # noqa: UP045


@pytest.mark.parametrize("key", _int_only_trainer_keys())
@pytest.mark.parametrize("value", [1e3, 2.0, True])
def test_a_float_or_bool_where_a_trainer_integer_belongs_is_refused(base_cfg, key, value):
    cfg = copy.deepcopy(base_cfg)
    config.OmegaConf.update(cfg, key, value, force_add=True)
    with pytest.raises(UserError) as err:
        validate(cfg)
    assert str(err.value) == f"{key}={value} is out of range; it must be {BAD[key][1]}."


def test_max_epochs_1e3_on_the_command_line_is_one_sentence(tmp_path, monkeypatch, capsys):
    from helpers.runs import run_cli

    status = run_cli("train", ["trainer.max_epochs=1e3", f"hydra.run.dir={tmp_path}/run"], monkeypatch)
    err = capsys.readouterr().err
    assert status == 2 and "AssertionError" not in err
    assert err.strip().splitlines()[-1] == (
        "error: trainer.max_epochs=1000.0 is out of range; it must be an integer >= 1, or -1 for no limit."
    )


def test_good_values_pass(base_cfg):
    cfg = copy.deepcopy(base_cfg)
    for key, value in {
        "trainer.max_epochs": -1,
        "trainer.val_check_interval": 0.25,
        "trainer.limit_train_batches": 3,
        "trainer.num_sanity_val_steps": -1,
        "trainer.fast_dev_run": True,
        "trainer.overfit_batches": 0.5,
        "data.folds": 5,
        "data.fold": 4,
    }.items():
        config.OmegaConf.update(cfg, key, value, force_add=True)
    validate(cfg)


def _typos(name: str) -> list[str]:
    typos = [name + name[-1], name[:-1] if len(name) > 3 else name + "s"]
    if len(name) >= 4:
        typos.append(name[0] + name[2] + name[1] + name[3:])  # two letters swapped
    return typos


def test_a_mistyped_key_names_the_closest_valid_one():
    keys = [
        f"{p}{f.name}"
        for p, s in (
            ("data.", DataConfig),
            ("model.", DenseNetSEConfig),
            ("model.", TorchvisionConfig),
            ("optim.", OptimConfig),
        )
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


@pytest.mark.slow
@pytest.mark.subprocess
def test_command_line_range_error_is_one_line(tmp_path):
    proc = run_train(["trainer.accumulate_grad_batches=0", f"hydra.run.dir={tmp_path}/run"], cwd=tmp_path)
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert (
        lines[-1] == "error: trainer.accumulate_grad_batches=0 is out of range; it must be an integer >= 1."
    )
    assert "Traceback" not in proc.stderr
