"""Augmentation policies: per-image draws for whole batches, each key doing what v2's transform does, presets.

Each stage is compared image by image with torchvision.transforms.v2's own functions given the same draw, and
its draws with v2's distributions (scipy's tests, fixed seeds).
"""

from __future__ import annotations

import importlib.util
import inspect
import itertools
import math
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf
from scipy import stats
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from densenet_se.config import AugmentConfig
from densenet_se.data import augment_ops
from densenet_se.data.augment import IMAGE_KEYS, TrainBatchTransform, image_augment
from densenet_se.data.augment_auto import OPERATIONS, POLICY_CLASSES, AutoDraw, RandomAuto
from densenet_se.data.augment_stages import GeometryDraw, RandomColor, RandomGeometry
from densenet_se.data.mixing import MIX_KEYS, batch_mix
from densenet_se.errors import UserError
from helpers.config import CONF, ROOT, compose_cfg

S = 32
BILINEAR = v2.InterpolationMode.BILINEAR


def _asymmetric(n: int) -> torch.Tensor:
    """n copies of an image whose left, right, top and bottom all differ: a ramp along x plus one along y."""
    ys, xs = torch.meshgrid(torch.linspace(0, 0.5, S), torch.linspace(0, 0.4, S), indexing="ij")
    return (ys + xs).expand(n, 3, S, S).clone()


def _photos(n: int, seed: int = 0) -> torch.Tensor:
    """n smooth colour images in 0..1 (noise upsampled, so resampling errors stay small, as on photographs)."""
    coarse = torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))
    return torch.nn.functional.interpolate(coarse, size=(S, S), mode="bilinear", align_corners=False)


def test_every_image_of_a_batch_gets_its_own_draw():
    # v2 called on a whole batch flips all images or none; here each image decides for itself.
    torch.manual_seed(0)
    batch = _asymmetric(64)
    out = image_augment(hflip=0.5)(batch.clone())
    flipped = torch.tensor([torch.equal(o, b.flip(-1)) for o, b in zip(out, batch, strict=True)])
    kept = torch.tensor([torch.equal(o, b) for o, b in zip(out, batch, strict=True)])
    assert bool((flipped ^ kept).all())  # each image is exactly one of the two
    assert 16 <= int(flipped.sum()) <= 48  # Binomial(64, 0.5): far from all-or-none
    # Identical images under every stage: no two outputs alike.
    policy = dict(crop_scale_min=0.5, rotation=20.0, brightness=0.2, hue=0.1, auto="trivialaugment")
    twins = image_augment(**policy)(_photos(1).expand(16, -1, -1, -1).clone())
    distances = torch.cdist(twins.flatten(1), twins.flatten(1))
    assert float(distances[~torch.eye(16, dtype=torch.bool)].min()) > 1e-3


def test_flips_are_exact_and_each_key_flips_its_own_axis():
    batch = _asymmetric(4)
    assert torch.equal(image_augment(vflip=1.0)(batch.clone()), batch.flip(-2))
    assert torch.equal(image_augment(hflip=1.0)(batch.clone()), batch.flip(-1))
    assert torch.equal(image_augment(hflip=1.0, vflip=1.0)(batch.clone()), batch.flip(-1).flip(-2))
    # With a crop or a rotation on, the flips are part of the one resampling matrix: still each its own axis.
    tiny = image_augment(hflip=1.0, rotation=1e-4)(batch.clone())
    assert torch.allclose(tiny, batch.flip(-1), atol=1e-4)
    tiny = image_augment(vflip=1.0, rotation=1e-4)(batch.clone())
    assert torch.allclose(tiny, batch.flip(-2), atol=1e-4)


def test_resampling_with_nothing_drawn_is_the_identity():
    # crop_scale_min=1 and a rotation of at most 1e-4 degrees: the resampling path, nothing to see.
    batch = _photos(8)
    out = image_augment(rotation=1e-4)(batch.clone())
    assert torch.allclose(out, batch, atol=1e-5)


