"""Content digests: a hash of each image file's bytes, so a changed picture is noticed whatever its name,
size or mtime says (resume refuses it, the disk cache rebuilds)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

# SHA-256 cut to 128 bits: in the standard library; on image files every hash costs about what reading them
# does; on the disk cache's shards it is 2.5x faster than BLAKE2b where CPUs have SHA instructions (x86 since
# AMD Zen and Intel Ice Lake, ARMv8); 128 bits make an accidental match of two different files impossible in
# practice. The figures: docs/data-integrity.md.
DIGEST_NAME = "sha256-128"
_CHUNK = 1 << 20
_WHOLE = 16 << 20


def _hasher():
    return hashlib.sha256()


def digest_bytes(data: bytes | bytearray | memoryview) -> str:
    """The hex digest of `data` (DIGEST_NAME)."""
    h = _hasher()
    h.update(data)
    return h.hexdigest()[:32]


def file_digest(path: str | os.PathLike[str]) -> str:
    """The hex digest of a file's bytes, read in 1 MiB chunks; "" if the file cannot be read."""
    h = _hasher()
    try:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size <= _WHOLE:  # one exact-size read: the common case, fastest
                h.update(f.read())
            else:  # a big file in bounded chunks
                while chunk := f.read(_CHUNK):
                    h.update(chunk)
    except OSError:  # gone, a folder, no permission: decoding reports it as a bad file
        return ""
    return h.hexdigest()[:32]


def threads() -> int:
    """Worker threads for file and hash work: hashlib and PIL release the GIL, so threads scale."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS
        cpus = os.cpu_count() or 1
    return max(1, min(8, cpus))


def file_digests(root: Path, files: Sequence[str]) -> list[str]:
    """The digest of each file (relative to `root`), in order.

    One thread: image files are small, so the cost is opening and reading them, and threads contending for
    the GIL between those calls measured twice as slow as a plain loop (docs/data-integrity.md).
    """
    return [file_digest(root / rel) for rel in files]


def changed_files(recorded: object, current: dict[str, str]) -> list[str]:
    """The files whose recorded digest differs from `current` (both {relative path: digest}).

    Raises ValueError if `recorded` is not such a mapping (a damaged or hand-edited split.json).
    """
    if not isinstance(recorded, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in recorded.items()
    ):
        raise ValueError("its digests are not a {path: digest} mapping")
    return sorted(rel for rel in set(recorded) | set(current) if recorded.get(rel) != current.get(rel))
