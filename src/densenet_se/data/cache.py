"""Decode-once caches: the uint8 image tensor on disk, and per-file check results for uncached runs."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import torch

from densenet_se.io import atomic_torch_save, atomic_write_text

log = logging.getLogger("densenet_se.data")

CACHE_VERSION = 1  # bump when decoding changes, so old caches are not reused
CACHE_ENV = "DENSENET_SE_CACHE"


def default_cache_dir() -> Path:
    """${DENSENET_SE_CACHE}, else ~/.cache/densenet_se."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "densenet_se"


def file_stats(root: Path, files: list[str]) -> list[tuple[str, int, int]]:
    """(relative path, size in bytes, mtime in ns) for each file; what cache keys are made of."""
    stats = []
    for rel in files:
        st = os.stat(root / rel)
        stats.append((rel, st.st_size, st.st_mtime_ns))
    return stats


def cache_key(root: Path, stats: list[tuple[str, int, int]], image_size: int, max_image_pixels: int) -> str:
    """Hash of everything the decoded tensor depends on; jobs of a sweep over one folder share it."""
    payload = json.dumps(
        [CACHE_VERSION, os.path.realpath(root), int(image_size), int(max_image_pixels), stats],
        separators=(",", ":"),
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


def disk_cache_path(cache_dir: Path, key: str, image_size: int) -> Path:
    return Path(cache_dir) / "images" / f"{image_size}px-{key}.pt"


def load_disk_cache(path: Path) -> dict | None:
    """The cached {"files", "bad", "images"} or None when missing or unreadable (then it is rebuilt)."""
    if not path.is_file():
        return None
    try:
        # mmap: the tensor pages in from the OS page cache on demand instead of being copied up front.
        entry = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        if entry.get("version") != CACHE_VERSION or len(entry["files"]) != entry["images"].shape[0]:
            raise ValueError("unexpected content")
        return entry
    except Exception as err:  # a cache is disposable: rebuild rather than fail
        log.warning("ignoring unreadable image cache %s (%s); decoding the images again", path, err)
        return None


def save_disk_cache(path: Path, files: list[str], bad: list[tuple[str, str]], images: torch.Tensor) -> None:
    """Write the cache atomically: concurrent writers never corrupt it, the last one wins."""
    entry = {"version": CACHE_VERSION, "files": list(files), "bad": [list(b) for b in bad], "images": images}
    try:
        atomic_torch_save(entry, path)
    except OSError as err:
        log.warning("could not write the image cache %s (%s); the next run decodes again", path, err)


def _index_path(cache_dir: Path, root: Path) -> Path:
    digest = hashlib.sha256(os.path.realpath(root).encode()).hexdigest()[:16]
    return Path(cache_dir) / "checks" / f"{digest}.json"


def load_check_index(cache_dir: Path, root: Path, max_image_pixels: int) -> dict[str, list]:
    """Known check results {relative path: [size, mtime_ns, reason or None]} for files under `root`."""
    path = _index_path(cache_dir, root)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if data.get("version") != CACHE_VERSION or data.get("max_image_pixels") != max_image_pixels:
        return {}
    return data.get("files", {})


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


def _threads() -> int:
    # PIL releases the GIL while decoding and resizing, so threads scale without pickling images around.
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS
        cpus = os.cpu_count() or 1
    return max(1, min(8, cpus))


def decode_files(
    root: Path, files: list[str], image_size: int, max_image_pixels: int
) -> tuple[list[int], torch.Tensor, list[tuple[str, str]]]:
    """Decode every file once: (indices of good files, uint8 [n_good,3,S,S], [(bad path, reason)])."""
    from concurrent.futures import ThreadPoolExecutor

    from densenet_se.data.images import BadImageError, decode_image

    def one(rel: str) -> torch.Tensor | str:
        try:
            return decode_image(root / rel, image_size, max_image_pixels)
        except BadImageError as err:
            return str(err)
        except FileNotFoundError:
            return "file disappeared while reading"

    images = torch.empty((len(files), 3, image_size, image_size), dtype=torch.uint8)
    good: list[int] = []
    bad: list[tuple[str, str]] = []
    with _progress(len(files)) as progress, ThreadPoolExecutor(_threads()) as pool:
        task = progress.add_task(f"decoding {len(files)} images", total=len(files))
        for i, result in enumerate(pool.map(one, files)):
            if isinstance(result, str):
                bad.append((files[i], result))
            else:
                images[len(good)] = result
                good.append(i)
            progress.advance(task)
    return good, images[: len(good)].clone() if bad else images, bad


def check_files(
    root: Path, stats: list[tuple[str, int, int]], max_image_pixels: int, known: dict[str, list]
) -> tuple[list[tuple[str, str]], dict[str, list]]:
    """Check files not already in `known` (same size and mtime): ([(bad path, reason)], updated results)."""
    from concurrent.futures import ThreadPoolExecutor

    from densenet_se.data.images import check_image

    results: dict[str, list] = {}
    todo: list[tuple[str, int, int]] = []
    for rel, size, mtime in stats:
        entry = known.get(rel)
        if entry is not None and entry[0] == size and entry[1] == mtime:
            results[rel] = entry
        else:
            todo.append((rel, size, mtime))
    with _progress(len(todo)) as progress, ThreadPoolExecutor(_threads()) as pool:
        task = progress.add_task(f"checking {len(todo)} images", total=len(todo))
        for (rel, size, mtime), reason in zip(
            todo, pool.map(lambda t: check_image(root / t[0], max_image_pixels), todo), strict=True
        ):
            results[rel] = [size, mtime, reason]
            progress.advance(task)
    bad = [(rel, results[rel][2]) for rel, _, _ in stats if results[rel][2] is not None]
    return bad, results
