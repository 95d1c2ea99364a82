"""File and class names as text people read: one printable line, whatever bytes the file system holds.

Names come from the file system and may hold any byte but `/` and NUL: newlines, tabs, control characters,
and bytes that are not UTF-8 (Python keeps those as lone surrogates, "surrogateescape"). Figures, log lines and
line-based listings show them escaped, so they stay on one line and encode as UTF-8; `parse_name` undoes it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

_SHORT = {"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"}
_UNSHORT = {"\\": "\\", "t": "\t", "n": "\n", "r": "\r"}
_ESCAPE = re.compile(r"\\(?:([\\tnr])|x([0-9a-f]{2})|u([0-9a-f]{4})|U([0-9a-f]{8}))")


def _escape_char(ch: str) -> str:
    code = ord(ch)
    if ch in _SHORT:
        return _SHORT[ch]
    if 0xDC80 <= code <= 0xDCFF:  # a byte that is not UTF-8, as os.fsdecode keeps it: shown as that byte
        return f"\\x{code - 0xDC00:02x}"
    if ch == " " or ch.isprintable():
        return ch
    if code < 0x80:  # control characters and DEL; \xNN above 0x7f always means a raw byte
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"


def display_name(name: str) -> str:
    """`name` as one printable line: backslash, tab, newline, control and undecodable bytes escaped."""
    if "\\" not in name and name.isprintable():
        return name
    return "".join(_escape_char(ch) for ch in name)


def parse_name(text: str) -> str:
    """The name `display_name` escaped (undecodable bytes come back as surrogates, as os.fsdecode gives)."""

    def one(match: re.Match[str]) -> str:
        short, byte, bmp, wide = match.groups()
        if short:
            return _UNSHORT[short]
        if byte:
            value = int(byte, 16)
            return chr(value) if value < 0x80 else chr(0xDC00 + value)
        return chr(int(bmp or wide, 16))

    return _ESCAPE.sub(one, text)


def file_list_text(entries: Iterable[tuple[object, str]]) -> str:
    """`path<TAB>reason` lines (bad_files.txt): both fields escaped, so a name never splits a line."""
    return "".join(f"{display_name(str(path))}\t{display_name(reason)}\n" for path, reason in entries)


def parse_file_list(text: str) -> list[tuple[str, str]]:
    """The (path, reason) pairs of a `file_list_text` listing."""
    pairs = []
    for line in text.splitlines():
        if line:
            path, _, reason = line.partition("\t")
            pairs.append((parse_name(path), parse_name(reason)))
    return pairs
