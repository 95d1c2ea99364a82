"""model.arch=torchvision: any torchvision classification model by name (model.name=resnet50, efficientnet_b0,
convnext_tiny, ...), the baselines a paper compares DenseNet+SE against. This file and conf/model/torchvision.yaml
are the whole arch: the worked example of adding a backbone (docs/ARCHITECTURE.md).

The head: torchvision builds the network for num_classes itself (`get_model(name, weights=None,
num_classes=N)`), so the classifier is torchvision's own last layer in its usual place (resnet `fc`, efficientnet
`classifier.1`, convnext `classifier.2`, squeezenet's 1x1 convolution `classifier.1`) and every state-dict key
is torchvision's. `pretrained=imagenet` (or a state-dict file) then fills everything else; a 1000-class layer
fits no other num_classes, so the head starts fresh. The head is that last Linear (or Conv2d) layer.

Only names torchvision lists as classification models are built (never a callable named by a file), and a name
is checked by building it on the meta device: parameter count, output size and activations per image are known
before anything is allocated, and an image size the model cannot take is one sentence.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from numbers import Integral
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from densenet_se.backbones.base import Backbone, ModelSettings
from densenet_se.checks import Range, Rule, problem
from densenet_se.errors import shown

if TYPE_CHECKING:
    from torch import nn

    from densenet_se.models.common import LoadReport


@dataclass
class TorchvisionConfig(ModelSettings):
    """model.* of arch torchvision; conf/model/torchvision.yaml mirrors it."""

    arch: str = "torchvision"
    name: str = "resnet50"


# Builder arguments two models need: no auxiliary classifiers (extra training outputs with a loss of their own),
# torchvision's current initialisation (without its FutureWarning), and their input re-normalisation: the data
# module normalises with ImageNet statistics and their ImageNet weights were trained on (x - 0.5) / 0.5, which
# transform_input converts to. Always on, pretrained or not, so that a rebuilt network computes the same.
_BUILDER_KWARGS = {
    name: {"aux_logits": False, "init_weights": True, "transform_input": True}
    for name in ("googlenet", "inception_v3")
}
# Their ImageNet files still hold those auxiliary classifiers: not loaded, and no reason to refuse the file.
_AUX_KEYS = ("aux1.", "aux2.", "AuxLogits.")
# The layer Grad-CAM hooks, by model family (name prefix): the last feature map before global pooling.
# ViTs have none (their encoder outputs tokens), so Grad-CAM is not offered for them.
CAM_LAYERS = (
    ("resnet", "layer4"),
    ("resnext", "layer4"),
    ("wide_resnet", "layer4"),
    ("regnet", "trunk_output"),
    ("densenet", "features"),
    ("efficientnet", "features"),
    ("mobilenet", "features"),
    ("convnext", "features"),
    ("vgg", "features"),
    ("alexnet", "features"),
    ("squeezenet", "features"),
    ("mnasnet", "layers"),
    ("shufflenet", "conv5"),
    ("googlenet", "inception5b"),
    ("inception", "Mixed_7c"),
    ("swin", "permute"),  # swin's features are channels-last; `permute` turns them into [N, C, H, W]
    ("maxvit", "blocks.3"),  # maxvit_t, the only one: its four blocks are a ModuleList, never called whole
)


def names() -> tuple[str, ...]:
    """The classification models torchvision lists: the allowed values of model.name."""
    import torchvision.models

    return tuple(torchvision.models.list_models(module=torchvision.models))


def _allowed() -> Mapping[str, Rule]:
    """model.name: a Range, not a tuple of choices, so that a bad name gets a sentence rather than 80 names."""
    return {"name": NAME}


NAME = Range(
    lambda v: isinstance(v, str) and v in names(),
    "the name of a torchvision classification model, such as resnet18, resnet50, efficientnet_b0, "
    "convnext_tiny or mobilenet_v3_small (torchvision.models.list_models() lists them)",
)


def network(name: str, num_classes: int) -> nn.Module:
    """torchvision's `name` for num_classes, randomly initialised; `name` must be one of names()."""
    import torchvision.models

    if not NAME.allows(name):  # checked again here: get_model must only ever see a listed name
        raise ValueError(problem("name", name, NAME))
    return torchvision.models.get_model(
        name, weights=None, num_classes=num_classes, **_BUILDER_KWARGS.get(name, {})
    )


