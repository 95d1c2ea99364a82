"""Command-line overrides as text: the key an override sets, its value, and the name closest to a typo.

One parser for the entry point, resume, sweeps and fold summaries; torch-free and Hydra-free.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

# How alike (difflib's ratio) a name must be to a mistyped one to be suggested in "did you mean".
CLOSE_ENOUGH = 0.5


def override_key(override: str) -> str:
    """The key an override sets: `a.b=1`, `+a.b=1`, `++a.b=1`, `~a.b` -> `a.b`; `group@pkg=opt` -> `group`."""
    key = override.split("=", 1)[0].lstrip("+~")
    return key.split("@", 1)[0]


def override_value(override: str) -> str | None:
    """The text after the first `=` of an override, or None for one without a value (`~a.b`)."""
    _, sep, value = override.partition("=")
    return value if sep else None


def closest(name: str, names: Iterable[str]) -> str | None:
    """The one of `names` nearest to a mistyped `name` ("did you mean"), or None when none is close enough."""
    found = difflib.get_close_matches(name, list(names), n=1, cutoff=CLOSE_ENOUGH)
    return found[0] if found else None
