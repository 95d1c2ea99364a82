"""Errors meant for people rather than for stack traces."""

from __future__ import annotations


class UserError(Exception):
    """Something a person must fix (a path, a config value, a bad file); the message is one clear sentence."""


class StorageError(UserError, OSError):
    """A write the storage refused (disk full, quota, read-only); still an OSError for callers that tolerate it."""
