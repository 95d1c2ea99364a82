"""Bounded reading of torch.save files: the archive is checked before torch.load reads any of it.

torch.save writes a zip of STORED (uncompressed) entries: data.pkl (the pickled structure), a few small records
and one record per tensor storage. torch.load reads every record into memory and inflates compressed ones, so a
small crafted file could make it allocate gigabytes before anything is checked. Here the zip's central
directory is parsed first (its size bounded), every entry must be stored and lie inside the file, the records
torch reads eagerly must be small, and tensor records are memory-mapped (mmap=True), never read. After loading,
the object tree is walked with a budget and no tensor may claim more elements than its bytes hold. Loading a
hostile file therefore costs about MAX_PICKLE_BYTES of memory, whatever it declares.
"""

from __future__ import annotations

import os
import struct
import zipfile
from pathlib import Path
from typing import Any

MAX_ARCHIVE_BYTES = 8 << 30  # a DenseNet-121 checkpoint with Adam state is ~90 MB
MAX_DIRECTORY_BYTES = 8 << 20  # ~2k entries (~300 KB) for DenseNet-121 with Adam state
MAX_PICKLE_BYTES = 16 << 20  # data.pkl of DenseNet-121 with Adam state: ~220 KB
MAX_VALUES = 50_000_000  # values in the loaded tree, shared ones counted each time (Adam DenseNet-121: ~20k)
MAX_DEPTH = 64

_EOCD = struct.Struct("<4s4H2LH")  # end of central directory record
_ZIP64_LOCATOR = struct.Struct("<4sLQL")
_ZIP64_EOCD = struct.Struct("<4sQ2H2L4Q")
_LOCAL_HEADER = struct.Struct("<4s5H3L2H")


class ArchiveError(ValueError):
    """Why a file is not loaded; `kind` is empty, truncated, foreign (not torch.save's zip) or unsafe."""

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(reason)
        self.kind = kind


