"""Cross-entropy and training accuracy for soft targets [N, C] (MixUp/CutMix), consistent with hard labels.

For one-hot targets both reduce exactly to the hard-label definitions: `soft_cross_entropy` to
F.cross_entropy(logits, labels, weight, label_smoothing) and `target_share` to accuracy.
"""

from __future__ import annotations

import torch


def soft_cross_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    weight: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Mean cross-entropy against probability targets, with class weights and label smoothing as for labels.

    Per image: -sum_c w_c * t'_ic * log p_ic with t' = (1 - eps) * t + eps / C; the mean divides by
    sum_i sum_c w_c * t_ic, the weight each image carries. For one-hot t that is sum_i w_{y_i}, which is how
    F.cross_entropy averages weighted labels (PyTorch's own probability-target mode divides by N instead,
    which would weigh a mixed batch differently from an unmixed one).
    """
    log_probs = logits.float().log_softmax(dim=1)
    targets = targets.to(log_probs.dtype)
    num_classes = log_probs.shape[1]
    smoothed = targets * (1.0 - label_smoothing) + label_smoothing / num_classes
    w = weight.to(log_probs.dtype) if weight is not None else torch.ones_like(log_probs[0])
    per_image = -(smoothed * log_probs * w).sum(dim=1)
    return per_image.sum() / (targets * w).sum()


def target_share(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per image, the share of the target on the predicted class: 1/0 for one-hot targets (right/wrong), lam
    for a MixUp image of weight lam on the class predicted. Its mean is the training accuracy under mixing."""
    return targets.gather(1, logits.argmax(dim=1, keepdim=True)).squeeze(1).float()