def _drawn(stage, seed: int, n: int = 16):
    """(a batch of photos, the stage's draw for it, the stage's output with that draw)."""
    torch.manual_seed(seed)
    batch = _photos(n)
    draw = stage.draw(batch)
    return batch, draw, stage.apply(batch, draw)


def test_crop_is_v2_resized_crop_of_the_drawn_box():
    batch, draw, out = _drawn(RandomGeometry(0.3, 0.0, 0.0, 0.0), seed=1)
    assert bool((draw.height * draw.width < 0.9 * S * S).any())  # real crops were drawn
    for i in range(len(batch)):
        box = [int(draw.top[i]), int(draw.left[i]), int(draw.height[i]), int(draw.width[i])]
        ref = TF.resized_crop(batch[i], *box, size=[S, S], interpolation=BILINEAR, antialias=True)
        # v2 clamps at the crop's edge where we sample the image just outside it: compare inside 3 pixels.
        assert torch.allclose(out[i, :, 3:-3, 3:-3], ref[:, 3:-3, 3:-3], atol=1e-5), box


def test_rotation_is_v2_rotate_with_corners_mirrored_not_black():
    batch, draw, out = _drawn(RandomGeometry(1.0, 0.0, 0.0, 45.0), seed=2)
    inside = (slice(None), slice(8, -8), slice(8, -8))  # within S/4 of the centre: never outside the image
    for i in range(len(batch)):
        ref = TF.rotate(batch[i], float(draw.angle[i]), interpolation=BILINEAR)
        assert torch.allclose(out[i][inside], ref[inside], atol=1e-5), float(draw.angle[i])
    grey = torch.full((8, 3, S, S), 0.6)
    assert torch.allclose(image_augment(rotation=45.0)(grey), grey, atol=1e-5)
    bright = _photos(8) * 0.5 + 0.5  # every pixel >= 0.5: a black corner would show as < 0.5
    assert float(image_augment(rotation=45.0)(bright).amin()) >= 0.5 - 1e-5


def test_crop_flips_and_rotation_compose_in_v2_order():
    # crop -> hflip -> vflip -> rotation by 90 degrees (v2 rotates a square by 90 exactly, with rot90).
    batch = _photos(4)
    n = len(batch)
    draw = GeometryDraw(
        top=torch.tensor([2.0, 0.0, 5.0, 1.0]),
        left=torch.tensor([3.0, 6.0, 0.0, 2.0]),
        height=torch.tensor([24.0, 20.0, 27.0, 30.0]),
        width=torch.tensor([20.0, 26.0, 27.0, 22.0]),
        hflip=torch.tensor([True, False, True, False]),
        vflip=torch.tensor([False, False, True, True]),
        angle=torch.full((n,), 90.0),
    )
    out = RandomGeometry(0.5, 0.5, 0.5, 90.0).apply(batch, draw)
    for i in range(n):
        box = [int(draw.top[i]), int(draw.left[i]), int(draw.height[i]), int(draw.width[i])]
        ref = TF.resized_crop(batch[i], *box, size=[S, S], interpolation=BILINEAR, antialias=True)
        ref = TF.horizontal_flip(ref) if draw.hflip[i] else ref
        ref = TF.vertical_flip(ref) if draw.vflip[i] else ref
        ref = TF.rotate(ref, 90.0, interpolation=BILINEAR)
        assert torch.allclose(out[i, :, 3:-3, 3:-3], ref[:, 3:-3, 3:-3], atol=1e-5), i


