"""DenseNet with optional Squeeze-and-Excitation, key-compatible with torchvision's densenet.

Reads top to bottom: dense layer -> dense block -> transition -> net -> pretrained loading. Module names
(``features.denseblock1.denselayer1.norm1`` ...) are torchvision's and never change: pretrained files
depend on them. SE modules live under names torchvision never uses (``se``, ``features.se<i>``).
"""

from __future__ import annotations

import inspect
import os
import re
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from numbers import Integral, Real
from pathlib import Path
from typing import Any, NoReturn

import torch
import torch.nn.functional as F
import torch.utils.checkpoint as cp
from torch import Tensor, nn

from densenet_se.checks import Range, Rule, at_least, interval, problem
from densenet_se.errors import shown
from densenet_se.models.common import (
    LoadReport,
    check_pretrained,
    download_state_dict,
    load_matching,
    read_state_dict,
    strip_prefix,
    too_many_feature_bytes,
    too_many_parameters,
)
from densenet_se.models.se import SqueezeExcitation

SE_PLACEMENTS = ("head", "blocks", "none")
# The DenseNet layout arguments, with DenseNet-121's values (the layout pretrained="imagenet" needs).
DENSENET121_LAYOUT = {
    "growth_rate": 32,
    "block_config": (6, 12, 24, 16),
    "num_init_features": 64,
    "bn_size": 4,
    "compression_rate": 0.5,
}
# A plausible depth, checked before anything is allocated (DenseNet-264 has 130 dense layers); the parameter
# and activation caps every network shares are in densenet_se.models.common.
MAX_DENSE_LAYERS = 1_000
# Allowed values of the DenseNetSE arguments: checked here (ValueError) and, as model.*, by config.validate.
ALLOWED: dict[str, Rule] = {
    "growth_rate": at_least(1),
    "block_config": Range(
        lambda v: (
            isinstance(v, Sequence)
            and not isinstance(v, (str, bytes))
            and 1 <= len(v) <= MAX_DENSE_LAYERS
            and all(isinstance(n, Integral) and not isinstance(n, bool) and n >= 1 for n in v)
            and sum(v) <= MAX_DENSE_LAYERS
        ),
        f"a non-empty list of integers >= 1, at most {MAX_DENSE_LAYERS} layers in all",
    ),
    "num_init_features": at_least(1),
    "bn_size": at_least(1),
    "compression_rate": interval(0, 1, "(]"),
    "drop_rate": interval(0, 1, "[)"),
    "se_reduction": at_least(1),
    "se_placement": SE_PLACEMENTS,
}


class _DenseLayer(nn.Module):
    """BN-ReLU-Conv1x1 bottleneck then BN-ReLU-Conv3x3, producing ``growth_rate`` new channels."""

    def __init__(
        self,
        num_input_features: int,
        growth_rate: int,
        bn_size: int,
        drop_rate: float,
        memory_efficient: bool,
    ) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(num_input_features)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(num_input_features, bn_size * growth_rate, kernel_size=1, stride=1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth_rate)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(
            bn_size * growth_rate, growth_rate, kernel_size=3, stride=1, padding=1, bias=False
        )
        self.drop_rate = float(drop_rate)
        self.memory_efficient = memory_efficient

    def bottleneck(self, inputs: Sequence[Tensor], update_running_stats: bool = True) -> Tensor:
        """Concatenate the block's features so far and squeeze them to ``bn_size * growth_rate`` channels."""
        x = torch.cat(inputs, 1)
        if self.training and not update_running_stats:
            # Same op as norm1(x) (checkpoint needs the same saved tensors) but the running statistics it
            # updates are throwaway copies, and num_batches_tracked is left alone.
            norm = self.norm1
            running_mean, running_var = norm.running_mean.clone(), norm.running_var.clone()
            x = F.batch_norm(x, running_mean, running_var, norm.weight, norm.bias, True, 0.0, norm.eps)
        else:
            x = self.norm1(x)
        return self.conv1(self.relu1(x))

    def checkpointed_bottleneck(self, inputs: Sequence[Tensor]) -> Tensor:
        """The bottleneck without keeping the concatenation: it is recomputed during backward."""
        first_call = True

        def run(*tensors: Tensor) -> Tensor:
            # The recompute in backward must not update norm1's running statistics a second time,
            # otherwise they drift from the standard path (torchvision's memory_efficient has that drift).
            nonlocal first_call
            update, first_call = first_call, False
            return self.bottleneck(tensors, update_running_stats=update)

        return cp.checkpoint(run, *inputs, use_reentrant=False)

    def forward(self, inputs: list[Tensor]) -> Tensor:
        needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in inputs)
        if self.memory_efficient and needs_grad:
            x = self.checkpointed_bottleneck(inputs)
        else:
            x = self.bottleneck(inputs)
        x = self.conv2(self.relu2(self.norm2(x)))
        if self.drop_rate > 0:
            x = F.dropout(x, p=self.drop_rate, training=self.training)
        return x


