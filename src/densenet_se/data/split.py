"""Stratified, seeded train/val/test split: a pure function of (sorted files, labels, fractions, seed)."""

from __future__ import annotations

import math
import random
from collections import defaultdict

from densenet_se.errors import UserError

SPLITS = ("train", "val", "test")


def check_fractions(val_fraction: float, test_fraction: float) -> None:
    """Raise UserError unless 0 < val_fraction < 1, 0 <= test_fraction < 1 and their sum is below 1."""
    if not 0.0 < val_fraction < 1.0:
        raise UserError(f"data.val_fraction={val_fraction} must be between 0 and 1 (exclusive), e.g. 0.2.")
    if not 0.0 <= test_fraction < 1.0:
        raise UserError(f"data.test_fraction={test_fraction} must be in [0, 1), e.g. 0.0 (no test split).")
    if val_fraction + test_fraction >= 1.0:
        raise UserError(
            f"data.val_fraction={val_fraction} plus data.test_fraction={test_fraction} must be below 1 "
            "so that some images are left for training."
        )


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
    files: list[str], labels: list[int], val_fraction: float, test_fraction: float, seed: int
) -> dict:
    """Split files per class into train/val/test with their own RNG (independent of the training seed).

    Returns {"seed", "val_fraction", "test_fraction", "train", "val", "test"}, each split a list of
    [relative path, label] pairs sorted by path. The same inputs always give the same split.
    """
    check_fractions(val_fraction, test_fraction)
    if len(files) != len(labels):
        raise ValueError(f"{len(files)} files but {len(labels)} labels")
    by_class: dict[int, list[str]] = defaultdict(list)
    for path, label in zip(files, labels, strict=True):
        by_class[int(label)].append(path)
    out: dict[str, list[list]] = {name: [] for name in SPLITS}
    for label in sorted(by_class):
        paths = sorted(by_class[label])
        # One RNG per class, seeded by (seed, label): new files in one class leave the others' split alone.
        random.Random(f"{seed}/{label}").shuffle(paths)
        _, n_val, n_test = split_counts(len(paths), val_fraction, test_fraction)
        out["val"].extend([p, label] for p in paths[:n_val])
        out["test"].extend([p, label] for p in paths[n_val : n_val + n_test])
        out["train"].extend([p, label] for p in paths[n_val + n_test :])
    for name in SPLITS:
        out[name].sort()
    empty = [name for name in ("train", "val") if not out[name]]
    if test_fraction > 0 and not out["test"]:
        empty.append("test")
    if empty:
        keys = "data.val_fraction" if empty != ["test"] else "data.test_fraction"
        raise UserError(
            f"the {'/'.join(empty)} split would be empty with {len(files)} images: raise {keys} "
            "or add images."
        )
    return {
        "seed": int(seed),
        "val_fraction": float(val_fraction),
        "test_fraction": float(test_fraction),
        "train": out["train"],
        "val": out["val"],
        "test": out["test"],
    }


def split_class_counts(split: dict, num_classes: int) -> dict[str, list[int]]:
    """Files per class in each split, e.g. {"train": [836, 844], "val": [209, 211], "test": [0, 0]}."""
    counts = {name: [0] * num_classes for name in SPLITS}
    for name in SPLITS:
        for _, label in split.get(name, []):
            counts[name][label] += 1
    return counts