def test_crop_boxes_follow_v2_random_resized_crop():
    # The same distribution as v2's 10 tries and fallback: scipy's two-sample KS test against v2's sampler.
    torch.manual_seed(3)
    mine = RandomGeometry(0.3, 0.0, 0.0, 0.0).draw(torch.empty(4000, 3, S, S))
    theirs = v2.RandomResizedCrop(S, scale=(0.3, 1.0))
    boxes = torch.tensor([list(theirs.make_params([torch.empty(3, S, S)]).values()) for _ in range(2000)])
    top, left, height, width = boxes.double().unbind(1)
    pairs = {
        "area": (mine.height * mine.width, height * width),
        "aspect": (mine.width / mine.height, width / height),
        "top": ((mine.top + 0.5) / (S - mine.height + 1), (top + 0.5) / (S - height + 1)),
        "left": ((mine.left + 0.5) / (S - mine.width + 1), (left + 0.5) / (S - width + 1)),
    }
    for name, (a, b) in pairs.items():
        assert stats.ks_2samp(a.numpy(), b.numpy()).pvalue > 1e-3, name
    assert float((mine.height * mine.width).min()) >= 0.3 * S * S - S  # at least the share, to a rounding
    assert float(mine.height.max()) <= S and float(mine.width.max()) <= S


def test_rotation_angles_and_flip_rates():
    torch.manual_seed(4)
    draw = RandomGeometry(1.0, 0.3, 0.0, 15.0).draw(torch.empty(2000, 3, S, S))
    assert stats.kstest(draw.angle.numpy(), stats.uniform(-15.0, 30.0).cdf).pvalue > 1e-3
    assert stats.binomtest(int(draw.hflip.sum()), 2000, 0.3).pvalue > 1e-3
    assert not bool(draw.vflip.any())  # vflip=0 never flips vertically


def _jitter_reference(image: torch.Tensor, factors: list[float], order: list[int]) -> torch.Tensor:
    adjust = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    for op in order:
        image = adjust[op](image, factors[op])
    return image


def test_colour_jitter_is_v2_adjustments_in_each_images_own_order(select_path):
    batch, draw, out = _drawn(RandomColor(0.4, 0.4, 0.4, 0.2), seed=5, n=32)
    assert len({tuple(o) for o in draw.order.tolist()}) > 8  # many different orders in one batch
    for i in range(len(batch)):
        ref = _jitter_reference(batch[i], draw.factors[i].tolist(), draw.order[i].tolist())
        assert torch.allclose(out[i], ref, atol=1e-5), (draw.factors[i], draw.order[i])
    # Only the adjustments that are on take part in the order.
    assert set(RandomColor(0.1, 0.0, 0.2, 0.0).draw(batch).order.flatten().tolist()) == {0, 2}


@pytest.mark.parametrize(
    "key,strength", [("brightness", 0.1), ("brightness", 1.5), ("contrast", 0.3), ("hue", 0.2)]
)
def test_jitter_factors_are_uniform_on_v2_ranges(key, strength):
    # brightness=1.5 is beyond the key's range (at most 1): the stage itself follows v2, no factor below 0.
    torch.manual_seed(6)
    settings = dict.fromkeys(("brightness", "contrast", "saturation", "hue"), 0.0) | {key: strength}
    stage = RandomColor(**settings)
    column = ("brightness", "contrast", "saturation", "hue").index(key)
    factors = stage.draw(torch.empty(2000, 3, S, S)).factors[:, column].numpy()
    low, high = (-strength, strength) if key == "hue" else (max(0.0, 1.0 - strength), 1.0 + strength)
    assert low <= factors.min() and factors.max() <= high
    assert stats.kstest(factors, stats.uniform(low, high - low).cdf).pvalue > 1e-3
    if key == "brightness":  # measured on the pixels: a grey image comes out as grey times the factor
        torch.manual_seed(6)
        grey = torch.full((2000, 3, 4, 4), 0.4)
        out = stage(grey)[:, 0, 0, 0].numpy()
        assert abs(out / 0.4 - factors).max() < 1e-5  # 0.4 x 2.5 = 1: never clamped


