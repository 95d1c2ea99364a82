"""Augmentation policies: per-image draws on the device, each key doing what it says, presets, the old switch."""

from __future__ import annotations

import inspect
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from densenet_se.config import AugmentConfig
from densenet_se.data.augment import IMAGE_KEYS, TrainBatchTransform, augment_images, image_transform
from densenet_se.data.mixing import MIX_KEYS, batch_mix
from densenet_se.errors import UserError
from helpers.config import CONF, compose_cfg

S = 32


def _asymmetric(n: int) -> torch.Tensor:
    """n copies of an image whose left, right, top and bottom all differ: a ramp along x plus one along y."""
    ys, xs = torch.meshgrid(torch.linspace(0, 0.5, S), torch.linspace(0, 0.4, S), indexing="ij")
    return (ys + xs).expand(n, 3, S, S).clone()


def test_every_image_of_a_batch_gets_its_own_draw():
    # v2 called on a whole batch flips all images or none; here each image decides for itself.
    torch.manual_seed(0)
    batch = _asymmetric(64)
    out = augment_images(image_transform(S, hflip=0.5), batch)
    flipped = torch.tensor([torch.equal(o, b.flip(-1)) for o, b in zip(out, batch, strict=True)])
    kept = torch.tensor([torch.equal(o, b) for o, b in zip(out, batch, strict=True)])
    assert bool((flipped ^ kept).all())  # each image is exactly one of the two
    assert 16 <= int(flipped.sum()) <= 48  # Binomial(64, 0.5): far from all-or-none


def test_vertical_flip_is_its_own_key():
    batch = _asymmetric(4)
    assert torch.equal(augment_images(image_transform(S, vflip=1.0), batch), batch.flip(-2))
    assert torch.equal(augment_images(image_transform(S, hflip=1.0), batch), batch.flip(-1))


def test_rotation_fills_corners_by_reflection_not_black():
    torch.manual_seed(0)
    grey = torch.full((8, 3, S, S), 0.6)
    out = augment_images(image_transform(S, rotation=45.0), grey)
    assert out.shape == grey.shape and torch.allclose(out, grey, atol=1e-5)
    ramp = _asymmetric(8)
    assert not torch.allclose(augment_images(image_transform(S, rotation=45.0), ramp), ramp)


def test_crop_jitter_and_auto_policies_keep_shape_and_range():
    torch.manual_seed(0)
    batch = torch.rand(6, 3, S, S)
    for settings in (
        {"crop_scale_min": 0.3},
        {"brightness": 0.5, "contrast": 0.5, "saturation": 0.5, "hue": 0.2},
        {"auto": "randaugment", "magnitude": 15, "num_ops": 3},
        {"auto": "trivialaugment"},
    ):
        out = augment_images(image_transform(S, **settings), batch)
        assert out.shape == batch.shape and out.dtype == torch.float32, settings
        assert 0.0 <= float(out.min()) and float(out.max()) <= 1.0 and not torch.allclose(out, batch), (
            settings
        )
    (randaugment,) = image_transform(
        S, auto="randaugment", magnitude=15, num_ops=3, magnitude_bins=21
    ).transforms
    assert (randaugment.magnitude, randaugment.num_ops, randaugment.num_magnitude_bins) == (15, 3, 21)


def test_schema_defaults_change_nothing_and_match_the_builders():
    defaults = OmegaConf.to_container(OmegaConf.structured(AugmentConfig))
    assert image_transform(S, **{k: defaults[k] for k in IMAGE_KEYS}) is None
    assert batch_mix(2, **{k: defaults[k] for k in MIX_KEYS}) is None
    assert set(defaults) == {"policy", *IMAGE_KEYS, *MIX_KEYS}
    for builder, keys in ((image_transform, IMAGE_KEYS), (batch_mix, MIX_KEYS)):
        params = inspect.signature(builder).parameters
        assert {k: params[k].default for k in keys} == {k: defaults[k] for k in keys}, builder.__name__