def _size(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _directory(f: Any, size: int) -> tuple[int, int]:
    """(offset, size) of the zip's central directory, from its end records (zip64 included)."""
    tail_len = min(size, _EOCD.size + 0xFFFF)
    f.seek(size - tail_len)
    tail = f.read(tail_len)
    pos = tail.rfind(b"PK\x05\x06")
    if pos < 0 or pos + _EOCD.size > len(tail):
        raise ArchiveError("truncated", "it has no zip directory at its end (cut off while being written?)")
    _, _, _, _, entries, cd_size, cd_offset, _ = _EOCD.unpack_from(tail, pos)
    if entries == 0xFFFF or 0xFFFFFFFF in (cd_size, cd_offset):
        loc = pos - _ZIP64_LOCATOR.size
        if loc < 0 or tail[loc : loc + 4] != b"PK\x06\x07":
            raise ArchiveError("truncated", "its zip64 directory locator is missing")
        _, _, record, _ = _ZIP64_LOCATOR.unpack_from(tail, loc)
        if record + _ZIP64_EOCD.size > size:
            raise ArchiveError("truncated", "its zip64 directory record lies beyond the end of the file")
        f.seek(record)
        raw = f.read(_ZIP64_EOCD.size)
        if raw[:4] != b"PK\x06\x06":
            raise ArchiveError("truncated", "its zip64 directory record is damaged")
        cd_size, cd_offset = _ZIP64_EOCD.unpack(raw)[-2:]
    if cd_offset + cd_size > size:
        raise ArchiveError("truncated", "its zip directory points beyond the end of the file")
    if cd_size > MAX_DIRECTORY_BYTES:
        raise ArchiveError(
            "unsafe", f"its zip directory is {_size(cd_size)} (at most {_size(MAX_DIRECTORY_BYTES)} is read)"
        )
    return cd_offset, cd_size


def check_archive(path: str | os.PathLike[str]) -> None:
    """Raise ArchiveError unless `path` is a torch.save zip whose reading stays within the bounds above."""
    path = Path(path)
    size = path.stat().st_size
    if size == 0:
        raise ArchiveError("empty", "it is empty (0 bytes)")
    if size > MAX_ARCHIVE_BYTES:
        raise ArchiveError("unsafe", f"it is {_size(size)} (at most {_size(MAX_ARCHIVE_BYTES)} is loaded)")
    with path.open("rb") as f:
        magic = f.read(4)
        if magic != b"PK\x03\x04":
            if b"PK\x03\x04".startswith(magic):
                raise ArchiveError("truncated", "it ends before its first zip entry")
            raise ArchiveError("foreign", "it is not the zip archive torch.save writes")
        cd_offset, _ = _directory(f, size)
        try:
            infos = zipfile.ZipFile(f).infolist()
        except (zipfile.BadZipFile, OSError, ValueError, struct.error) as err:
            raise ArchiveError("truncated", f"its zip directory cannot be read ({err})") from None
        total = 0
        for info in infos:
            _check_entry(f, info, cd_offset)
            total += info.file_size
        if total > cd_offset:  # entries overlap: each byte of the file must belong to one entry
            raise ArchiveError(
                "unsafe", f"its entries declare {_size(total)} but the file holds {_size(cd_offset)}"
            )


def _check_entry(f: Any, info: zipfile.ZipInfo, cd_offset: int) -> None:
    name = info.filename
    if info.compress_type != zipfile.ZIP_STORED:
        raise ArchiveError(
            "unsafe",
            f"its entry {name} is compressed ({_size(info.file_size)} once inflated), which torch.save never "
            "writes",
        )
    f.seek(info.header_offset)
    raw = f.read(_LOCAL_HEADER.size)
    if len(raw) < _LOCAL_HEADER.size or raw[:4] != b"PK\x03\x04":
        raise ArchiveError("truncated", f"its entry {name} has no local header")
    fields = _LOCAL_HEADER.unpack(raw)
    method, name_len, extra_len = fields[3], fields[-2], fields[-1]
    if method != zipfile.ZIP_STORED:  # the local header is what torch's reader trusts
        raise ArchiveError("unsafe", f"its entry {name} is compressed, which torch.save never writes")
    end = info.header_offset + _LOCAL_HEADER.size + name_len + extra_len + info.file_size
    if info.compress_size != info.file_size or end > cd_offset:
        raise ArchiveError(
            "unsafe", f"its entry {name} declares {_size(info.file_size)}, more than the file holds there"
        )
    # Tensor records (<archive>/data/<key>) are memory-mapped; everything else torch reads whole.
    if name.rsplit("/", 2)[-2:-1] != ["data"] and info.file_size > MAX_PICKLE_BYTES:
        raise ArchiveError(
            "unsafe",
            f"its entry {name} is {_size(info.file_size)} (at most {_size(MAX_PICKLE_BYTES)} is read into "
            "memory)",
        )


def check_loaded(obj: Any) -> None:
    """Raise ArchiveError if the loaded tree is too large, too deep or cyclic, or a tensor claims more elements
    than its bytes hold.

    Pickle can share one object in many places, so a few hundred bytes can describe a tree of 2**60 values that
    anything walking it (json, deepcopy, Lightning's state restore) would never finish; its size as a tree is
    computed here once per distinct object.
    """
    import torch

    size: dict[int, int] = {}  # id -> number of values in its subtree, counting shared ones every time
    height: dict[int, int] = {}
    open_ids: set[int] = set()
    stack: list[tuple[Any, list[Any] | None, int]] = [(obj, None, 0)]
    while stack:
        node, kids, count = stack.pop()
        key = id(node)
        if kids is not None:  # every child is done: sum them up
            size[key] = 1 + count + sum(size[id(c)] - 1 for c in kids)
            height[key] = 1 + max((height[id(c)] for c in kids), default=0)
            open_ids.discard(key)
            if size[key] > MAX_VALUES or height[key] > MAX_DEPTH:
                raise ArchiveError(
                    "unsafe",
                    f"it holds more than {MAX_VALUES} values or nests them deeper than {MAX_DEPTH} levels",
                )
            continue
        if key in size:
            continue
        if key in open_ids:
            raise ArchiveError("unsafe", "it holds a value that contains itself")
        if isinstance(node, torch.Tensor):
            # Expanded (stride-0) tensors can claim any number of elements over a few bytes.
            if node.numel() * node.element_size() > node.untyped_storage().nbytes():
                raise ArchiveError(
                    "unsafe",
                    f"a tensor of shape {tuple(node.shape)} claims more elements than its "
                    f"{node.untyped_storage().nbytes()} bytes hold",
                )
            size[key], height[key] = 1, 1
            continue
        items = [v for kv in node.items() for v in kv] if isinstance(node, dict) else node
        if not isinstance(node, (dict, list, tuple, set, frozenset)):
            size[key], height[key] = 1, 1  # a scalar at the top, or a type weights_only allows (e.g. dtype)
            continue
        kids = [c for c in items if type(c) not in _ATOMS]
        open_ids.add(key)
        stack.append((node, kids, len(items)))
        stack.extend((c, None, 0) for c in kids if id(c) not in size)


# Values that hold nothing else (children of these types are counted without a visit).
_ATOMS = frozenset({int, float, bool, str, bytes, complex, type(None)})


def load_archive(path: str | os.PathLike[str]) -> Any:
    """torch.load(weights_only=True, mmap=True) of `path` after check_archive, then check_loaded."""
    import torch

    check_archive(path)
    obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    check_loaded(obj)
    return obj