def test_jitter_orders_are_uniform_permutations():
    torch.manual_seed(7)
    order = RandomColor(0.1, 0.1, 0.1, 0.0).draw(torch.empty(3000, 3, 2, 2)).order.tolist()
    perms = list(itertools.permutations([0, 1, 2]))
    counts = [sum(tuple(o) == p for o in order) for p in perms]
    assert stats.chisquare(counts).pvalue > 1e-3


AUTO_TRANSFORMS = {"randaugment": v2.RandAugment, "trivialaugment": v2.TrivialAugmentWide}


@pytest.fixture(params=["subsets", "whole batch"])
def select_path(request, monkeypatch):
    """Both ways an op reaches the images that drew it: the CPU's subsets, and a GPU's whole-batch select."""
    if request.param == "whole batch":
        monkeypatch.setattr(augment_ops, "reads_are_free", lambda device: False)
    return request.param


@pytest.mark.parametrize("policy", list(AUTO_TRANSFORMS))
def test_every_auto_operation_is_v2s_at_every_strength(policy, select_path):
    stage = RandomAuto(policy)
    reference = AUTO_TRANSFORMS[policy](interpolation=BILINEAR)
    table, signed = stage._table(S, S, torch.device("cpu"))
    assert stage.names == list(reference._AUGMENTATION_SPACE)
    cases = [
        (k, float(table[k, level]) * sign)
        for k in range(len(stage.names))
        for level, sign in itertools.product((0, 9, 30), (1.0, -1.0) if signed[k] else (1.0,))
    ]
    # Each case on a photo, a flat image (autocontrast and equalize leave it) and a grey one, all in one batch
    # (so every operation meets the others, as real draws do); then a second step giving every image another.
    batch = _photos(3 * len(cases))
    batch[1::3] = 0.5
    batch[2::3] = batch[2::3, :1]
    first = [case for case in cases for _ in range(3)]
    second = first[7:] + first[:7]

    def reference_step(images: torch.Tensor, step: list[tuple[int, float]]) -> torch.Tensor:
        return torch.stack(
            [
                reference._apply_image_or_video_transform(
                    image, stage.names[k], m, interpolation=BILINEAR, fill=reference._fill
                )
                for image, (k, m) in zip(images, step, strict=True)
            ]
        )

    def draw(*steps: list[tuple[int, float]]) -> AutoDraw:
        return AutoDraw(
            torch.tensor([[k for k, _ in st] for st in steps]),
            torch.tensor([[m for _, m in st] for st in steps]),
        )

    once = stage.apply(batch, draw(first))
    expected = reference_step(batch, first)
    for i in range(len(batch)):
        assert torch.allclose(once[i], expected[i], atol=1e-5), (i, stage.names[first[i][0]], first[i][1])
    # Two steps: the same, except where float rounding of the first step (1e-7) moves a value across a
    # threshold of the second (posterize, solarize, equalize): a few pixels, so count them.
    twice = stage.apply(batch, draw(first, second))
    off = (twice - reference_step(expected, second)).abs() > 1e-5
    assert float(off.float().mean()) < 1e-3, float(off.float().mean())


def test_auto_draws_follow_v2():
    torch.manual_seed(8)
    n = 3000
    images = torch.empty(n, 3, S, S)
    rand = RandomAuto("randaugment", num_ops=3, magnitude=12, magnitude_bins=21)
    draw = rand.draw(images)
    assert draw.op.shape == (3, n)  # num_ops steps
    assert stats.chisquare(torch.bincount(draw.op.flatten(), minlength=14).tolist()).pvalue > 1e-3
    table, signed = rand._table(S, S, images.device)
    expected = table[draw.op, 12]
    assert torch.equal(draw.magnitude.abs(), expected.abs())
    negative = (draw.magnitude < 0)[signed[draw.op] & (expected != 0)]
    assert stats.binomtest(int(negative.sum()), negative.numel(), 0.5).pvalue > 1e-3
    assert not bool((draw.magnitude < 0)[~signed[draw.op]].any())
    trivial = RandomAuto("trivialaugment", magnitude_bins=31)
    draw = trivial.draw(images)
    assert draw.op.shape == (1, n)  # one operation per image
    table, _ = trivial._table(S, S, images.device)
    is_rotate = draw.op[0] == trivial.names.index("Rotate")
    levels = torch.round(draw.magnitude[0][is_rotate].abs() / 4.5).long()  # Rotate: 0..135 in 31 levels
    assert torch.allclose(table[trivial.names.index("Rotate")][levels], draw.magnitude[0][is_rotate].abs())
    assert stats.chisquare(torch.bincount(levels, minlength=31).tolist()).pvalue > 1e-3


