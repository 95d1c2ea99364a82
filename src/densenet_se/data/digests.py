"""Content digests: a hash of each image file's bytes, so a changed picture is noticed whatever its name,
size or mtime says (resume refuses it, the disk cache rebuilds)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

# BLAKE2b with a 16-byte digest: fast in software on every CPU (hashlib, no extra package), and 128 bits
# make an accidental match of two different files impossible in practice.
DIGEST_NAME = "blake2b-128"
_CHUNK = 1 << 20
T = TypeVar("T")
R = TypeVar("R")


def digest_bytes(data: bytes | memoryview) -> str:
    """The hex digest of `data` (DIGEST_NAME)."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def file_digest(path: str | os.PathLike[str]) -> str:
    """The hex digest of a file's bytes, read in 1 MiB chunks; "" if the file cannot be read."""
    h = hashlib.blake2b(digest_size=16)
    try:
        with open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
    except OSError:  # gone, a folder, no permission: decoding reports it as a bad file
        return ""
    return h.hexdigest()


def threads() -> int:
    """Worker threads for file and hash work: hashlib and PIL release the GIL, so threads scale."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS
        cpus = os.cpu_count() or 1
    return max(1, min(8, cpus))


def map_in_chunks(fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
    """fn over items in a few threads, each taking a contiguous run (small files cost more to hand out than to
    hash one by one through a pool)."""
    n = min(threads(), max(1, len(items) // 64))
    if n == 1:
        return [fn(item) for item in items]
    bounds = [len(items) * i // n for i in range(n + 1)]
    with ThreadPoolExecutor(n) as pool:
        runs = pool.map(lambda i: [fn(x) for x in items[bounds[i] : bounds[i + 1]]], range(n))
        return [result for run in runs for result in run]


def file_digests(root: Path, files: Sequence[str]) -> list[str]:
    """The digest of each file (relative to `root`), in order."""
    return map_in_chunks(lambda rel: file_digest(root / rel), files)


def changed_files(recorded: object, current: dict[str, str]) -> list[str]:
    """The files whose recorded digest differs from `current` (both {relative path: digest}).

    Raises ValueError if `recorded` is not such a mapping (a damaged or hand-edited split.json).
    """
    if not isinstance(recorded, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in recorded.items()
    ):
        raise ValueError("its digests are not a {path: digest} mapping")
    return sorted(rel for rel in set(recorded) | set(current) if recorded.get(rel) != current.get(rel))