class _DenseBlock(nn.ModuleDict):
    """``num_layers`` dense layers, each seeing the concatenation of all earlier outputs."""

    def __init__(
        self,
        num_layers: int,
        num_input_features: int,
        bn_size: int,
        growth_rate: int,
        drop_rate: float,
        memory_efficient: bool,
    ) -> None:
        super().__init__()
        for i in range(num_layers):
            layer = _DenseLayer(
                num_input_features + i * growth_rate, growth_rate, bn_size, drop_rate, memory_efficient
            )
            self.add_module(f"denselayer{i + 1}", layer)

    def forward(self, init_features: Tensor) -> Tensor:
        features = [init_features]
        for layer in self.values():
            features.append(layer(features))
        return torch.cat(features, 1)


class _Transition(nn.Sequential):
    """BN-ReLU-Conv1x1 to compress channels, then 2x2 average pooling to halve H and W."""

    def __init__(self, num_input_features: int, num_output_features: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(num_input_features)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(num_input_features, num_output_features, kernel_size=1, stride=1, bias=False)
        self.pool = nn.AvgPool2d(kernel_size=2, stride=2)


class DenseNetSE(nn.Module):
    """DenseNet-BC (Huang et al., 2017) with Squeeze-and-Excitation on the head and optionally per block.

    Args:
        num_classes: number of output logits (>= 2).
        growth_rate: channels each dense layer adds.
        block_config: number of dense layers in each block (a list or tuple of positive ints).
        num_init_features: channels of the stem convolution.
        bn_size: bottleneck width as a multiple of ``growth_rate``.
        compression_rate: fraction of channels each transition keeps, in (0, 1].
        drop_rate: dropout after each dense layer, in [0, 1).
        se_reduction: SE hidden width is ``channels // se_reduction``.
        se_placement: "head" (SE on the final features, before pooling), "blocks" (also after every dense
            block, before its transition) or "none" (a plain DenseNet).
        memory_efficient: recompute each layer's concat+BN+ReLU+1x1 conv in backward instead of storing it.
        pretrained: None, "imagenet" (torchvision's DenseNet-121 weights; needs the 121 layout and a
            download) or a path to a state-dict file; see ``load_pretrained``.
    """

    def __init__(
        self,
        num_classes: int,
        *,
        growth_rate: int = 32,
        block_config: Sequence[int] = (6, 12, 24, 16),
        num_init_features: int = 64,
        bn_size: int = 4,
        compression_rate: float = 0.5,
        drop_rate: float = 0.0,
        se_reduction: int = 8,
        se_placement: str = "head",
        memory_efficient: bool = False,
        pretrained: str | os.PathLike[str] | None = None,
    ) -> None:
        super().__init__()
        check_pretrained(pretrained)
        checked = check_layout(
            num_classes,
            growth_rate=growth_rate,
            block_config=block_config,
            num_init_features=num_init_features,
            bn_size=bn_size,
            compression_rate=compression_rate,
            drop_rate=drop_rate,
            se_reduction=se_reduction,
            se_placement=se_placement,
            memory_efficient=memory_efficient,
        )
        num_classes, growth_rate, block_config, num_init_features, bn_size = (
            checked[k] for k in ("num_classes", "growth_rate", "block_config", "num_init_features", "bn_size")
        )
        compression_rate, drop_rate, se_reduction = (
            checked[k] for k in ("compression_rate", "drop_rate", "se_reduction")
        )
        block_channels = _block_channels(growth_rate, block_config, num_init_features, compression_rate)

        self.num_classes = num_classes
        self.se_placement = se_placement
        self.layout = {key: checked[key] for key in DENSENET121_LAYOUT}

        self.features = nn.Sequential(
            OrderedDict(
                [
                    (
                        "conv0",
                        nn.Conv2d(3, num_init_features, kernel_size=7, stride=2, padding=3, bias=False),
                    ),
                    ("norm0", nn.BatchNorm2d(num_init_features)),
                    ("relu0", nn.ReLU(inplace=True)),
                    ("pool0", nn.MaxPool2d(kernel_size=3, stride=2, padding=1)),
                ]
            )
        )
        num_features = num_init_features
        for i, num_layers in enumerate(block_config, start=1):
            block = _DenseBlock(num_layers, num_features, bn_size, growth_rate, drop_rate, memory_efficient)
            self.features.add_module(f"denseblock{i}", block)
            num_features = block_channels[i - 1]
            if se_placement == "blocks":
                self.features.add_module(f"se{i}", SqueezeExcitation(num_features, se_reduction))
            if i != len(block_config):
                out_features = int(num_features * compression_rate)
                self.features.add_module(f"transition{i}", _Transition(num_features, out_features))
                num_features = out_features
        self.features.add_module("norm5", nn.BatchNorm2d(num_features))
        self.num_features = num_features
        self.se = SqueezeExcitation(num_features, se_reduction) if se_placement != "none" else nn.Identity()
        self.classifier = nn.Linear(num_features, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.Linear):
                nn.init.constant_(m.bias, 0)

        self.pretrained_report: LoadReport | None = None
        if pretrained is not None:
            self.pretrained_report = load_pretrained(self, pretrained)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.features(x), inplace=True)
        x = self.se(x)
        # mean over H, W: global pooling for any input size, deterministic backward on CUDA.
        return self.classifier(x.mean((2, 3)))