def test_auto_policies_are_torchvisions_and_a_new_operation_is_refused(monkeypatch):
    for policy, cls in POLICY_CLASSES.items():
        assert set(cls._AUGMENTATION_SPACE) <= set(OPERATIONS), policy
    space = dict(v2.RandAugment._AUGMENTATION_SPACE, Invert=(lambda bins, h, w: None, False))
    monkeypatch.setattr(v2.RandAugment, "_AUGMENTATION_SPACE", space)
    with pytest.raises(RuntimeError, match=r"cannot batch: \['Invert'\]"):
        RandomAuto("randaugment")


def test_draws_repeat_with_the_seed_and_stay_in_range():
    policy = image_augment(
        crop_scale_min=0.5,
        hflip=0.5,
        vflip=0.5,
        rotation=30.0,
        brightness=0.3,
        contrast=0.3,
        hue=0.1,
        auto="randaugment",
        magnitude=15,
        num_ops=3,
    )
    outputs = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        outputs.append(policy(_photos(8)))
    assert torch.equal(outputs[0], outputs[1]) and not torch.allclose(outputs[0], outputs[2])
    assert (
        outputs[0].dtype == torch.float32 and 0.0 <= float(outputs[0].min()) <= float(outputs[0].max()) <= 1.0
    )
    assert math.isfinite(float(outputs[0].sum()))


def test_schema_defaults_change_nothing_and_match_the_builders():
    defaults = OmegaConf.to_container(OmegaConf.structured(AugmentConfig))
    assert image_augment(**{k: defaults[k] for k in IMAGE_KEYS}) is None
    assert batch_mix(2, **{k: defaults[k] for k in MIX_KEYS}) is None
    assert set(defaults) == {"policy", *IMAGE_KEYS, *MIX_KEYS}
    for builder, keys in ((image_augment, IMAGE_KEYS), (batch_mix, MIX_KEYS)):
        params = inspect.signature(builder).parameters
        assert {k: params[k].default for k in keys} == {k: defaults[k] for k in keys}, builder.__name__


@pytest.mark.slow
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


@pytest.mark.slow
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


def test_augment_throughput_prints_its_table(capsys, tmp_path):
    spec = importlib.util.spec_from_file_location(
        "augment_throughput", ROOT / "benchmarks" / "augment_throughput.py"
    )
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    composed = compose_cfg(tmp_path, ["augment=strong"]).augment
    assert bench.policy_settings("strong") == {
        k: composed[k] for k in IMAGE_KEYS
    }  # the presets as Hydra reads them
    bench.main(["--sizes", "16", "--batches", "3", "--repeats", "2", "--policies", "light", "strong"])
    lines = capsys.readouterr().out.splitlines()
    rows = [line.split() for line in lines if line.startswith(("light ", "strong "))]
    assert [(r[0], r[1], r[2]) for r in rows] == [("light", "16", "3"), ("strong", "16", "3")]
    for row in rows:
        batched, loop, ratio = float(row[3]), float(row[5]), float(row[7].rstrip("x"))
        assert batched > 0 and loop > 0
        assert ratio == pytest.approx(loop / batched, rel=0.02, abs=0.01)
