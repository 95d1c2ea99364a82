"""The split: stratified per class, a pure function of (files, labels, fractions, seed)."""

from __future__ import annotations

import random

import pytest
import torch

from densenet_se.data.split import make_split, split_class_counts, split_counts
from densenet_se.errors import UserError
from helpers.images import class_files


def test_stratified_counts_and_disjoint_cover():
    files, labels = class_files([100, 37, 9])
    split = make_split(files, labels, 0.2, 0.1, seed=428)
    assert split_class_counts(split, 3) == {"train": [70, 26, 6], "val": [20, 7, 2], "test": [10, 4, 1]}
    paths = [p for name in ("train", "val", "test") for p, _ in split[name]]
    assert sorted(paths) == sorted(files)  # every file in exactly one split
    truth = dict(zip(files, labels, strict=True))
    assert all(truth[p] == label for name in ("train", "val", "test") for p, label in split[name])
    assert split["seed"] == 428 and split["val_fraction"] == 0.2 and split["test_fraction"] == 0.1


def test_default_is_80_20_without_test():
    files, labels = class_files([1045, 1055])
    split = make_split(files, labels, 0.2, 0.0, seed=428)
    assert split_class_counts(split, 2) == {"train": [836, 844], "val": [209, 211], "test": [0, 0]}
    assert split["test"] == []


def test_split_is_deterministic_and_independent_of_the_training_seed():
    files, labels = class_files([30, 30])
    torch.manual_seed(1)
    random.seed(1)
    first = make_split(files, labels, 0.2, 0.0, seed=7)
    torch.manual_seed(2)
    random.seed(2)
    assert make_split(files, labels, 0.2, 0.0, seed=7) == first
    assert make_split(files, labels, 0.2, 0.0, seed=8)["val"] != first["val"]


def test_new_files_in_one_class_leave_the_other_class_alone():
    files, labels = class_files([30, 30])
    before = make_split(files, labels, 0.2, 0.0, seed=3)
    more_files, more_labels = class_files([30, 40])
    after = make_split(more_files, more_labels, 0.2, 0.0, seed=3)
    assert [p for p, c in after["val"] if c == 0] == [p for p, c in before["val"] if c == 0]


def test_small_classes_get_one_file_per_requested_split():
    assert split_counts(3, 0.2, 0.1) == (1, 1, 1)
    assert split_counts(2, 0.2, 0.1) == (1, 1, 0)  # test gives way first
    assert split_counts(1, 0.2, 0.1) == (1, 0, 0)  # training keeps the last file
    assert split_counts(10, 0.5, 0.45) == (1, 5, 4)


@pytest.mark.parametrize(
    ("val", "test", "key"),
    [
        (0.0, 0.0, "data.val_fraction"),
        (1.0, 0.0, "data.val_fraction"),
        (0.2, -0.1, "data.test_fraction"),
        (0.2, 1.0, "data.test_fraction"),
        (0.6, 0.4, "data.val_fraction"),
    ],
)
def test_invalid_fractions_name_the_key(val, test, key):
    files, labels = class_files([10, 10])
    with pytest.raises(UserError, match=key):
        make_split(files, labels, val, test, seed=0)


def test_empty_split_is_a_user_error():
    files, labels = class_files([1, 1])
    with pytest.raises(UserError, match="val split would be empty"):
        make_split(files, labels, 0.2, 0.0, seed=0)
    files, labels = class_files([2, 2])
    with pytest.raises(UserError, match="test split would be empty.*data.test_fraction"):
        make_split(files, labels, 0.2, 0.2, seed=0)
