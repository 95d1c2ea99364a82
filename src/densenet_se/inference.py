"""Model outputs for uint8 images, shared by eval, predict, explain and training's end-of-run report.

Preprocessing is training's own (`normalize`, ImageNet statistics from the checkpoint), batches are run as
validation runs them, and test-time augmentation (TTA) adds flipped views whose softmax is averaged.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from densenet_se.data.images import IMAGENET_MEAN, IMAGENET_STD, normalize
from densenet_se.errors import UserError

# tta= choices -> the flips of each view (dims of an [N, 3, H, W] batch); the first view is the image itself.
TTA_VIEWS: dict[str, tuple[tuple[int, ...], ...]] = {
    "none": ((),),
    "flip": ((), (3,)),
    "flip4": ((), (3,), (2,), (2, 3)),
}


def check_tta(tta: str) -> str:
    """`tta` itself, or UserError naming the choices."""
    if tta not in TTA_VIEWS:
        raise UserError(f"tta={tta!r} is not allowed; choose one of: {', '.join(TTA_VIEWS)}.")
    return tta


def to_model_input(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 [N,3,H,W] to the float32 the model was trained on: (x/255 - mean) / std."""
    if _same(mean, IMAGENET_MEAN) and _same(std, IMAGENET_STD):
        return normalize(images)  # training's own function, so values match it bit for bit
    # The data module always normalises with ImageNet statistics; other values only come from a
    # hand-made checkpoint, and then its own statistics are the best guess.
    m = torch.tensor(mean, dtype=torch.float64).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float64).view(1, 3, 1, 1)
    scale, shift = (1.0 / (255.0 * s)).float().to(images.device), (-m / s).float().to(images.device)
    return torch.addcmul(shift, images.float(), scale)


def _same(a: Sequence[float], b: Sequence[float]) -> bool:
    return len(a) == len(b) and all(abs(float(x) - float(y)) < 1e-9 for x, y in zip(a, b, strict=True))


def views(x: torch.Tensor, tta: str) -> list[torch.Tensor]:
    """The TTA views of a batch [N, C, H, W]: the batch itself first, then its flips."""
    return [x.flip(dims) if dims else x for dims in TTA_VIEWS[check_tta(tta)]]


@torch.inference_mode()
def view_logits(
    module: torch.nn.Module,
    images: torch.Tensor,
    hparams: dict[str, Any],
    batch_size: int,
    device: torch.device,
    tta: str = "none",
) -> torch.Tensor:
    """float32 logits [V, N, C] of every TTA view of uint8 images [N,3,S,S] (view 0: the images as they are)."""
    n_views = len(TTA_VIEWS[check_tta(tta)])
    out = []
    for start in range(0, len(images), batch_size):
        x = to_model_input(images[start : start + batch_size].to(device), hparams["mean"], hparams["std"])
        # One forward per view on the same batch, so view 0 is exactly what validation computed.
        out.append(torch.stack([module(v).float().cpu() for v in views(x, tta)]))
    if not out:
        return torch.empty(n_views, 0, int(hparams["num_classes"]))
    return torch.cat(out, dim=1)


@dataclass
class Combined:
    """What the views of each image add up to: averaged softmax, its log, and the spread across views."""

    probs: torch.Tensor  # [N, C], mean over views of softmax(logits / temperature)
    log_probs: torch.Tensor  # [N, C], log of `probs` computed stably (for NLL and per-image loss)
    uncertainty: torch.Tensor  # [N], std across views of the predicted class's probability (0 for one view)


def combine(logits: torch.Tensor, temperature: float = 1.0) -> Combined:
    """Average the softmax of views [V, N, C] after dividing their logits by `temperature`."""
    scaled = logits if temperature == 1.0 else logits / temperature
    per_view = scaled.softmax(dim=2)
    probs = per_view.mean(dim=0)  # one view at temperature 1: exactly softmax(logits), as validation computes
    log_probs = torch.logsumexp(scaled.log_softmax(dim=2), dim=0) - math.log(logits.shape[0])
    predicted = probs.argmax(dim=1)
    chosen = per_view.gather(2, predicted.view(1, -1, 1).expand(logits.shape[0], -1, 1)).squeeze(2)
    return Combined(probs, log_probs, chosen.std(dim=0, correction=0))


def probabilities(
    module: torch.nn.Module,
    images: torch.Tensor,
    hparams: dict[str, Any],
    batch_size: int,
    device: torch.device,
    tta: str = "none",
) -> torch.Tensor:
    """Softmax probabilities [N, C] for uint8 images [N,3,S,S], computed batch by batch as validation does."""
    return combine(view_logits(module, images, hparams, batch_size, device, tta)).probs
