"""Errors meant for people rather than for stack traces."""

from __future__ import annotations


class UserError(Exception):
    """Something a person must fix (a path, a config value, a bad file); the message is one clear sentence."""


def shown(value: object, limit: int = 60) -> str:
    """`repr(value)` for an error message, cut to about `limit` characters (huge integers and lists too)."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**limit:
        return f"an integer of {int(abs(value).bit_length() * 0.30103) + 1} digits"
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 6]}...{text[-3:]}"


class StorageError(UserError, OSError):
    """A write the storage refused (disk full, quota, read-only); still an OSError for callers that tolerate it."""
