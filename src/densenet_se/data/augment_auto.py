"""RandAugment and TrivialAugmentWide for whole batches: every image draws its own operations and strengths.

The operations, their strengths and which of them take a random sign are torchvision's own table
(v2.RandAugment / v2.TrivialAugmentWide `_AUGMENTATION_SPACE`), read from the installed version. One step
computes every kind of operation on the whole batch and keeps, for each image, the one it drew: a fixed
number of kernels per step whatever the batch size, and no value read back to the host.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torchvision.transforms import v2

from densenet_se.data import augment_ops as ops

POLICY_CLASSES = {"randaugment": v2.RandAugment, "trivialaugment": v2.TrivialAugmentWide}
GEOMETRIC = ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")
BLENDS = ("Brightness", "Color", "Contrast", "Sharpness")
# Every operation this module implements; a torchvision with another table is refused (tests check it).
OPERATIONS = ("Identity", *GEOMETRIC, *BLENDS, "Posterize", "Solarize", "AutoContrast", "Equalize")


@dataclass
class AutoDraw:
    """Per step and image: the operation's index in the table [steps,N] and its signed strength [steps,N]."""

    op: torch.Tensor
    magnitude: torch.Tensor


class RandomAuto:
    """`randaugment` (num_ops operations of strength `magnitude`) or `trivialaugment` (one, strength drawn)."""

    def __init__(self, policy: str, num_ops: int = 2, magnitude: int = 9, magnitude_bins: int = 31) -> None:
        self.space = POLICY_CLASSES[policy]._AUGMENTATION_SPACE
        unknown = set(self.space) - set(OPERATIONS)
        if unknown:
            raise RuntimeError(
                f"torchvision's {policy} has operations this version cannot batch: {sorted(unknown)}"
            )
        self.names = list(self.space)
        self.steps = num_ops if policy == "randaugment" else 1
        self.magnitude = magnitude if policy == "randaugment" else None  # None: a random bin per image
        self.bins = magnitude_bins
        self._tables: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def _table(self, height: int, width: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(strengths [ops, bins] (0 where an operation has none), signed [ops]) for this image size."""
        key = (height, width, device)
        if key not in self._tables:
            rows, signed = [], []
            for fn, sign in self.space.values():
                values = fn(self.bins, height, width)
                rows.append(torch.zeros(self.bins) if values is None else values.to(torch.float32))
                signed.append(sign)
            self._tables[key] = (torch.stack(rows).to(device), torch.tensor(signed, device=device))
        return self._tables[key]

    def draw(self, images: torch.Tensor) -> AutoDraw:
        n, _, height, width = images.shape
        device = images.device
        table, signed = self._table(height, width, device)
        op = torch.randint(len(self.names), (self.steps, n), device=device)
        if self.magnitude is None:
            level = torch.randint(self.bins, (self.steps, n), device=device)
        else:
            level = torch.full((self.steps, n), self.magnitude, device=device)
        # v2 negates a signed operation's strength with probability 1/2 (torch.rand(()) <= 0.5).
        negate = signed[op] & (torch.rand(self.steps, n, device=device) <= 0.5)
        magnitude = table[op, level] * torch.where(negate, -1.0, 1.0)
        return AutoDraw(op, magnitude)

    def _is(self, op: torch.Tensor, *names: str) -> torch.Tensor:
        hit = torch.zeros_like(op, dtype=torch.bool)
        for name in names:
            if name in self.names:
                hit |= op == self.names.index(name)
        return hit

    def _geometry(self, images: torch.Tensor, m: torch.Tensor, op: torch.Tensor) -> torch.Tensor:
        """As v2 calls F.affine / F.rotate: shears about the top-left corner (center=[0, 0]), whole pixels of
        translation (int()), rotation with v2.rotate's sign; outside the image is 0 (fill=None)."""
        _, _, height, width = images.shape
        corner = self._is(op, "ShearX", "ShearY")
        matrix = ops.inverse_affine(
            torch.where(self._is(op, "Rotate"), -m, 0.0),
            torch.where(self._is(op, "ShearX"), torch.rad2deg(torch.atan(m)), 0.0),
            torch.where(self._is(op, "ShearY"), torch.rad2deg(torch.atan(m)), 0.0),
            torch.where(self._is(op, "TranslateX"), torch.trunc(m), 0.0),
            torch.where(self._is(op, "TranslateY"), torch.trunc(m), 0.0),
            torch.where(corner, -width / 2.0, 0.0),
            torch.where(corner, -height / 2.0, 0.0),
        )
        return ops.warp(images, matrix)

    def _colour(self, images: torch.Tensor, m: torch.Tensor, op: torch.Tensor) -> torch.Tensor:
        """Brightness, Color (saturation) and Contrast: a blend with factor 1 + m towards 0, luma, mean luma."""
        luma = ops.grayscale(images)
        mean = luma.mean(dim=(-3, -2, -1), keepdim=True)
        on = images.new_ones(())
        target = torch.addcmul(
            mean * ops.per_image(torch.where(self._is(op, "Contrast"), on, 0.0)),
            luma,
            ops.per_image(torch.where(self._is(op, "Color"), on, 0.0)),
        )
        return ops.blend(images, target, 1.0 + m)

    def _step(self, images: torch.Tensor, op: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        posterize = self.names.index("Posterize") if "Posterize" in self.names else -1
        groups = {
            GEOMETRIC: self._geometry,
            ("Brightness", "Color", "Contrast"): self._colour,
            ("Sharpness",): lambda im, m, op: ops.blend(im, ops.sharpness_target(im), 1.0 + m),
            # Other images' strengths are no bit counts (a GPU computes every image): 8 bits for them.
            ("Posterize",): lambda im, m, op: ops.posterize(im, torch.where(op == posterize, m, 8.0)),
            ("Solarize",): lambda im, m, op: ops.solarize(im, m),
            ("AutoContrast",): lambda im, m, op: ops.autocontrast(im),
            ("Equalize",): lambda im, m, op: ops.equalize(im),
        }
        out = images.clone()
        for names, fn in groups.items():
            if any(name in self.names for name in names):
                out = ops.select(self._is(op, *names), fn, images, out, m, op)
        return out

    @torch.no_grad()
    def apply(self, images: torch.Tensor, draw: AutoDraw) -> torch.Tensor:
        for op, magnitude in zip(draw.op, draw.magnitude, strict=True):
            images = self._step(images, op, magnitude)
        return images

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.apply(images, self.draw(images))
