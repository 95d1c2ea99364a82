"""Atomic file writes (readers never see a half-written file), and bounded reads of files people pass in."""

from __future__ import annotations

import errno
import json
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from densenet_se.errors import StorageError

# Writes the storage refuses: the person must make room or pick another place, so they get one sentence.
STORAGE_ERRNOS: dict[int, tuple[str, str]] = {
    errno.ENOSPC: ("no space is left on its disk", "free some space or write to another disk"),
    errno.EDQUOT: ("your disk quota is used up", "free some space or write to another disk"),
    errno.EROFS: ("its file system is read-only", "write to a writable folder"),
}


def storage_error(
    exc: BaseException | None, path: str | os.PathLike[str] | None = None
) -> StorageError | None:
    """A StorageError naming `path` (else the OSError's own file) if `exc` or its cause is a refused write."""
    from densenet_se.names import display_name

    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in STORAGE_ERRNOS:
            where = path if path is not None else exc.filename
            name = display_name(os.fsdecode(where)) if where is not None else "a file"
            what, fix = STORAGE_ERRNOS[exc.errno]
            error = StorageError(f"could not write {name}: {what} ({exc.strerror}); {fix}.")
            error.errno = exc.errno
            return error
        exc = exc.__cause__ or exc.__context__
    return None


def _atomic_write(path: str | os.PathLike[str], write: Callable[[IO[bytes]], None]) -> Path:
    """Write through `write` into a temp file beside `path`, fsync it, then os.replace it into place."""
    path = Path(path)
    try:
        return _write_and_replace(path, write)
    except Exception as exc:  # torch.save reports a full disk as a RuntimeError caused by the OSError
        refused = storage_error(exc, path)
        if refused is None:
            raise
        raise refused from exc


def _write_and_replace(path: Path, write: Callable[[IO[bytes]], None]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    # Same directory so os.replace is a rename on one file system (atomic); unique name per writer so
    # two processes writing at once never share a temp file, and the last os.replace wins.
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files; results are meant to be readable like any output
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write `data` to `path` atomically."""
    return _atomic_write(path, lambda f: f.write(data))


def atomic_write_parts(path: str | os.PathLike[str], parts: Iterable[bytes | bytearray | memoryview]) -> Path:
    """Write the concatenation of `parts` to `path` atomically, without joining them in memory first."""

    def write(f: IO[bytes]) -> None:
        for part in parts:
            f.write(part)

    return _atomic_write(path, write)


def atomic_write_text(
    path: str | os.PathLike[str], text: str, encoding: str = "utf-8", errors: str = "strict"
) -> Path:
    """Write `text` to `path` atomically (errors="surrogateescape" keeps undecodable file names as bytes)."""
    return _atomic_write(path, lambda f: f.write(text.encode(encoding, errors)))


def atomic_torch_save(obj: Any, path: str | os.PathLike[str]) -> Path:
    """torch.save `obj` to `path` atomically."""
    import torch  # imported here so the module stays importable (and cheap) without torch

    return _atomic_write(path, lambda f: torch.save(obj, f))


def csv_text(rows: Iterable[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """CSV with a header of `columns`, one line per row; None becomes an empty cell, other keys are ignored."""
    import csv
    import io

    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if row.get(k) is None else row[k] for k in columns})
    return out.getvalue()


def read_bounded(
    path: str | os.PathLike[str], key: str, what: str, max_bytes: int, *, name: str | None = None
) -> bytes:
    """The bytes of a file a person passes in as `key=path`, at most `max_bytes`; UserError (one sentence) if it is
    missing, unreadable or bigger. The size is checked before anything is read: the file may come from anywhere.
    `name` is how the messages call the file when it was not given as `key=path` (e.g. "split file RUN/split.json").
    """
    from densenet_se.errors import UserError

    file = Path(path).expanduser()
    name = name or f"{key}={path}"
    if not file.is_file():
        raise UserError(f"{name} does not exist or is not a file; give {what}.")
    too_big = f"{name} is larger than {max_bytes >> 20} MiB, too big to be {what}."
    try:
        with open(file, "rb") as f:
            if os.fstat(f.fileno()).st_size > max_bytes:
                raise UserError(too_big)
            data = f.read(max_bytes + 1)  # one byte more: a file that grew since is refused too
    except OSError as err:
        raise UserError(f"{name} cannot be read ({err.strerror or err}); give {what}.") from None
    if len(data) > max_bytes:
        raise UserError(too_big)
    return data


def read_json_object(path: str | os.PathLike[str], key: str, what: str, max_bytes: int = 10 << 20) -> dict:
    """The JSON object in a file given as `key=path`; UserError (one sentence) if missing, too big or not one.

    Files people pass in (eval.json, calibration.json) may come from anywhere: the size is checked before
    anything is read.
    """
    from densenet_se.errors import UserError

    data = read_bounded(path, key, what, max_bytes)
    try:
        loaded = json.loads(data)
    except ValueError as err:
        raise UserError(f"{key}={path} cannot be read as JSON ({type(err).__name__}); give {what}.") from None
    if not isinstance(loaded, dict):
        raise UserError(f"{key}={path} is not {what} (it holds no JSON object).")
    return loaded
