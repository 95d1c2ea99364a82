"""Stratified, seeded train/val/test splits and K folds, optionally keeping groups of files together.

Pure functions of (files, labels, groups, fractions, folds, seed): the same inputs always give the same split.
"""

from __future__ import annotations

import json
import math
import os
import random
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from densenet_se.checks import Range, Rule, at_least, check, interval
from densenet_se.data.listed import leaves_root
from densenet_se.errors import UserError, shown
from densenet_se.io import read_bounded

SPLITS = ("train", "val", "test")


# Allowed values of the split settings (data.*): checked by make_split, the data module and config.validate.
ALLOWED: dict[str, Rule] = {
    "val_fraction": interval(0, 1, "()"),
    "test_fraction": interval(0, 1, "[)"),
    "folds": Range(lambda v: v == 0 or v >= 2, "0 (no folds) or an integer >= 2"),
    "fold": at_least(0),
}


def check_fractions(val_fraction: float, test_fraction: float) -> None:
    """Raise UserError unless 0 < val_fraction < 1, 0 <= test_fraction < 1 and their sum is below 1."""
    check({"val_fraction": val_fraction, "test_fraction": test_fraction}, ALLOWED, "data.")
    if val_fraction + test_fraction >= 1.0:
        raise UserError(
            f"data.val_fraction={val_fraction} plus data.test_fraction={test_fraction} must be below 1 "
            "so that some images are left for training."
        )


def check_folds(folds: int, fold: int) -> None:
    """Raise UserError unless folds is 0 (off) or >= 2 and 0 <= fold < folds (fold must be 0 without folds)."""
    check({"folds": folds, "fold": fold}, ALLOWED, "data.")
    if folds == 0 and fold != 0:
        raise UserError(f"data.fold={fold} needs data.folds, e.g. data.folds=5 data.fold={fold}.")
    if folds and fold >= folds:
        raise UserError(f"data.fold={fold} must be in 0..{folds - 1} for data.folds={folds}.")


def split_counts(n: int, val_fraction: float, test_fraction: float) -> tuple[int, int, int]:
    """(train, val, test) sizes for n files of one class: rounded half up, each requested split >= 1."""

    def rounded(fraction: float) -> int:
        return math.floor(n * fraction + 0.5)

    n_val = max(1, rounded(val_fraction))
    n_test = max(1, rounded(test_fraction)) if test_fraction > 0 else 0
    # Training keeps at least one file; a class too small for every split gives up test first, then val.
    while n - n_val - n_test < 1 and n_val + n_test > 0:
        if n_test >= n_val:
            n_test -= 1
        else:
            n_val -= 1
    return n - n_val - n_test, n_val, n_test


def make_split(
    files: Sequence[str],
    labels: Sequence[int],
    val_fraction: float,
    test_fraction: float,
    seed: int,
    *,
    groups: Sequence[str] | None = None,
    folds: int = 0,
    fold: int = 0,
    class_names: Sequence[str] | None = None,
) -> dict:
    """Split files per class into train/val/test with their own RNG (independent of the training seed).

    The test split is held out first and is the same with or without folds. The rest (the pool) is split
    into val/train by `val_fraction`, or, with `folds` >= 2, into that many stratified folds of which fold
    `fold` is val (`val_fraction` is then unused). With `groups` (one id per file), all files of a group land
    in the same split and fold. Returns {"seed", "val_fraction", "test_fraction", "folds", "fold", "grouped",
    "train", "val", "test"} (each split a sorted list of [relative path, label]), plus "fold_index"
    {path: fold} for the pool when folding and "groups" {path: group} when grouped.
    """
    check_fractions(val_fraction, test_fraction)
    check_folds(folds, fold)
    if len(files) != len(labels) or (groups is not None and len(groups) != len(files)):
        raise ValueError(f"{len(files)} files, {len(labels)} labels and {len(groups or [])} groups")
    names = (
        list(class_names)
        if class_names is not None
        else [f"class {c}" for c in range(max(labels, default=0) + 1)]
    )
    if groups is None:
        where = _assign_files(files, labels, val_fraction, test_fraction, seed, folds, names)
    else:
        where = _assign_groups(files, labels, groups, val_fraction, test_fraction, seed, folds, names)
    out: dict[str, list[list]] = {name: [] for name in SPLITS}
    for path, label in zip(files, labels, strict=True):
        place = where[path]
        name = place if isinstance(place, str) else ("val" if place == fold else "train")
        out[name].append([path, int(label)])
    for name in SPLITS:
        out[name].sort()
    _check_not_empty(out, len(files), test_fraction, folds, groups)
    split: dict = {
        "seed": int(seed),
        "val_fraction": None if folds else float(val_fraction),
        "test_fraction": float(test_fraction),
        "folds": int(folds),
        "fold": int(fold) if folds else None,
        "grouped": groups is not None,
        "train": out["train"],
        "val": out["val"],
        "test": out["test"],
    }
    if folds:
        split["fold_index"] = {p: int(i) for p, i in sorted(where.items()) if not isinstance(i, str)}
    if groups is not None:
        split["groups"] = dict(sorted(zip(files, (str(g) for g in groups), strict=True)))
    return split