def _argument(name: str, value: object, kind: type, rule: Rule | None = None) -> Any:
    """`value` if it is a `kind` its rule (ALLOWED[name]) allows, else ValueError in the words of the rule."""
    rule = ALLOWED[name] if rule is None else rule
    if isinstance(rule, tuple) or (isinstance(value, kind) and not isinstance(value, (bool, str, bytes))):
        message = problem(name, value, rule)
    else:
        message = f"{name}={shown(value)} is out of range; it must be {rule.words}."
    if message:
        raise ValueError(message)
    return value


def check_layout(
    num_classes: object,
    *,
    growth_rate: object,
    block_config: object,
    num_init_features: object,
    bn_size: object,
    compression_rate: object,
    drop_rate: object,
    se_reduction: object,
    se_placement: object,
    memory_efficient: object,
) -> dict[str, Any]:
    """DenseNetSE's settings checked (types, ranges, parameter count) and normalised; ValueError names the first
    bad one. Nothing is allocated, so untrusted values (a checkpoint's hyper_parameters) can be checked here."""
    checked: dict[str, Any] = {
        "num_classes": int(_argument("num_classes", num_classes, Integral, at_least(2))),
        "growth_rate": int(_argument("growth_rate", growth_rate, Integral)),
        "block_config": tuple(int(n) for n in _argument("block_config", block_config, Sequence)),
        "num_init_features": int(_argument("num_init_features", num_init_features, Integral)),
        "bn_size": int(_argument("bn_size", bn_size, Integral)),
        "compression_rate": float(_argument("compression_rate", compression_rate, Real)),
        "drop_rate": float(_argument("drop_rate", drop_rate, Real)),
        "se_reduction": int(_argument("se_reduction", se_reduction, Integral)),
        "se_placement": _argument("se_placement", se_placement, str),
        "memory_efficient": memory_efficient,
    }
    if not isinstance(memory_efficient, bool):
        raise ValueError(f"memory_efficient must be true or false, got {shown(memory_efficient)}")
    block_channels = _block_channels(
        checked["growth_rate"],
        checked["block_config"],
        checked["num_init_features"],
        checked["compression_rate"],
    )
    se_channels = block_channels if se_placement == "blocks" else block_channels[-1:]
    if se_placement != "none" and checked["se_reduction"] > min(se_channels):
        raise ValueError(
            f"se_reduction must be between 1 and {min(se_channels)} (the fewest channels a "
            f"squeeze-excitation sees in this layout), got {checked['se_reduction']}"
        )
    check_parameter_count(**{k: v for k, v in checked.items() if k not in ("drop_rate", "memory_efficient")})
    return checked


