"""Training augmentation applied to whole batches on the device, with fresh random parameters per image."""

from __future__ import annotations

import torch
from torch import nn


def build_augmentation(rotation_degrees: float = 15.0, jitter: float = 0.1) -> nn.Module:
    """Per-sample random flips, a small rotation and mild brightness/contrast/saturation jitter.

    Works on float images in 0..1 of shape [N,3,H,W]. No hue jitter: lesion colour carries the diagnosis.
    """
    # kornia is imported here because its import takes a second or two, paid only when augmenting.
    import kornia.augmentation as K

    return nn.Sequential(
        K.RandomHorizontalFlip(p=0.5),
        K.RandomVerticalFlip(p=0.5),
        # reflection padding: rotated corners continue the skin instead of turning black
        K.RandomAffine(degrees=rotation_degrees, padding_mode="reflection", p=1.0),
        K.ColorJitter(brightness=jitter, contrast=jitter, saturation=jitter, hue=0.0, p=1.0),
    )


@torch.no_grad()
def augment_batch(augmentation: nn.Module, unit_images: torch.Tensor) -> torch.Tensor:
    """Apply `augmentation` to float images in 0..1, keeping them in 0..1."""
    return augmentation(unit_images).clamp_(0.0, 1.0)