def _check_not_empty(
    out: dict[str, list], n_files: int, test_fraction: float, folds: int, groups: Sequence[str] | None
) -> None:
    empty = [name for name in ("train", "val") if not out[name]]
    if test_fraction > 0 and not out["test"]:
        empty.append("test")
    if not empty:
        return
    keys = "data.val_fraction" if empty != ["test"] else "data.test_fraction"
    if folds and empty != ["test"]:
        keys = "data.folds"
    what = f"{n_files} images" + (f" in {len(set(groups))} groups" if groups is not None else "")
    raise UserError(f"the {'/'.join(empty)} split would be empty with {what}: raise {keys} or add images.")


def _by_class(files: Sequence[str], labels: Sequence[int]) -> dict[int, list[str]]:
    by_class: dict[int, list[str]] = defaultdict(list)
    for path, label in zip(files, labels, strict=True):
        by_class[int(label)].append(path)
    return by_class


def _assign_files(
    files: Sequence[str],
    labels: Sequence[int],
    val_fraction: float,
    test_fraction: float,
    seed: int,
    folds: int,
    class_names: Sequence[str],
) -> dict[str, str | int]:
    """Each file's place: "train"/"val"/"test", or its fold index for pool files when folding."""
    where: dict[str, str | int] = {}
    by_class = _by_class(files, labels)
    offset = 0
    for label in sorted(by_class):
        paths = sorted(by_class[label])
        # One RNG per class, seeded by (seed, label): new files in one class leave the others' split alone.
        random.Random(f"{seed}/{label}").shuffle(paths)
        _, n_val, n_test = split_counts(len(paths), val_fraction, test_fraction)
        where.update((p, "test") for p in paths[:n_test])
        pool = paths[n_test:]
        if folds:
            _check_fold_sizes(folds, len(pool), class_names[label], "images")
            # Dealt round-robin, continuing where the previous class stopped: folds differ by at most one file.
            where.update((p, (offset + j) % folds) for j, p in enumerate(pool))
            offset += len(pool)
        else:
            where.update((p, "val") for p in pool[:n_val])
            where.update((p, "train") for p in pool[n_val:])
    return where


def _check_fold_sizes(folds: int, n: int, class_name: str, what: str) -> None:
    if n < folds:
        raise UserError(
            f"data.folds={folds} needs at least {folds} {what} of each class outside the test split, but "
            f"{class_name} has {n}: lower data.folds or add images."
        )


def _assign_groups(
    files: Sequence[str],
    labels: Sequence[int],
    groups: Sequence[str],
    val_fraction: float,
    test_fraction: float,
    seed: int,
    folds: int,
    class_names: Sequence[str],
) -> dict[str, str | int]:
    """As _assign_files, but whole groups go to one split/fold, stratified by class as far as groups allow."""
    n_classes = max(labels) + 1
    members: dict[str, list[str]] = defaultdict(list)
    counts: dict[str, list[int]] = {}
    for path, label, group in zip(files, labels, groups, strict=True):
        group = str(group)
        members[group].append(path)
        counts.setdefault(group, [0] * n_classes)[int(label)] += 1
    per_class = [0] * n_classes
    for label in labels:
        per_class[int(label)] += 1
    planned = [split_counts(n, val_fraction, test_fraction) for n in per_class]
    # A seeded random order (not largest first), so which sources end up in val/test is not biased by size.
    order = sorted(members)
    random.Random(f"{seed}/groups").shuffle(order)
    place: dict[str, str | int] = {}
    pool = order
    if test_fraction > 0:
        targets = [
            [float(t) for _, _, t in planned],
            [float(n - t) for n, (_, _, t) in zip(per_class, planned, strict=True)],
        ]
        bins = _greedy(order, counts, targets)
        # Like split_counts: a class gets a test group only if the pool keeps two (one for val, one for train).
        _ensure_one_group(order, counts, bins, targets, into=0, source=1, keep=2)
        place.update((g, "test") for g, b in bins.items() if b == 0)
        pool = [g for g in order if bins[g] == 1]
    if folds:
        pool_counts = [sum(counts[g][c] for g in pool) for c in range(n_classes)]
        for c in range(n_classes):
            _check_fold_sizes(folds, sum(counts[g][c] > 0 for g in pool), class_names[c], "source groups")
        bins = _greedy(pool, counts, [[n / folds for n in pool_counts] for _ in range(folds)])
        place.update(bins)
    else:
        pool_counts = [sum(counts[g][c] for g in pool) for c in range(n_classes)]
        val_target = [float(min(v, n)) for (_, v, _), n in zip(planned, pool_counts, strict=True)]
        targets = [val_target, [n - v for n, v in zip(pool_counts, val_target, strict=True)]]
        bins = _greedy(pool, counts, targets)
        _ensure_one_group(pool, counts, bins, targets, into=0, source=1, keep=1)
        place.update((g, "val" if b == 0 else "train") for g, b in bins.items())
    return {path: place[group] for group, paths in members.items() for path in paths}


