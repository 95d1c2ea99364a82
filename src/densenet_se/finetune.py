"""Fine-tuning a pretrained backbone: frozen for `optim.freeze_epochs`, then trained at `optim.backbone_lr_mult`
times `optim.lr`; the head (new, not pretrained: the arch names its modules, for DenseNetSE the SE modules and the
classifier) always trains at `optim.lr`.

Freezing is a function of the epoch number alone (set at each epoch start), so a resumed run freezes and
unfreezes at the same epochs. While frozen, the backbone's BatchNorm layers stay in eval mode: their running
statistics are part of the pretrained features.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any

from omegaconf import DictConfig, OmegaConf
from torch import nn

from densenet_se.checks import Range, Rule
from densenet_se.errors import UserError

log = logging.getLogger("densenet_se")

ALLOWED: dict[str, Rule] = {
    "freeze_epochs": Range(lambda v: v >= 0, "an integer >= 0 (0: the backbone is never frozen)"),
    "backbone_lr_mult": Range(
        lambda v: 0.0 <= v <= 1.0,
        "a number in [0, 1] (1: one learning rate for all)",
    ),
}


def check(cfg: DictConfig) -> None:
    """DDP must know that frozen weights get no gradient; fine-tuning a random backbone is only worth a warning."""
    freeze = OmegaConf.select(cfg, "optim.freeze_epochs", default=0)
    strategy = str(OmegaConf.select(cfg, "trainer.strategy", default="auto"))
    if freeze and strategy.startswith("ddp") and "find_unused_parameters_true" not in strategy:
        raise UserError(
            f"optim.freeze_epochs={freeze} with trainer.strategy={strategy} needs "
            "trainer.strategy=ddp_find_unused_parameters_true (DDP must be told that frozen weights get no "
            "gradient)."
        )
    mult = OmegaConf.select(cfg, "optim.backbone_lr_mult", default=1.0)
    if (freeze or mult != 1.0) and OmegaConf.select(cfg, "model.pretrained") is None:
        log.warning(
            "optim.freeze_epochs/optim.backbone_lr_mult slow down a randomly initialised backbone; they are meant "
            "for model.pretrained=imagenet or a state-dict file (experiment=finetune)"
        )


def in_head(name: str, head: Sequence[str]) -> bool:
    """True for a parameter or module name inside one of the `head` modules."""
    return any(name == h or name.startswith(f"{h}.") for h in head)


def split_parameters(model: nn.Module, head: Sequence[str]) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(backbone parameters, head parameters) of a network whose head is the modules named `head`."""
    backbone, new = [], []
    for name, param in model.named_parameters():
        (new if in_head(name, head) else backbone).append(param)
    return backbone, new


def param_groups(model: nn.Module, head: Sequence[str], lr: float, backbone_lr_mult: float) -> Iterable[Any]:
    """Optimizer parameters: all at `lr`, or named head/backbone groups when the backbone has its own rate."""
    if backbone_lr_mult == 1.0:
        return model.parameters()
    backbone, new = split_parameters(model, head)
    return [
        {"params": new, "lr": lr, "name": "head"},
        {"params": backbone, "lr": lr * backbone_lr_mult, "name": "backbone"},
    ]


def set_backbone_frozen(model: nn.Module, head: Sequence[str], frozen: bool) -> None:
    """Freeze (no gradients, BatchNorm statistics fixed) or release everything but the `head` modules."""
    backbone, _ = split_parameters(model, head)
    for param in backbone:
        param.requires_grad_(not frozen)
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not in_head(name, head):
            module.train(model.training and not frozen)
