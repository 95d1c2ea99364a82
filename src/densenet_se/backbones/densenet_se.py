"""model.arch=densenet_se (the default): DenseNet-BC with Squeeze-and-Excitation, densenet_se.models.DenseNetSE.

Its keys are DenseNetSE's keyword arguments; the allowed values, the size checks (parameter count and
activations computed from the layout, nothing built) and the network live in densenet_se.models.densenet.
Grad-CAM hooks `se`, the final feature map after ReLU and the head's squeeze-excitation, which the classifier
pools; the head is every SE module and the classifier (torchvision's DenseNet has neither).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from densenet_se.backbones.base import Backbone, ModelSettings
from densenet_se.checks import Rule

if TYPE_CHECKING:
    from torch import nn


@dataclass
class DenseNetSEConfig(ModelSettings):
    """model.* of arch densenet_se; conf/model/densenet121_se.yaml mirrors it, DenseNetSE's defaults match."""

    arch: str = "densenet_se"
    growth_rate: int = 32
    block_config: list[int] = field(default_factory=lambda: [6, 12, 24, 16])
    num_init_features: int = 64
    bn_size: int = 4
    compression_rate: float = 0.5
    drop_rate: float = 0.0
    se_reduction: int = 8
    se_placement: str = "head"
    memory_efficient: bool = False


def _allowed() -> Mapping[str, Rule]:
    from densenet_se.models.densenet import ALLOWED

    return ALLOWED


def _check(num_classes: int, image_size: int, settings: dict[str, Any]) -> dict[str, Any]:
    from densenet_se.models.densenet import MODEL_KEYS, check_feature_bytes, check_layout

    layout = check_layout(num_classes, **{k: settings[k] for k in MODEL_KEYS if k != "pretrained"})
    check_feature_bytes(image_size, **layout)
    normalised = {k: list(v) if isinstance(v, tuple) else v for k, v in layout.items() if k != "num_classes"}
    return {**settings, **normalised}


def _build(num_classes: int, settings: dict[str, Any]) -> nn.Module:
    from densenet_se.models.densenet import MODEL_KEYS, DenseNetSE

    return DenseNetSE(num_classes, **{k: settings[k] for k in MODEL_KEYS})


def _head(net: nn.Module) -> tuple[str, ...]:
    from densenet_se.models.densenet import is_head_key

    names = [name for name, _ in net.named_modules() if name and is_head_key(f"{name}.")]
    return tuple(n for n in names if not any(n.startswith(f"{outer}.") for outer in names))


BACKBONE = Backbone(
    arch="densenet_se",
    schema=DenseNetSEConfig,
    config="densenet121_se",
    allowed=_allowed,
    check=_check,
    build=_build,
    layout_keys=(
        "growth_rate",
        "block_config",
        "num_init_features",
        "bn_size",
        "compression_rate",
        "se_reduction",
        "se_placement",
    ),
    cam_layer=lambda settings: "se",
    head=_head,
    rebuild="densenet_se.models.DenseNetSE(num_classes, **model, pretrained=<file>), or train.py "
    "model.pretrained=<file> with these model.* keys",
)