def _greedy(order: list[str], counts: dict[str, list[int]], targets: list[list[float]]) -> dict[str, int]:
    """Each group, in order, to the bin that most lacks its classes (targets: [bin][class] file counts)."""
    current = [[0] * len(row) for row in targets]
    bins: dict[str, int] = {}
    for group in order:
        vec = counts[group]
        need = [
            sum(v * (row[c] - cur[c]) for c, v in enumerate(vec) if v)
            for row, cur in zip(targets, current, strict=True)
        ]
        best = max(range(len(targets)), key=lambda b: (need[b], -b))
        bins[group] = best
        for c, v in enumerate(vec):
            current[best][c] += v
    return bins


def _ensure_one_group(
    order: list[str],
    counts: dict[str, list[int]],
    bins: dict[str, int],
    targets: list[list[float]],
    into: int,
    source: int,
    keep: int,
) -> None:
    """A class that should be in bin `into` but is not gets its smallest group from `source` (if enough)."""
    for c in range(len(targets[into])):
        if targets[into][c] < 1 or any(counts[g][c] and bins[g] == into for g in order):
            continue
        candidates = [g for g in order if counts[g][c] and bins[g] == source]
        if len(candidates) > keep:
            bins[min(candidates, key=lambda g: sum(counts[g]))] = into


def split_class_counts(split: dict, num_classes: int) -> dict[str, list[int]]:
    """Files per class in each split, e.g. {"train": [836, 844], "val": [209, 211], "test": [0, 0]}."""
    counts = {name: [0] * num_classes for name in SPLITS}
    for name in SPLITS:
        for _, label in split.get(name, []):
            counts[name][label] += 1
    return counts


# A split.json larger than this is refused before it is read. train.py writes one line per image in each of
# train/val/test, digests, groups and fold_index: with 100-character paths that is under 512 bytes an image, so
# 1 GiB holds 2 million images; a bigger file is not one train.py wrote for any data set this project trains.
MAX_SPLIT_BYTES = 1 << 30


def read_split_file(path: str | os.PathLike[str]) -> dict:
    """A run's split.json, checked: a JSON object whose train/val/test lists hold [relative path, class index]
    pairs that stay inside the data folder. UserError (one sentence naming the file) for anything else.

    A split.json may come from someone else: a path with '..' or an absolute one would make eval read files
    outside data.root.
    """
    path = Path(path)
    wanted = "the split.json that train.py wrote in the run's directory"
    hint = f"give {wanted}"
    raw = read_bounded(path, "split_file", wanted, MAX_SPLIT_BYTES, name=f"split file {path}")
    try:
        data = json.loads(raw.decode("utf-8"))
    except ValueError as err:  # not JSON, or not UTF-8
        raise UserError(f"split file {path} is not valid JSON ({_first_line(err)}); {hint}.") from None
    if not isinstance(data, dict):
        raise UserError(
            f"split file {path} holds a JSON {type(data).__name__}, not the object train.py writes; {hint}."
        )
    names = data.get("class_names")
    if names is not None and not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
        raise UserError(f"split file {path} has class_names that are not a list of names; {hint}.")
    for split in SPLITS:
        entries = data.get(split, [])
        if not isinstance(entries, list):
            raise UserError(f"split file {path} has a '{split}' that is not a list; {hint}.")
        for entry in entries:
            if not _is_pair(entry) or (names is not None and not 0 <= entry[1] < len(names)):
                raise UserError(
                    f"split file {path} has a {split} entry {shown(entry)} that is not a [relative path, "
                    f"class index] pair; {hint}."
                )
            if leaves_root(entry[0]):
                raise UserError(
                    f"split file {path} lists {shown(entry[0], 300)} in {split}, which is not a path inside the data "
                    f"folder (it is empty, absolute or goes up with '..'); {hint}."
                )
    return data


def _is_pair(entry: object) -> bool:
    return (
        isinstance(entry, list)
        and len(entry) == 2
        and isinstance(entry[0], str)
        and isinstance(entry[1], int)
        and not isinstance(entry[1], bool)
    )


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
