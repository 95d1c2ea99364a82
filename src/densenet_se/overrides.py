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


def quoting_hint(override: str) -> str:
    """The one sentence for an override Hydra's grammar cannot parse: the quoting rule, shown on the override."""
    left, sep, value = override.partition("=")
    rule = (
        f"cannot parse the override {override}: in a value, ( ) [ ] {{ }} = , ; ^ ~ ! # & < > and quotes are "
        "Hydra syntax, so quote a text value: key='value'"
    )
    if value.lstrip().startswith(("[", "{")):
        return f"{rule}, and write a list whole: key=[1,2]."
    if not sep or "'" in value or '"' in value:
        return f"{rule}."
    # The outer double quotes are for the shell, which would otherwise drop the inner ones.
    return f"{rule}, e.g. \"{left}='{value}'\" on the command line."


def comma_hint(override: str) -> str:
    """The one sentence for `key=a,b` outside a sweep: Hydra cannot tell a text from a list or a sweep."""
    left, _, value = override.partition("=")
    return (
        f"{override} has a comma, so it reads as several values: quote a text value "
        f"(\"{left}='{value}'\"), write a list as {left}=[{value}], or add -m to sweep over the values."
    )
