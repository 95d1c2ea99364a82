"""The contract between the training stack and one network family (an arch), and the settings every arch has.

Torch-free, like every module of this package: Hydra registers the arch schemas before torch loads, so a config
error is reported in a fraction of a second. Whatever needs torch is imported inside the functions.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any

from omegaconf import MISSING

from densenet_se.checks import Rule

if TYPE_CHECKING:
    from torch import nn


# The arch of a config or checkpoint that names none: written before model.arch existed, when it was the only one.
DEFAULT_ARCH = "densenet_se"


@dataclass
class ModelSettings:
    """The model.* keys every arch has; an arch's schema subclasses it with its own keys and defaults."""

    # Which registered backbone builds the network (set by the conf/model/ file that is chosen).
    arch: str = MISSING
    # None (random init), "imagenet" (torchvision's weights) or the path to a state-dict file.
    pretrained: str | None = None
    # The Lightning module's own two: channels_last memory format, and torch.compile of the network.
    channels_last: bool = False
    compile: bool = False


COMMON_KEYS = tuple(f.name for f in fields(ModelSettings))


@dataclass(frozen=True)
class Backbone:
    """One registered arch: its settings and how the training stack checks, builds and explains its network.

    `check` and `build` take the arch's settings as a plain dict (every key of `schema`); `check` allocates
    nothing, so untrusted settings (a checkpoint's hyper_parameters) are checked before `build` runs.
    """

    arch: str  # the value of model.arch
    schema: type[
        ModelSettings
    ]  # its model.* keys, types and defaults (Hydra's typing; conf/model/ mirrors it)
    config: (
        str  # conf/model/<config>.yaml: the commented defaults, whose defaults list names schema_name(arch)
    )
    allowed: Callable[[], Mapping[str, Rule]]  # its ALLOWED table (own key -> rule), for config.validate
    # (num_classes, image_size, settings) -> the settings checked and normalised; ValueError names a bad one.
    check: Callable[[int, int, dict[str, Any]], dict[str, Any]]
    build: Callable[[int, dict[str, Any]], nn.Module]  # (num_classes, checked settings) -> the network
    layout_keys: tuple[str, ...]  # the settings that fix the state dict's keys and shapes (resume, export)
    cam_layer: Callable[
        [Mapping[str, Any]], str | None
    ]  # the module Grad-CAM hooks (None: the arch has none)
    head: Callable[[nn.Module], tuple[str, ...]]  # module names of the new head (fine-tuning trains it at lr)
    rebuild: str  # how a consumer rebuilds the network from an exported state dict (the export sidecar)

    def defaults(self) -> dict[str, Any]:
        """Every setting of this arch with its default."""
        return asdict(self.schema())

    def own_keys(self) -> tuple[str, ...]:
        """The arch's own settings (model.* minus the keys every arch has)."""
        return tuple(f.name for f in fields(self.schema) if f.name not in COMMON_KEYS)


SCHEMA_GROUP = "model_schema"  # a group of its own, so `model=` lists only the conf/model/ files


def schema_name(arch: str) -> str:
    """The defaults-list entry of an arch's schema (ConfigStore group SCHEMA_GROUP) in its conf/model/ file."""
    return f"/{SCHEMA_GROUP}/{arch}@_here_"
