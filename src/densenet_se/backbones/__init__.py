"""The backbone registry: `model.arch` -> Backbone. Each module of this package that defines `BACKBONE` is an arch.

Adding a backbone takes one file here (its schema, ALLOWED table, size check, builder, head and Grad-CAM layer;
see densenet_se.backbones.torchvision) plus one YAML in conf/model/ (docs/ARCHITECTURE.md). The modules are found
by `registry()` when it is first called, not by importing this package, and only a name the registry holds is
ever looked up: an arch read from a checkpoint never selects code by itself.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

from densenet_se.backbones.base import (
    COMMON_KEYS,
    DEFAULT_ARCH,
    SCHEMA_GROUP,
    Backbone,
    ModelSettings,
    schema_name,
)
from densenet_se.checks import problem
from densenet_se.errors import shown
from densenet_se.plugins import discover

__all__ = [
    "COMMON_KEYS",
    "DEFAULT_ARCH",
    "Backbone",
    "ModelSettings",
    "checked",
    "get",
    "model_keys",
    "registry",
    "SCHEMA_GROUP",
    "schema_name",
    "settings",
]


@functools.cache
def registry() -> dict[str, Backbone]:
    """Every registered arch by name, the default first."""
    found = {backbone.arch: backbone for backbone in discover(__name__, __path__, "BACKBONE", Backbone)}
    return dict(sorted(found.items(), key=lambda item: (item[0] != DEFAULT_ARCH, item[0])))


def get(arch: object) -> Backbone:
    """The registered arch `arch`; ValueError listing the registered ones otherwise."""
    table = registry()
    if isinstance(arch, str) and arch in table:
        return table[arch]
    raise ValueError(problem("model.arch", arch, tuple(table)))


def settings(model: Mapping[str, Any] | None) -> dict[str, Any]:
    """Every model.* setting of `model`'s arch (default: densenet_se): its values over the arch's defaults."""
    given = dict(model or {})
    backbone = get(given.get("arch", DEFAULT_ARCH))
    defaults = backbone.defaults()
    unknown = [key for key in given if key not in defaults]
    if unknown:
        key = unknown[0] if isinstance(unknown[0], str) and unknown[0].isidentifier() else shown(unknown[0])
        raise ValueError(
            f"model.{key} is not a setting of model.arch={backbone.arch}; its settings are {', '.join(defaults)}"
        )
    return {**defaults, **given}


def checked(num_classes: int, image_size: int, model: Mapping[str, Any] | None) -> dict[str, Any]:
    """`model`'s settings checked for type, range and size by its arch, as plain values; nothing is allocated,
    so untrusted settings (a checkpoint's) are checked here. ValueError names the first bad one."""
    values = settings(model)
    for key in ("channels_last", "compile"):
        if not isinstance(values[key], bool):
            raise ValueError(f"{key} must be true or false, got {shown(values[key])}")
    return get(values["arch"]).check(num_classes, image_size, values)


def model_keys() -> tuple[str, ...]:
    """Every model.* key some arch has (for "did you mean")."""
    keys: dict[str, None] = {}
    for backbone in registry().values():
        keys.update(dict.fromkeys(backbone.defaults()))
    return tuple(keys)
