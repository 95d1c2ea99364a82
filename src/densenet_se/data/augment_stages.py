"""The stages of a training augmentation policy, each drawing its random parameters per image for a whole batch.

A stage has `draw(images)` (the parameters of every image, one tensor [N] each, from torch's generator on the
batch's device, so SeedEachEpoch's seeding makes them repeat) and `apply(images, draw)`; calling it does both.
Each draw follows the distribution of the torchvision.transforms.v2 transform it replaces, image by image:
    RandomGeometry   RandomResizedCrop, RandomHorizontalFlip, RandomVerticalFlip, RandomRotation
    RandomColor      ColorJitter (each image also gets its own random order of the four adjustments)
    RandomAuto       RandAugment, TrivialAugmentWide (each image draws its own operations and strengths)
The ops themselves are densenet_se.data.augment_ops.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass

import torch
from torchvision.transforms import v2

from densenet_se.data import augment_ops as ops

# v2.RandomResizedCrop's aspect ratios (3/4 .. 4/3) and its number of tries before the fallback crop.
CROP_RATIO: tuple[float, float] = inspect.signature(v2.RandomResizedCrop).parameters["ratio"].default
CROP_TRIES = 10


def _uniform(n: int, low: float, high: float, device: torch.device) -> torch.Tensor:
    return torch.empty(n, device=device).uniform_(low, high)


@dataclass
class GeometryDraw:
    """Per image: the crop box in pixels (top, left, height, width), flips (bool), rotation angle in degrees."""

    top: torch.Tensor
    left: torch.Tensor
    height: torch.Tensor
    width: torch.Tensor
    hflip: torch.Tensor
    vflip: torch.Tensor
    angle: torch.Tensor


class RandomGeometry:
    """Random resized crop, flips and rotation of each image, resampled once (one grid_sample per batch).

    The crop, flips and rotation are composed into one matrix per image, so an image is interpolated once (v2
    interpolated twice: crop, then rotation). Corners a rotation uncovers show the image around the crop, and
    beyond the image's border its mirror image (never black).
    """

    def __init__(self, crop_scale_min: float, hflip: float, vflip: float, rotation: float) -> None:
        self.crop_scale_min, self.hflip, self.vflip, self.rotation = crop_scale_min, hflip, vflip, rotation

    def draw(self, images: torch.Tensor) -> GeometryDraw:
        n, _, height, width = images.shape
        device = images.device
        top, left, h, w = self._crop_boxes(n, height, width, device)
        return GeometryDraw(
            top,
            left,
            h,
            w,
            torch.rand(n, device=device) < self.hflip,
            torch.rand(n, device=device) < self.vflip,
            _uniform(n, -self.rotation, self.rotation, device)
            if self.rotation > 0
            else torch.zeros(n, device=device),
        )

    def _crop_boxes(self, n: int, height: int, width: int, device: torch.device) -> tuple[torch.Tensor, ...]:
        """v2.RandomResizedCrop's boxes: up to 10 tries of (area share, log aspect), the first that fits."""
        full = (torch.zeros(n, device=device), torch.zeros(n, device=device))
        if self.crop_scale_min >= 1.0:
            return (
                *full,
                torch.full((n,), float(height), device=device),
                torch.full((n,), float(width), device=device),
            )
        area = torch.empty(n, CROP_TRIES, device=device).uniform_(self.crop_scale_min, 1.0) * (height * width)
        log_ratio = torch.empty(n, CROP_TRIES, device=device).uniform_(
            math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])
        )
        ratio = torch.exp(log_ratio)
        w = torch.round(torch.sqrt(area * ratio))
        h = torch.round(torch.sqrt(area / ratio))
        fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
        first = fits.int().argmax(dim=1, keepdim=True)  # the first try that fits (0 when none does)
        found = fits.any(dim=1)
        # v2's fallback when no try fits: the largest central crop with an allowed aspect ratio.
        in_ratio = width / height
        fb_w = float(width) if in_ratio <= CROP_RATIO[1] else float(round(height * CROP_RATIO[1]))
        fb_h = float(height) if in_ratio >= CROP_RATIO[0] else float(round(width / CROP_RATIO[0]))
        w = torch.where(found, w.gather(1, first).squeeze(1), fb_w)
        h = torch.where(found, h.gather(1, first).squeeze(1), fb_h)
        offsets = torch.rand(n, 2, device=device)
        top = torch.where(found, torch.floor(offsets[:, 0] * (height - h + 1)), (height - h).div(2).floor())
        left = torch.where(found, torch.floor(offsets[:, 1] * (width - w + 1)), (width - w).div(2).floor())
        return top, left, h, w

    @torch.no_grad()
    def apply(self, images: torch.Tensor, draw: GeometryDraw) -> torch.Tensor:
        if self.crop_scale_min >= 1.0 and self.rotation <= 0:
            # Flips alone move whole pixels: select flipped copies, exactly, with no resampling.
            out = torch.where(ops.per_image(draw.hflip), images.flip(-1), images)
            return torch.where(ops.per_image(draw.vflip), out.flip(-2), out)
        _, _, height, width = images.shape
        zero = torch.zeros_like(draw.angle)
        # Output pixel -> crop: the box scaled to the output and moved to its place (centred coordinates).
        crop = torch.stack(
            (
                draw.width / width,
                zero,
                draw.left + draw.width / 2 - width / 2,
                zero,
                draw.height / height,
                draw.top + draw.height / 2 - height / 2,
            ),
            dim=1,
        ).view(-1, 2, 3)
        sx, sy = 1.0 - 2.0 * draw.hflip.float(), 1.0 - 2.0 * draw.vflip.float()
        flip = torch.stack((sx, zero, zero, zero, sy, zero), dim=1).view(-1, 2, 3)
        rotate = ops.inverse_affine(-draw.angle)  # v2's rotate: positive angles turn counter-clockwise
        return ops.warp(images, ops.compose(crop, flip, rotate), padding_mode="reflection")

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.apply(images, self.draw(images))


