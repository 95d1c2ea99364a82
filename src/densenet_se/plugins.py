"""Finding the registered parts of a package (backbones, data sources): each module that defines one is one.

Torch-free; the modules are imported when a registry first asks, never as a side effect of importing a package.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterable
from typing import TypeVar

T = TypeVar("T")


def discover(package: str, path: Iterable[str], attribute: str, kind: type[T]) -> list[T]:
    """The `attribute` of each module of `package` (whose `__path__` is `path`) that defines one of type `kind`."""
    found: list[T] = []
    for info in pkgutil.iter_modules(list(path)):
        value = getattr(importlib.import_module(f"{package}.{info.name}"), attribute, None)
        if isinstance(value, kind):
            found.append(value)
    return found
