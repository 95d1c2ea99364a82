"""The disk cache file: decoded uint8 images in checksummed shards, verified and copied into memory on load.

Layout: MAGIC, the header's length (8 bytes, little-endian), the header's digest (16 bytes, digests.DIGEST_NAME), the
header (JSON: key, image size, good files, bad files, shard size, one digest per shard), then the pixels,
uint8 [count, 3, S, S]. The file is untrusted (anyone with write access to the cache folder could have made
it): sizes are checked against the folder being read before anything is allocated, and any mismatch means
the entry is ignored and rebuilt. It is read into memory, never memory-mapped, so truncating or rewriting
it during a run cannot touch the run.
"""

from __future__ import annotations

import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from densenet_se.data.digests import digest_bytes, threads
from densenet_se.io import atomic_write_parts

log = logging.getLogger("densenet_se.data")

MAGIC = b"densenet_se image cache 2\n"
SHARD_BYTES = 64 << 20  # shards are hashed in parallel; one damaged shard is named in the warning
_PREFIX = len(MAGIC) + 8 + 16


class CacheMismatch(Exception):
    """Why a cache file cannot be used (the entry is then rebuilt)."""


@dataclass(frozen=True)
class CacheEntry:
    files: list[str]  # the good files, in the order of the image rows
    bad: list[tuple[str, str]]
    images: torch.Tensor  # uint8 [len(files), 3, S, S], in memory


def _header_digest(header: bytes) -> bytes:
    return bytes.fromhex(digest_bytes(header))


def _shards(count: int, row_bytes: int) -> tuple[int, list[tuple[int, int]]]:
    """(images per shard, [(first row, end row)]) for `count` rows of `row_bytes` bytes."""
    per = max(1, SHARD_BYTES // max(1, row_bytes))
    return per, [(a, min(a + per, count)) for a in range(0, count, per)]


def _flat(images: torch.Tensor) -> memoryview:
    return memoryview(images.numpy()).cast("B")


def save(path: Path, key: str, files: list[str], bad: list[tuple[str, str]], images: torch.Tensor) -> None:
    """Write the entry atomically: concurrent writers never corrupt it, the last one wins."""
    images = images.contiguous()
    row_bytes = int(images[0].numel()) if len(images) else 1
    per, spans = _shards(len(images), row_bytes)
    flat = _flat(images)
    with ThreadPoolExecutor(threads()) as pool:
        digests = list(pool.map(lambda s: digest_bytes(flat[s[0] * row_bytes : s[1] * row_bytes]), spans))
    header = json.dumps(
        {
            "key": key,
            "image_size": int(images.shape[-1]) if len(images) else None,
            "files": list(files),
            "bad": [list(b) for b in bad],
            "shard_images": per,
            "shards": digests,
        },
        separators=(",", ":"),
    ).encode()  # ascii: names that are not UTF-8 are JSON \udcNN escapes
    prefix = MAGIC + len(header).to_bytes(8, "little") + _header_digest(header)
    atomic_write_parts(path, [prefix, header, flat])


def _read_exactly(f, view: memoryview) -> None:
    got = 0
    while got < len(view):
        n = f.readinto(view[got:])
        if not n:
            raise CacheMismatch("the file ended early (truncated)")
        got += n


def _valid_header(
    header: dict, key: str, image_size: int, scanned: set[str]
) -> tuple[list[str], list[tuple[str, str]]]:
    """The header's (good files, bad files) if it fits this folder and image size; else CacheMismatch."""
    if header.get("key") != key:
        raise CacheMismatch("it was written for other files (its key differs from its name)")
    files, bad = header.get("files"), header.get("bad")
    if not isinstance(files, list) or not isinstance(bad, list):
        raise CacheMismatch("its file lists are malformed")
    pairs = [
        tuple(b) for b in bad if isinstance(b, list) and len(b) == 2 and all(isinstance(x, str) for x in b)
    ]
    named = [f for f in files if isinstance(f, str)] + [p for p, _ in pairs]
    if len(pairs) != len(bad) or len(named) != len(files) + len(bad) or sorted(named) != sorted(scanned):
        raise CacheMismatch("its file list is not the folder's")
    if files and header.get("image_size") != image_size:
        raise CacheMismatch(f"it holds images of {header.get('image_size')} px, not {image_size} px")
    return files, pairs


def load(path: Path, key: str, image_size: int, scanned: list[str]) -> CacheEntry | None:
    """The verified entry in memory, or None (with one warning line) when missing, damaged or not this data's."""
    if not path.is_file():
        return None
    try:
        return _load(path, key, image_size, set(scanned))
    except (
        CacheMismatch,
        OSError,
        ValueError,
        RecursionError,
    ) as err:  # RecursionError: a deeply nested header
        log.warning("ignoring image cache %s: %s; decoding the images again", path, err)
        return None


def _load(path: Path, key: str, image_size: int, scanned: set[str]) -> CacheEntry:
    row_bytes = 3 * image_size * image_size
    with open(path, "rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size
        prefix = f.read(_PREFIX)
        if len(prefix) < _PREFIX or not prefix.startswith(MAGIC):
            raise CacheMismatch("it is not an image cache of this version")
        length = int.from_bytes(prefix[len(MAGIC) : len(MAGIC) + 8], "little")
        # A header lists each file once: bounded by the folder's file count before it is read.
        if length > 4096 + 8192 * len(scanned) or _PREFIX + length > size:
            raise CacheMismatch("its header is larger than this folder's file list can be")
        raw = bytearray(length)
        _read_exactly(f, memoryview(raw))
        if _header_digest(bytes(raw)) != prefix[-16:]:
            raise CacheMismatch("its header checksum does not match (the file was changed)")
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise CacheMismatch("its header is malformed")
        files, bad = _valid_header(header, key, image_size, scanned)
        count = len(files)
        per, spans = _shards(count, row_bytes)
        digests = header.get("shards")
        if header.get("shard_images") != per or not isinstance(digests, list) or len(digests) != len(spans):
            raise CacheMismatch("its shard table is malformed")
        if size != _PREFIX + length + count * row_bytes:
            raise CacheMismatch(
                f"it is {size} bytes, not the {_PREFIX + length + count * row_bytes} its header says"
            )
        images = torch.empty((count, 3, image_size, image_size), dtype=torch.uint8)  # bounded: count <= files
        flat = _flat(images)
        with ThreadPoolExecutor(threads()) as pool:
            pending = []
            for a, b in spans:  # read shard by shard; hash each in a thread while the next one is read
                view = flat[a * row_bytes : b * row_bytes]
                _read_exactly(f, view)
                pending.append(pool.submit(digest_bytes, view))
            for i, (job, expected) in enumerate(zip(pending, digests, strict=True)):
                if job.result() != expected:
                    a, b = spans[i]
                    raise CacheMismatch(
                        f"shard {i + 1} of {len(spans)} (images {a + 1}-{b}) fails its checksum (the file was changed)"
                    )
    return CacheEntry(files, bad, images)