def test_presets_compose(tmp_path):
    light = compose_cfg(tmp_path, ["augment=light"]).augment
    assert (light.policy, light.hflip, light.vflip, light.rotation, light.crop_scale_min) == (
        "light",
        0.5,
        0.0,
        15.0,
        0.8,
    )
    strong = compose_cfg(tmp_path, ["augment=strong", "augment.vflip=0.5"]).augment
    assert (strong.auto, strong.magnitude, strong.num_ops, strong.vflip) == ("randaugment", 9, 2, 0.5)
    custom = compose_cfg(tmp_path, ["augment=custom", "augment.mixup_alpha=0.2"]).augment
    assert custom.policy == "custom" and custom.mixup_alpha == 0.2 and custom.hflip == 0.0
    assert compose_cfg(tmp_path, []).augment == OmegaConf.structured(AugmentConfig)
    assert compose_cfg(tmp_path, ["experiment=notebook"]).augment.policy == "none"


def test_train_batches_are_augmented_normalised_and_mixed_validation_batches_untouched(tmp_path):
    from densenet_se.data import ImageFolderDataModule
    from densenet_se.data.images import normalize
    from helpers.images import make_tree

    root = make_tree(tmp_path / "data", {"a": 6, "b": 6, "c": 6}, size=40)
    settings = dict(OmegaConf.load(CONF / "augment" / "light.yaml"), mixup_alpha=0.4, cutmix_alpha=1.0)
    settings.pop("defaults")
    dm = ImageFolderDataModule(
        root=str(root), image_size=S, batch_size=8, cache_dir=str(tmp_path / "c"), augmentation=settings
    )
    dm.setup()
    images, labels = next(iter(dm.train_dataloader()))
    dm.trainer = SimpleNamespace(training=True, is_global_zero=True)
    torch.manual_seed(0)
    mixed, targets = dm.on_after_batch_transfer((images, labels), 0)
    assert mixed.shape == images.shape and mixed.dtype == torch.float32
    assert targets.shape == (len(labels), 3) and torch.allclose(targets.sum(1), torch.ones(len(labels)))
    # Every target puts weight on the image's own class (MixUp/CutMix blend it with its neighbour's).
    assert bool((targets.gather(1, labels[:, None]) > 0).all())
    dm.trainer = SimpleNamespace(training=False, is_global_zero=True, world_size=1, global_rank=0)
    val_images, val_labels = next(iter(dm.val_dataloader()))
    out, out_labels = dm.on_after_batch_transfer((val_images, val_labels), 0)
    assert torch.equal(out, normalize(val_images)) and torch.equal(out_labels, val_labels)
    identity = TrainBatchTransform(dict(OmegaConf.structured(AugmentConfig)), S, 3)
    assert identity.is_identity


def test_mix_prob_zero_gives_one_hot_targets_and_unmixed_images():
    mix = batch_mix(3, mixup_alpha=1.0, mix_prob=0.0)
    images, labels = torch.rand(4, 3, S, S), torch.tensor([0, 2, 1, 2])
    out, targets = mix(images, labels)
    assert torch.equal(out, images) and torch.equal(targets, torch.eye(3)[labels])


def test_the_retired_switch(tmp_path):
    from densenet_se.config import validate

    validate(compose_cfg(tmp_path, ["data.augment=false"]))  # still means "no augmentation"
    with pytest.raises(UserError) as err:
        validate(compose_cfg(tmp_path, ["data.augment=true"]))
    assert str(err.value) == (
        "data.augment=true is replaced by the augment group: use augment=light (flips, a small rotation and "
        "colour jitter; add augment.vflip=0.5 for vertical flips) and drop data.augment."
    )
    with pytest.raises(UserError, match=r"^data.augment=false contradicts augment=strong; drop data.augment"):
        validate(compose_cfg(tmp_path, ["data.augment=false", "augment=strong"]))
    with pytest.raises(UserError, match=r"this run was trained with data.augment=true, which this version"):
        validate(compose_cfg(tmp_path, ["data.augment=true", "resume=/old/run"]))
