"""Allowed values of settings, declared once beside the code that uses them, and the one sentence for a bad one.

An owner (the data module, the split, the model, the optimiser set-up) declares `ALLOWED = {argument: rule}`,
where a rule is a tuple of choices or a Range. Its constructor checks its own arguments with that table, and
`densenet_se.config.validate` checks the composed config with the same table before any work starts.
Torch-free and config-free: values are plain Python values.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Union

from densenet_se.errors import UserError, shown


@dataclass(frozen=True)
class Range:
    """Allowed values: a predicate, and the words a message uses for them ("an integer >= 1")."""

    ok: Callable[[Any], bool]
    words: str

    def allows(self, value: Any) -> bool:
        try:
            return bool(self.ok(value))
        except (TypeError, ValueError):  # a string where a number belongs
            return False


Rule = Union[Range, tuple[str, ...]]  # noqa: UP007 - a runtime alias, read by Python 3.10 too


def at_least(low: int) -> Range:
    """An integer >= low."""
    return Range(lambda v: v >= low, f"an integer >= {low}")


def interval(low: float, high: float, ends: str = "[)") -> Range:
    """A number from low to high; `ends` is "()", "[)", "(]" or "[]" (a bracket: that end is allowed)."""

    def ok(v: Any) -> bool:
        above = v >= low if ends[0] == "[" else v > low
        below = v <= high if ends[1] == "]" else v < high
        return above and below

    return Range(ok, f"a number in {ends[0]}{low:g}, {high:g}{ends[1]}")


def problem(key: str, value: Any, rule: Rule) -> str | None:
    """The sentence that says why `value` is not allowed for `key`, or None when it is."""
    if isinstance(rule, tuple):
        if value in rule:
            return None
        return f"{key}={shown(value)} is not allowed; choose one of: {', '.join(rule)}."
    if rule.allows(value):
        return None
    return f"{key}={shown(value)} is out of range; it must be {rule.words}."


def check(
    values: Mapping[str, Any],
    allowed: Mapping[str, Rule],
    prefix: str = "",
    error: Callable[[str], Exception] = UserError,
) -> None:
    """Raise `error` for the first of `values` outside its rule; None is left unchecked.

    `prefix` names the values as a person sets them (`data.` for the data module's arguments).
    """
    for name, rule in allowed.items():
        value = values.get(name)
        message = None if value is None else problem(f"{prefix}{name}", value, rule)
        if message is not None:
            raise error(message)
