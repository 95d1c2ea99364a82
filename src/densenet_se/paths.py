"""Where outputs may go: never over a file a command reads (the checkpoint, an image, split.json), and never
inside the data it reads, where the next run would take its own outputs for input.

Paths are compared after resolving `~`, `..` and symbolic links, and existing files also by identity (a hard
link to the checkpoint is the checkpoint).
"""

from __future__ import annotations

import os
from collections.abc import Collection, Mapping
from pathlib import Path

from densenet_se.errors import UserError


def resolved(path: str | os.PathLike[str]) -> Path:
    """`path` made absolute with `~`, `..` and symbolic links resolved (it need not exist)."""
    return Path(path).expanduser().resolve()


def is_inside(path: str | os.PathLike[str], folder: str | os.PathLike[str]) -> bool:
    """True if `path` is `folder` or lies below it."""
    inner, outer = resolved(path), resolved(folder)
    return inner == outer or outer in inner.parents


def same_file(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    """True if `a` and `b` name one file (the same resolved path, or one inode for existing files)."""
    if resolved(a) == resolved(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet)
        return False


def check_outside(
    key: str, path: str | os.PathLike[str], folders: Mapping[str, Path], hint: str = ""
) -> None:
    """UserError if `path` (the value of `key`) lies inside one of `folders` (the value of each key)."""
    for folder_key, folder in folders.items():
        if is_inside(path, folder):
            raise UserError(
                f"{key}={path} lies inside {folder_key}={folder}, where the next run would read it back as "
                f"input; choose a place outside {folder}{hint}."
            )


def check_output(
    key: str,
    path: str | os.PathLike[str],
    protected: Mapping[str, Path | None] | None = None,
    inputs: Collection[Path] = (),
    writes: str | os.PathLike[str] | None = None,
) -> None:
    """UserError if the file `writes` (default: `path`, the value of `key`) would replace a file this command reads.

    Args:
        protected: what each file is ("the checkpoint ckpt_path") -> its path (None: not used this time).
        inputs: the resolved paths of any number of input files (e.g. every image predict reads).
        writes: a file written because of `key` (e.g. a sidecar beside it, or a file in the folder it names).
    """
    target = path if writes is None else writes
    if Path(target).expanduser().is_dir():
        raise UserError(f"{key}={path} names a folder where a file goes; give another {key}.")
    what = f"{key}={path}" if writes is None else f"{key}={path} would write {writes}, which"
    for name, other in (protected or {}).items():
        if other is not None and same_file(target, other):
            raise UserError(f"{what} would overwrite {name} ({other}); choose another {key}.")
    if inputs and resolved(target) in inputs:
        raise UserError(f"{what} would overwrite the input file {target}; choose another {key}.")
