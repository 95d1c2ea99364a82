"""Errors meant for people rather than for stack traces."""

from __future__ import annotations


class UserError(Exception):
    """Something a person must fix (a path, a config value, a bad file); the message is one clear sentence."""