def head_name(net: nn.Module) -> str:
    """The module name of the classifier layer: the network's last Linear or Conv2d."""
    from torch import nn

    layers = [name for name, m in net.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    return layers[-1]


def _check(num_classes: int, image_size: int, settings: dict[str, Any]) -> dict[str, Any]:
    import torch

    from densenet_se.models.common import (
        build_on_meta,
        first_line,
        too_many_feature_bytes,
        too_many_parameters,
    )

    name = settings["name"]
    refused = problem("name", name, NAME)
    if refused:
        raise ValueError(refused)
    if isinstance(num_classes, bool) or not isinstance(num_classes, Integral) or num_classes < 2:
        raise ValueError(f"num_classes must be an integer >= 2, got {shown(num_classes)}")
    net = build_on_meta(lambda: network(name, int(num_classes)))
    what = f"torchvision's {name}"
    refused = too_many_parameters(
        sum(p.numel() for p in net.parameters()), f"{what} with {num_classes} classes"
    )
    if refused:
        raise ValueError(refused)
    largest = [0]

    def measure(module: nn.Module, inputs: Any, output: Any) -> None:
        if isinstance(output, torch.Tensor):
            largest[0] = max(largest[0], output.numel())

    leaves = [m for m in net.modules() if not any(True for _ in m.children())]
    hooks = [m.register_forward_hook(measure) for m in leaves]
    try:
        with torch.no_grad():
            logits = net(torch.empty(1, 3, image_size, image_size, device="meta"))
    except Exception as err:  # noqa: BLE001 - whatever the model says about the size, it is one sentence
        raise ValueError(
            f"{what} cannot take {image_size} px images ({first_line(err)}); use an image size it takes "
            "(data.image_size=224 fits every torchvision model)"
        ) from None
    finally:
        for hook in hooks:
            hook.remove()
    if tuple(logits.shape) != (1, num_classes):
        raise ValueError(f"{what} gives outputs of shape {tuple(logits.shape)}, not [N, num_classes]")
    # The largest map held as a layer's input, its output and a skip connection, in float32.
    refused = too_many_feature_bytes(3 * 4 * largest[0], f"image_size={image_size} with {what}")
    if refused:
        raise ValueError(refused)
    return dict(settings)


def _build(num_classes: int, settings: dict[str, Any]) -> nn.Module:
    from densenet_se.models.common import check_pretrained

    check_pretrained(settings["pretrained"])
    net = network(settings["name"], num_classes)
    if settings["pretrained"] is not None:
        net.pretrained_report = load_pretrained(net, settings["name"], settings["pretrained"])
    return net


def load_pretrained(net: nn.Module, name: str, source: str) -> LoadReport:
    """Load torchvision's ImageNet weights of `name` ("imagenet") or a state-dict file into `net`, its head
    where the shapes fit (models.common.load_matching)."""
    from densenet_se.models.common import download_state_dict, load_matching, read_state_dict, strip_prefix

    if source == "imagenet":
        import torchvision.models

        weights = torchvision.models.get_model_weights(name).DEFAULT
        label = f"torchvision's {type(weights).__name__}.{weights.name}"
        state_dict = download_state_dict(weights.url)
    else:
        label = str(source)
        state_dict = read_state_dict(Path(source).expanduser())
    anchor = next(iter(net.state_dict()))
    stripped = strip_prefix(state_dict, anchor)
    if stripped is None:
        raise ValueError(
            f"pretrained {label} holds no weights of torchvision's {name} (no key {anchor}); point "
            "pretrained at a state dict of that model or set it to null"
        )

    def mismatch(detail: str) -> NoReturn:
        raise ValueError(
            f"pretrained {label} does not fit torchvision's {name}: {detail}; point pretrained at weights "
            f"of {name} or set it to null"
        )

    head = f"{head_name(net)}."
    return load_matching(
        net,
        stripped,
        label,
        lambda key: key.startswith(head),
        mismatch,
        lambda key: key.startswith(_AUX_KEYS),
    )


def cam_layer(settings: Mapping[str, Any]) -> str | None:
    """The module Grad-CAM hooks in torchvision's `settings["name"]`, or None for a model without a map."""
    return next((layer for prefix, layer in CAM_LAYERS if settings["name"].startswith(prefix)), None)


BACKBONE = Backbone(
    arch="torchvision",
    schema=TorchvisionConfig,
    config="torchvision",
    allowed=_allowed,
    check=_check,
    build=_build,
    layout_keys=("name",),
    cam_layer=cam_layer,
    head=lambda net: (head_name(net),),
    rebuild="torchvision.models.get_model(model['name'], num_classes=num_classes) then "
    "load_state_dict(torch.load(<file>, weights_only=True)), or train.py model=torchvision "
    "model.name=<name> model.pretrained=<file>",
)
