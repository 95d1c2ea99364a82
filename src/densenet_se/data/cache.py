"""Decode-once caches: decoding with content digests, the disk cache's key, and per-file check results for
uncached runs (the disk cache file itself: densenet_se.data.diskcache)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from densenet_se.data.digests import DIGEST_NAME, digest_bytes, threads
from densenet_se.errors import UserError
from densenet_se.io import atomic_write_text
from densenet_se.names import display_name

log = logging.getLogger("densenet_se.data")

CACHE_VERSION = 2  # bump when decoding changes, so old caches are not reused (2: keyed by content digests)
CACHE_ENV = "DENSENET_SE_CACHE"


def default_cache_dir() -> Path:
    """${DENSENET_SE_CACHE}, else ~/.cache/densenet_se."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "densenet_se"


def cache_key(digests: list[tuple[str, str]], image_size: int, max_image_pixels: int) -> str:
    """Hash of everything the decoded tensor depends on: each file's name and content, and the settings.

    Content, not size and mtime: a picture rewritten in place (mtime restored or not) gets a new entry, and
    a copy of the folder elsewhere reuses the same one.
    """
    payload = json.dumps(
        [CACHE_VERSION, DIGEST_NAME, int(image_size), int(max_image_pixels), digests], separators=(",", ":")
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


def disk_cache_path(cache_dir: Path, key: str, image_size: int) -> Path:
    return Path(cache_dir) / "images" / f"{image_size}px-{key}.u8"


def _index_path(cache_dir: Path, root: Path) -> Path:
    digest = hashlib.sha256(os.path.realpath(root).encode()).hexdigest()[:16]
    return Path(cache_dir) / "checks" / f"{digest}.json"


def load_check_index(cache_dir: Path, root: Path, max_image_pixels: int) -> dict[str, list]:
    """Known check results {relative path: [digest, reason or None]} for files under `root`."""
    path = _index_path(cache_dir, root)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError):  # missing, not JSON, or nested too deep to parse
        return {}
    if not isinstance(data, dict) or data.get("version") != CACHE_VERSION:
        return {}
    if data.get("max_image_pixels") != max_image_pixels or not isinstance(data.get("files"), dict):
        return {}
    # Untrusted like any cache: only well-formed entries are used, the rest are checked again.
    return {
        rel: entry
        for rel, entry in data["files"].items()
        if isinstance(entry, list)
        and len(entry) == 2
        and isinstance(entry[0], str)
        and (entry[1] is None or isinstance(entry[1], str))
    }


def save_check_index(cache_dir: Path, root: Path, max_image_pixels: int, results: dict[str, list]) -> None:
    """Remember check results so a repeat run over an unchanged folder does not decode every file twice."""
    data = {"version": CACHE_VERSION, "max_image_pixels": max_image_pixels, "files": results}
    try:
        atomic_write_text(_index_path(cache_dir, root), json.dumps(data))
    except OSError as err:
        log.debug("could not write the check index under %s: %s", cache_dir, err)


def _progress(total: int):
    """A rich progress bar on a terminal for big folders; nothing in CI logs or pipes."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    console = Console(stderr=True)
    show = total >= 200 and console.is_terminal
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
        disable=not show,
    )


def decode_files_with_digests(
    root: Path, files: list[str], image_size: int, max_image_pixels: int, expected: list[str] | None = None
) -> tuple[list[int], torch.Tensor, list[tuple[str, str]], list[str]]:
    """Read and decode every file once: (indices of good files, uint8 [n_good,3,S,S], [(bad path, reason)],
    digest of each file ("" where it was not read)).

    Each file is read once and the same bytes are hashed and decoded. `expected`: digests taken earlier (the
    disk cache key); a file whose bytes differ now changed while it was read, which is an error.
    """
    from densenet_se.data.images import BadImageError, decode_image, read_image_file

    def one(i: int) -> tuple[torch.Tensor | str, str]:
        path = root / files[i]
        try:
            data = read_image_file(path, max_image_pixels)
        except BadImageError as err:
            return str(err), ""
        except FileNotFoundError:
            return "file disappeared while reading", ""
        digest = digest_bytes(data)
        if expected is not None and expected[i] and digest != expected[i]:
            raise UserError(
                f"image file {display_name(str(path))} changed while it was being read; run again once "
                "nothing writes to data.root."
            )
        try:
            return decode_image(path, image_size, max_image_pixels, data=data), digest
        except BadImageError as err:
            return str(err), digest

    images = torch.empty((len(files), 3, image_size, image_size), dtype=torch.uint8)
    good: list[int] = []
    bad: list[tuple[str, str]] = []
    digests: list[str] = []
    with _progress(len(files)) as progress, ThreadPoolExecutor(threads()) as pool:
        task = progress.add_task(f"decoding {len(files)} images", total=len(files))
        for i, (result, digest) in enumerate(pool.map(one, range(len(files)))):
            digests.append(digest)
            if isinstance(result, str):
                bad.append((files[i], result))
            else:
                images[len(good)] = result
                good.append(i)
            progress.advance(task)
    return good, images[: len(good)].clone() if bad else images, bad, digests


def decode_files(
    root: Path, files: list[str], image_size: int, max_image_pixels: int
) -> tuple[list[int], torch.Tensor, list[tuple[str, str]]]:
    """Decode every file once: (indices of good files, uint8 [n_good,3,S,S], [(bad path, reason)])."""
    return decode_files_with_digests(root, files, image_size, max_image_pixels)[:3]


def check_files(
    root: Path, files: list[str], digests: list[str], max_image_pixels: int, known: dict[str, list]
) -> tuple[list[tuple[str, str]], dict[str, list]]:
    """Check files not already in `known` with the same content: ([(bad path, reason)], updated results)."""
    from densenet_se.data.images import check_image

    results: dict[str, list] = {}
    todo: list[tuple[str, str]] = []
    for rel, digest in zip(files, digests, strict=True):
        entry = known.get(rel)
        if digest and entry is not None and entry[0] == digest:
            results[rel] = entry
        else:
            todo.append((rel, digest))
    with _progress(len(todo)) as progress, ThreadPoolExecutor(threads()) as pool:
        task = progress.add_task(f"checking {len(todo)} images", total=len(todo))
        for (rel, digest), reason in zip(
            todo, pool.map(lambda t: check_image(root / t[0], max_image_pixels), todo), strict=True
        ):
            results[rel] = [digest, reason]
            progress.advance(task)
    bad = [(rel, results[rel][1]) for rel in files if results[rel][1] is not None]
    return bad, results
