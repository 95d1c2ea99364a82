"""The data-source registry: `data.source` -> Source. Each module of this package that defines `SOURCE` is a source.

A source names a data set's images and their classes under data.root (sub-folders, a CSV of path,label rows, ...);
everything after that is shared. Adding one takes one file here plus one YAML in conf/data/
(docs/ARCHITECTURE.md). The modules are found by `registry()` when it is first called, not by importing this
package, and only a name the registry holds is ever looked up: a name read from a config selects no code by itself.
"""

from __future__ import annotations

import functools
from typing import Any

from densenet_se.checks import Rule, problem
from densenet_se.data.sources.base import (
    DEFAULT_SOURCE,
    MAX_CLASS_NAME,
    Listing,
    Source,
    listing_from_rows,
)
from densenet_se.errors import UserError
from densenet_se.plugins import discover

__all__ = [
    "DEFAULT_SOURCE",
    "MAX_CLASS_NAME",
    "Listing",
    "Source",
    "allowed",
    "check",
    "check_labels",
    "get",
    "listing_from_rows",
    "registry",
]


@functools.cache
def registry() -> dict[str, Source]:
    """Every registered source by name, sorted."""
    found = {source.name: source for source in discover(__name__, __path__, "SOURCE", Source)}
    return dict(sorted(found.items()))


def allowed() -> dict[str, Rule]:
    """data.source's rule: a registered name (the data module's ALLOWED table gets it from here)."""
    return {"source": tuple(registry())}


def get(name: object) -> Source:
    """The registered source `name`; UserError listing the registered ones otherwise."""
    table = registry()
    if isinstance(name, str) and name in table:
        return table[name]
    raise UserError(problem("data.source", name, tuple(table)) or f"data.source={name} is not registered.")


def check_labels(source: str, labels: str | None) -> None:
    """UserError unless data.labels is given exactly when the source reads one."""
    chosen = get(source)
    if chosen.labels is not None and not labels:
        raise UserError(
            f"data.source={source} reads its images and classes from data.labels, which is not set; give "
            f"data.labels=<{chosen.labels}>."
        )
    if chosen.labels is None and labels:
        readers = ", ".join(f"data={s.config}" for s in registry().values() if s.labels is not None)
        raise UserError(
            f"data.labels={labels} is not read by data.source={source} (its classes are its sub-folders); set "
            f"data.labels=null, or choose a source that reads it ({readers})."
        )


def check(cfg: Any) -> None:
    """config.validate's cross-key check: data.labels is set exactly when data.source reads it."""
    data = cfg.data
    check_labels(data.get("source") or DEFAULT_SOURCE, data.get("labels"))