BRIGHTNESS, CONTRAST, SATURATION, HUE = range(4)


@dataclass
class ColorDraw:
    """Per image: the factors [N,4] (brightness, contrast, saturation, hue shift) and the order [N,k] of the
    k adjustments that are on (indices into the factors)."""

    factors: torch.Tensor
    order: torch.Tensor


class RandomColor:
    """v2.ColorJitter per image: factors from [max(0, 1 - x), 1 + x] (hue: [-x, x]) and a random order."""

    def __init__(self, brightness: float, contrast: float, saturation: float, hue: float) -> None:
        self.strengths = (brightness, contrast, saturation, hue)
        self.enabled = [i for i, x in enumerate(self.strengths) if x > 0]

    def draw(self, images: torch.Tensor) -> ColorDraw:
        n, device = images.shape[0], images.device
        columns = []
        for i, x in enumerate(self.strengths):
            if i == HUE:
                columns.append(_uniform(n, -x, x, device) if x > 0 else torch.zeros(n, device=device))
            else:
                columns.append(
                    _uniform(n, max(0.0, 1.0 - x), 1.0 + x, device) if x > 0 else torch.ones(n, device=device)
                )
        enabled = torch.tensor(self.enabled, device=device)
        # A uniformly random permutation of the enabled adjustments per image (v2: randperm per call).
        order = enabled[torch.rand(n, len(self.enabled), device=device).argsort(dim=1)]
        return ColorDraw(torch.stack(columns, dim=1), order)

    @torch.no_grad()
    def apply(self, images: torch.Tensor, draw: ColorDraw) -> torch.Tensor:
        out = images
        needs_luma = self.strengths[CONTRAST] > 0 or self.strengths[SATURATION] > 0
        for step in range(draw.order.shape[1]):
            op = draw.order[:, step]
            # Brightness, contrast and saturation are one blend with different targets (v2's _blend): 0, the
            # mean luma, the luma. An image whose adjustment at this step is the hue gets factor 1 here.
            factor = torch.where(op == HUE, 1.0, draw.factors.gather(1, op[:, None]).squeeze(1))
            target = out.new_zeros(())
            if needs_luma:
                luma = ops.grayscale(out)
                mean = luma.mean(dim=(-3, -2, -1), keepdim=True)
                on = out.new_ones(())
                target = torch.addcmul(
                    mean * ops.per_image(torch.where(op == CONTRAST, on, 0.0)),
                    luma,
                    ops.per_image(torch.where(op == SATURATION, on, 0.0)),
                )
            blended = ops.blend(out, target, factor)
            if self.strengths[HUE] > 0:
                blended = ops.select(op == HUE, ops.adjust_hue, out, blended, draw.factors[:, HUE])
            out = blended
        return out

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.apply(images, self.draw(images))
