"""The contract between the data module and one source of images (`data.source`): what it lists, and the checks
every source that reads a list of files shares.

A source only names the images and their classes; checking the files, their digests, the split, the caches,
split.json and the loaders are the data module's, the same for every source.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from densenet_se.data.listed import leaves_root, relative_path, resolved_inside
from densenet_se.errors import UserError

# The source of configs that name none: class sub-folders, as before data.source existed.
DEFAULT_SOURCE = "folders"
# Longest class name a checkpoint holds: a folder name, or a label read from a list.
MAX_CLASS_NAME = 255


@dataclass(frozen=True)
class Listing:
    """What a source found: the classes, and each image as a path relative to data.root with its class index."""

    class_names: list[str]  # sorted by name, as torchvision's ImageFolder
    files: list[str]  # relative posix paths, class by class, sorted within each
    labels: list[int]  # the class index of each file
    origin: str  # what names the classes, as a person sets it ("data.root=...", "data.labels=...")
    classes_are: str  # how the classes are given, for messages ("one sub-folder per class")
    class_where: list[str]  # how a person finds each class ("folder data/x/Monkeypox")
    # True: a class none of whose images can be read is left out with a warning (an ImageFolder tree may hold
    # such a folder); False: it stops the run, as the listing named the class on purpose.
    drop_unreadable: bool = False


@dataclass(frozen=True)
class Source:
    """One registered source: the value of `data.source`, its YAML, and how it lists a data folder."""

    name: str  # the value of data.source
    config: str  # conf/data/<config>.yaml: data=<config> chooses it
    # What data.labels names for this source, in words ("a CSV of path,label rows"); None: it reads no file.
    labels: str | None
    # (data.root, data.labels, data.extensions) -> the listing; UserError (one sentence) for anything wrong.
    list_files: Callable[[Path, str | None, Sequence[str] | None], Listing]


def listing_from_rows(
    root: Path, rows: Sequence[tuple[int, str, str]], origin: str, extensions: Sequence[str] | None
) -> Listing:
    """The listing of (line, path relative to root, class name) rows read from a list someone wrote.

    Every path must name an image file inside `root` (symbolic links followed), once, with an extension of
    `extensions`; every class a name. Classes are sorted by name, so the same files and labels give the same
    class indices and split as class sub-folders do. UserError (one sentence naming the lines) otherwise.
    """
    from densenet_se.data.images import normalise_extensions

    if not rows:
        raise UserError(f"{origin} lists no images; give one row per image, its path relative to data.root.")
    entries = [(line, relative_path(path), label.strip()) for line, path, label in rows]
    _refuse(
        origin,
        "names paths that are not inside data.root (empty, absolute, with '..' or a NUL byte)",
        [(line, rel) for line, rel, _ in entries if leaves_root(rel)],
        "paths are relative to data.root",
    )
    entries = [(line, os.path.normpath(rel).replace(os.sep, "/"), label) for line, rel, label in entries]
    _refuse(
        origin,
        "gives images no class",
        [(line, rel) for line, rel, label in entries if not label],
        "give each image its class",
    )
    _refuse(
        origin,
        f"gives class names longer than {MAX_CLASS_NAME} characters",
        [(line, rel) for line, rel, label in entries if len(label) > MAX_CLASS_NAME],
        "shorten them",
    )
    # A line break inside a label is a quote left open: the rows after it were read into one cell.
    _refuse(
        origin,
        "gives class names holding a line break or another control character (a quote left open?)",
        [(line, rel) for line, rel, label in entries if not label.isprintable()],
        "fix the quoting",
    )
    exts = normalise_extensions(extensions)
    _refuse(
        origin,
        f"names files whose extension is not one of data.extensions ({', '.join(exts)})",
        [(line, rel) for line, rel, _ in entries if not rel.lower().endswith(exts)],
        "add the extension to data.extensions, or leave them out",
    )
    top = os.path.realpath(root)
    real = [resolved_inside(top, rel) for _, rel, _ in entries]
    _refuse(
        origin,
        f"names files that a symbolic link leads outside data.root={root}",
        [(line, rel) for (line, rel, _), r in zip(entries, real, strict=True) if r is None],
        "list the files inside data.root, or set data.root to the folder that holds them",
    )
    _refuse(
        origin,
        f"names files that do not exist under data.root={root}",
        [(line, rel) for (line, rel, _), r in zip(entries, real, strict=True) if not os.path.isfile(r)],
        "paths are relative to data.root; fix them, or leave the rows out",
    )
    first: dict[str, tuple[int, str]] = {}
    for (line, rel, _), r in zip(entries, real, strict=True):
        if r in first:
            before, name = first[r]
            same = f"{rel!r} twice" if name == rel else f"one file twice ({name!r}, {rel!r})"
            raise UserError(f"{origin} lists {same}, on lines {before} and {line}; keep one row per image.")
        first[r] = (line, rel)
    class_names = sorted({label for _, _, label in entries})
    if len(class_names) < 2:
        raise UserError(
            f"{origin} names {len(class_names)} class ({class_names[0]!r}); at least 2 are needed, "
            "one label per class."
        )
    index = {name: i for i, name in enumerate(class_names)}
    line_of: dict[int, int] = {}
    by_class: dict[int, list[str]] = defaultdict(list)
    for line, rel, label in entries:
        line_of.setdefault(index[label], line)
        by_class[index[label]].append(rel)
    files = [rel for c in range(len(class_names)) for rel in sorted(by_class[c])]
    labels = [c for c in range(len(class_names)) for _ in by_class[c]]
    return Listing(
        class_names,
        files,
        labels,
        origin=origin,
        classes_are="one label per class",
        class_where=[f"class {name!r} ({origin}, line {line_of[c]})" for c, name in enumerate(class_names)],
    )


def _refuse(origin: str, what: str, bad: list[tuple[int, str]], fix: str) -> None:
    """UserError naming the first few (line, path) rows of `bad`, if any."""
    if not bad:
        return
    shown = ", ".join(f"line {line} {rel!r}" for line, rel in bad[:3])
    more = f" and {len(bad) - 3} more lines" if len(bad) > 3 else ""
    raise UserError(f"{origin} {what}: {shown}{more}; {fix}.")
