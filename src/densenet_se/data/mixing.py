"""MixUp / CutMix on normalised training batches (torchvision.transforms.v2), giving soft targets [N, C].

A batch is mixed with probability `mix_prob`; with both alphas > 0, MixUp or CutMix is picked with equal odds
(timm's default switch). Unmixed batches get one-hot targets, so a run's targets always have one form.
"""

from __future__ import annotations

import torch

from densenet_se.checks import Range, Rule

MIX_KEYS = ("mixup_alpha", "cutmix_alpha", "mix_prob")
ALLOWED: dict[str, Rule] = {
    "mixup_alpha": Range(lambda v: v >= 0.0, "a number >= 0 (0: no MixUp; 0.2-0.4 is usual)"),
    "cutmix_alpha": Range(lambda v: v >= 0.0, "a number >= 0 (0: no CutMix; 1.0 is usual)"),
    "mix_prob": Range(lambda v: 0.0 <= v <= 1.0, "a probability in [0, 1]"),
}


class BatchMix:
    """MixUp and/or CutMix of a whole batch: (images [N,3,H,W], labels [N]) -> (images, soft targets [N,C])."""

    def __init__(self, num_classes: int, mixup_alpha: float, cutmix_alpha: float, mix_prob: float) -> None:
        from torchvision.transforms import v2

        choices = []
        if mixup_alpha > 0:
            choices.append(v2.MixUp(alpha=float(mixup_alpha), num_classes=num_classes))
        if cutmix_alpha > 0:
            choices.append(v2.CutMix(alpha=float(cutmix_alpha), num_classes=num_classes))
        self.mix = choices[0] if len(choices) == 1 else v2.RandomChoice(choices)
        self.num_classes, self.mix_prob = num_classes, float(mix_prob)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.mix_prob > 0 and (self.mix_prob >= 1 or float(torch.rand(())) < self.mix_prob):
            return self.mix(images, labels)
        return images, torch.nn.functional.one_hot(labels, self.num_classes).to(images.dtype)


def batch_mix(
    num_classes: int, mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0, mix_prob: float = 1.0
) -> BatchMix | None:
    """The BatchMix for these settings, or None when neither MixUp nor CutMix is on."""
    if mixup_alpha <= 0 and cutmix_alpha <= 0:
        return None
    return BatchMix(num_classes, mixup_alpha, cutmix_alpha, mix_prob)
