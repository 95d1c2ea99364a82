"""Training augmentation policies (`augment=none|light|strong|custom`) run on whole batches on their device.

The uint8 batches come from the decode-once cache (or the GPU copy of it). Each image of a batch draws its own
parameters from the distributions of torchvision.transforms.v2's transforms (v2 called on a whole batch would
give every image the same crop, flip and rotation), and the batch goes through each stage at once
(densenet_se.data.augment_stages, augment_auto); then it is normalised and, with MixUp/CutMix on, mixed
(densenet_se.data.mixing).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from densenet_se.checks import Range, Rule
from densenet_se.data.augment_auto import POLICY_CLASSES, RandomAuto
from densenet_se.data.augment_stages import RandomColor, RandomGeometry
from densenet_se.data.images import standardize
from densenet_se.data.mixing import MIX_KEYS, batch_mix
from densenet_se.errors import UserError

POLICIES = ("none", "light", "strong", "custom")
AUTO_AUGMENTS = ("none", *POLICY_CLASSES)


def _probability(v: float) -> bool:
    return 0.0 <= v <= 1.0


ALLOWED: dict[str, Rule] = {
    "policy": POLICIES,
    "auto": AUTO_AUGMENTS,
    "crop_scale_min": Range(lambda v: 0.0 < v <= 1.0, "a number in (0, 1] (1: no random crop)"),
    "hflip": Range(_probability, "a probability in [0, 1]"),
    "vflip": Range(_probability, "a probability in [0, 1]"),
    "rotation": Range(lambda v: 0.0 <= v <= 180.0, "a number of degrees in [0, 180]"),
    "brightness": Range(_probability, "a number in [0, 1]"),
    "contrast": Range(_probability, "a number in [0, 1]"),
    "saturation": Range(_probability, "a number in [0, 1]"),
    "hue": Range(lambda v: 0.0 <= v <= 0.5, "a number in [0, 0.5]"),
    "magnitude": Range(lambda v: v >= 0, "an integer >= 0 (and below augment.magnitude_bins)"),
    "num_ops": Range(lambda v: v >= 1, "an integer >= 1"),
    "magnitude_bins": Range(lambda v: v >= 2, "an integer >= 2"),
}

# The keys of the augment group that shape single images (the rest, mixing, is densenet_se.data.mixing).
IMAGE_KEYS = (
    "crop_scale_min",
    "hflip",
    "vflip",
    "rotation",
    "brightness",
    "contrast",
    "saturation",
    "hue",
    "auto",
    "magnitude",
    "num_ops",
    "magnitude_bins",
)


def check_legacy_augment(augment: bool | None, policy: str, resume: str | None = None) -> None:
    """`data.augment`, the retired on/off switch: null or false (with augment=none) pass, true is refused."""
    if augment is True:
        if resume:
            raise UserError(
                f"resume={resume}: this run was trained with data.augment=true, which this version replaced "
                "by augment=light, so it cannot continue exactly; start a new run with augment=light."
            )
        raise UserError(
            "data.augment=true is replaced by the augment group: use augment=light (flips, a small rotation "
            "and colour jitter; add augment.vflip=0.5 for vertical flips) and drop data.augment."
        )
    if augment is False and policy != "none":
        raise UserError(
            f"data.augment=false contradicts augment={policy}; drop data.augment (the augment group alone "
            "chooses the training augmentation)."
        )


def check(cfg: DictConfig) -> None:
    """Cross-key checks: the retired `data.augment` switch and the RandAugment magnitude."""
    check_legacy_augment(
        OmegaConf.select(cfg, "data.augment"),
        OmegaConf.select(cfg, "augment.policy", default="none"),
        OmegaConf.select(cfg, "resume"),
    )
    magnitude, bins = (
        OmegaConf.select(cfg, "augment.magnitude"),
        OmegaConf.select(cfg, "augment.magnitude_bins"),
    )
    if magnitude is not None and bins is not None and magnitude >= bins:
        raise UserError(
            f"augment.magnitude={magnitude} must be below augment.magnitude_bins={bins} "
            "(RandAugment's strongest setting is magnitude_bins - 1)."
        )


def image_augment(
    crop_scale_min: float = 1.0,
    hflip: float = 0.0,
    vflip: float = 0.0,
    rotation: float = 0.0,
    brightness: float = 0.0,
    contrast: float = 0.0,
    saturation: float = 0.0,
    hue: float = 0.0,
    auto: str = "none",
    magnitude: int = 9,
    num_ops: int = 2,
    magnitude_bins: int = 31,
) -> BatchAugment | None:
    """The augmentation of float batches in 0..1 [N,3,S,S] for these keys, or None when it would change nothing.

    Order as in timm: random resized crop, flips and rotation (one resampling), colour jitter, then
    RandAugment/TrivialAugment.
    """
    stages: list[Callable[[torch.Tensor], torch.Tensor]] = []
    if crop_scale_min < 1.0 or hflip > 0 or vflip > 0 or rotation > 0:
        stages.append(RandomGeometry(crop_scale_min, hflip, vflip, rotation))
    if brightness > 0 or contrast > 0 or saturation > 0 or hue > 0:
        stages.append(RandomColor(brightness, contrast, saturation, hue))
    if auto != "none":
        stages.append(RandomAuto(auto, num_ops, magnitude, magnitude_bins))
    return BatchAugment(stages) if stages else None


class BatchAugment:
    """The stages of a policy, applied in turn to a float batch in 0..1; every image draws its own parameters."""

    def __init__(self, stages: list[Callable[[torch.Tensor], torch.Tensor]]) -> None:
        self.stages = stages

    @torch.no_grad()
    def __call__(self, unit_images: torch.Tensor) -> torch.Tensor:
        for stage in self.stages:
            unit_images = stage(unit_images)
        return unit_images.clamp_(0.0, 1.0)


class TrainBatchTransform:
    """uint8 training batches to augmented, normalised float32 (and soft targets when mixing) on their device.

    `image_size` is the side of the batches it gets; every augmentation keeps the batch's own size.
    """

    def __init__(self, settings: Mapping[str, Any], image_size: int, num_classes: int) -> None:
        self.image_size = image_size
        self.images = image_augment(**{k: settings[k] for k in IMAGE_KEYS if k in settings})
        self.mix = batch_mix(num_classes, **{k: settings[k] for k in MIX_KEYS if k in settings})

    @property
    def is_identity(self) -> bool:
        return self.images is None and self.mix is None

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        unit = images.float().div_(255.0)
        if self.images is not None:
            unit = self.images(unit)
        batch = standardize(unit)
        if self.mix is not None:
            return self.mix(batch, labels)
        return batch, labels