def parameter_count(
    num_classes: int,
    *,
    growth_rate: int,
    block_config: Sequence[int],
    num_init_features: int,
    bn_size: int,
    compression_rate: float,
    se_reduction: int,
    se_placement: str,
) -> int:
    """The number of parameters of DenseNetSE(...) with these (already checked) settings, without building it."""
    k, width = growth_rate, bn_size * growth_rate
    count = 3 * 49 * num_init_features + 2 * num_init_features  # conv0, norm0
    channels, se_channels = num_init_features, []
    for i, n in enumerate(block_config, start=1):
        inputs = n * channels + k * n * (n - 1) // 2  # sum of the layers' input channels, in closed form
        count += (2 + width) * inputs + n * (2 * width + 9 * width * k)  # norm1, conv1, norm2, conv2
        channels += n * k
        se_channels.append(channels)
        if i != len(block_config):
            out = int(channels * compression_rate)
            count += 2 * channels + channels * out  # transition norm, conv
            channels = out
    count += 2 * channels + channels * num_classes + num_classes  # norm5, classifier
    squeezed = {"none": [], "head": [channels], "blocks": [*se_channels, channels]}[se_placement]
    return count + sum(2 * c * (c // se_reduction) for c in squeezed)


def feature_bytes(
    image_size: int,
    *,
    growth_rate: int,
    block_config: Sequence[int],
    num_init_features: int,
    bn_size: int,
    compression_rate: float,
) -> int:
    """An upper estimate of the float32 activations one image of `image_size` px holds at once in inference.

    The stem keeps its convolution and batch-norm outputs at half resolution; a dense block holds the features
    so far, their concatenation and its normalisation, and the bottleneck twice.
    """
    side = (image_size + 1) // 2
    peak = 2 * num_init_features * side * side
    side = (side + 1) // 2
    channels = num_init_features
    for i, n in enumerate(block_config, start=1):
        channels += n * growth_rate
        peak = max(peak, (3 * channels + 2 * bn_size * growth_rate) * side * side)
        if i != len(block_config):
            channels, side = int(channels * compression_rate), side // 2
    return 4 * peak


def check_parameter_count(num_classes: int, **layout: object) -> int:
    """parameter_count(...), or ValueError when it exceeds MAX_PARAMETERS."""
    count = parameter_count(num_classes, **layout)  # type: ignore[arg-type]
    refused = too_many_parameters(
        count, f"this layout ({_describe(layout)}, num_classes={shown(num_classes)})"
    )
    if refused:
        raise ValueError(refused)
    return count


def check_feature_bytes(image_size: int, **layout: object) -> int:
    """feature_bytes(...), or ValueError when one image would need more than MAX_FEATURE_BYTES."""
    chosen = {k: layout[k] for k in _FEATURE_KEYS}
    need = feature_bytes(image_size, **chosen)  # type: ignore[arg-type]
    refused = too_many_feature_bytes(
        need, f"image_size={shown(image_size)} with this layout ({_describe(chosen)})"
    )
    if refused:
        raise ValueError(refused)
    return need


_FEATURE_KEYS = ("growth_rate", "block_config", "num_init_features", "bn_size", "compression_rate")


def _block_channels(
    growth_rate: int, block_config: tuple[int, ...], num_init_features: int, compression_rate: float
) -> list[int]:
    """Output channels of every dense block, checking that no transition is compressed to nothing."""
    channels, num_features = [], num_init_features
    for i, num_layers in enumerate(block_config, start=1):
        num_features += num_layers * growth_rate
        channels.append(num_features)
        if i != len(block_config):
            if int(num_features * compression_rate) < 1:
                raise ValueError(
                    f"compression_rate {compression_rate} leaves transition{i} with no channels "
                    f"({num_features} * {compression_rate} < 1); raise compression_rate"
                )
            num_features = int(num_features * compression_rate)
    return channels


# Every DenseNetSE argument but num_classes, from its signature: the model.* keys that build the network.
MODEL_KEYS = tuple(
    name
    for name, param in inspect.signature(DenseNetSE.__init__).parameters.items()
    if param.kind is inspect.Parameter.KEYWORD_ONLY
)


# Pretrained weights -------------------------------------------------------------------------------------

# Keys that are ours, not torchvision's backbone: they may be absent from (or differ in) a file.
_HEAD_KEY = re.compile(r"^(classifier|se|features\.se\d+)\.")


def is_head_key(key: str) -> bool:
    """True for the state-dict keys of the head (SE modules and classifier), False for the torchvision backbone."""
    return _HEAD_KEY.match(key) is not None


# Releases of torchvision before 0.3 named layer parts "norm.1", "conv.2", ...; their files (torchvision's
# own ImageNet DenseNet-121 included) still carry those keys.
_OLD_LAYER_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$"
)
_ANCHOR_KEY = "features.conv0.weight"


def load_pretrained(model: DenseNetSE, source: str | os.PathLike[str]) -> LoadReport:
    """Load a torchvision-format DenseNet state dict into ``model``'s backbone (and head where it fits).

    ``source`` is "imagenet" (torchvision's DenseNet121_Weights.IMAGENET1K_V1) or a path to a file holding
    a state dict, or a Lightning checkpoint whose ``state_dict`` keys carry a prefix such as ``model.``.
    Backbone keys must all match in name and shape (else ValueError); SE and classifier tensors load when
    their shapes fit and are otherwise reported as new (model side) and skipped (file side).
    """
    if isinstance(source, str) and source == "imagenet":
        label = "torchvision's DenseNet121_Weights.IMAGENET1K_V1"
        state_dict = _download_imagenet(model)
    else:
        label = str(source)
        state_dict = read_state_dict(Path(source).expanduser())
    state_dict = _torchvision_keys(state_dict, label)

    def mismatch(detail: str) -> NoReturn:
        _layout_mismatch(model, state_dict, label, detail)

    return load_matching(model, state_dict, label, is_head_key, mismatch)


def _download_imagenet(model: DenseNetSE) -> dict[str, Tensor]:
    if model.layout != DENSENET121_LAYOUT:
        raise ValueError(
            "pretrained='imagenet' holds DenseNet-121 weights, so it needs growth_rate=32, "
            "block_config=[6, 12, 24, 16], num_init_features=64, bn_size=4, compression_rate=0.5 "
            f"(got {_describe(model.layout)}); use that layout or pretrained=null"
        )
    from torchvision.models import DenseNet121_Weights  # torchvision is only needed here

    return download_state_dict(DenseNet121_Weights.IMAGENET1K_V1.url)


def _torchvision_keys(state_dict: Mapping[str, Tensor], label: str) -> dict[str, Tensor]:
    """Strip a wrapper prefix ("model.", "module.") and rename pre-0.3 torchvision layer keys."""
    stripped = strip_prefix(state_dict, _ANCHOR_KEY)
    if stripped is None:
        raise ValueError(
            f"pretrained {label} holds no DenseNet weights (no key ending in {_ANCHOR_KEY}); "
            "point pretrained at a DenseNet state dict or set it to null"
        )
    return {_OLD_LAYER_KEY.sub(r"\1\2", key): value for key, value in stripped.items()}


def _layout_mismatch(
    model: DenseNetSE, state_dict: Mapping[str, Tensor], label: str, detail: str
) -> NoReturn:
    found = _infer_layout(state_dict)
    raise ValueError(
        f"pretrained {label} does not match this model's layout: {detail}; the model has "
        f"{_describe(model.layout)}{f' and the file looks like {found}' if found else ''}; "
        "build the model with the file's layout or set pretrained to null"
    )


def _infer_layout(state_dict: Mapping[str, Tensor]) -> str:
    """Best-effort description of the layout a torchvision-format DenseNet state dict was saved from."""
    try:
        growth_rate = state_dict["features.denseblock1.denselayer1.conv2.weight"].shape[0]
        bottleneck = state_dict["features.denseblock1.denselayer1.conv1.weight"].shape[0]
        layers: dict[int, int] = {}
        for key in state_dict:
            match = re.match(r"features\.denseblock(\d+)\.denselayer(\d+)\.", key)
            if match:
                block, layer = int(match[1]), int(match[2])
                layers[block] = max(layers.get(block, 0), layer)
        layout = {
            "growth_rate": growth_rate,
            "block_config": tuple(layers[b] for b in sorted(layers)),
            "num_init_features": state_dict[_ANCHOR_KEY].shape[0],
            "bn_size": bottleneck // growth_rate,
        }
    except (KeyError, IndexError, ZeroDivisionError):
        return ""
    return _describe(layout)


def _describe(layout: Mapping[str, object]) -> str:
    return ", ".join(
        f"{k}={shown(list(v) if isinstance(v, tuple) else v)}" for k, v in layout.items() if v is not None
    )
