"""Grouped splits: every source's files share one split and one fold; bad patterns and CSVs are clear errors."""

from __future__ import annotations

import json
import logging
import random
import re
import shutil
from pathlib import Path

import pytest

from densenet_se.data import ImageFolderDataModule
from densenet_se.data.groups import groups_from_pattern, leakage_warning, suggest_group_pattern
from densenet_se.data.split import SPLITS, make_split, split_class_counts
from densenet_se.errors import UserError
from helpers.images import make_image_folder


def _augmented(sources: list[int], seed: int = 0) -> tuple[list[str], list[int], list[str]]:
    """Files `c<label>/s<id>_aug<j>.jpg`: 1-8 copies of each source, grouped by `<label>-<id>`."""
    rng = random.Random(seed)
    files, labels, groups = [], [], []
    for label, n in enumerate(sources):
        for source in range(n):
            for copy in range(rng.randint(1, 8)):
                files.append(f"c{label}/s{source:03d}_aug{copy}.jpg")
                labels.append(label)
                groups.append(f"{label}-{source}")
    return files, labels, groups


def _place(split: dict) -> dict[str, str]:
    return {path: name for name in SPLITS for path, _ in split[name]}


def _crossing(split: dict, files: list[str], groups: list[str]) -> set[str]:
    place = _place(split)
    seen: dict[str, set[str]] = {}
    for path, group in zip(files, groups, strict=True):
        seen.setdefault(group, set()).add(place[path])
    return {g for g, names in seen.items() if len(names) > 1}


def test_no_group_crosses_train_val_test_and_classes_stay_stratified():
    files, labels, groups = _augmented([60, 40])
    split = make_split(files, labels, 0.2, 0.1, seed=428, groups=groups)
    assert _crossing(split, files, groups) == set()
    assert sorted(p for name in SPLITS for p, _ in split[name]) == sorted(files)
    counts = split_class_counts(split, 2)
    for c in range(2):
        n = sum(1 for label in labels if label == c)
        # Whole groups of up to 8 files: each split's share is within one group of the target.
        assert abs(counts["val"][c] - 0.2 * n) <= 8 and abs(counts["test"][c] - 0.1 * n) <= 8
    assert split["grouped"] is True and split["groups"] == dict(zip(files, groups, strict=True))


def test_no_group_crosses_folds_and_the_test_split_is_fixed():
    files, labels, groups = _augmented([60, 40], seed=1)
    unfolded = make_split(files, labels, 0.2, 0.1, seed=5, groups=groups)
    vals = []
    for fold in range(4):
        split = make_split(files, labels, 0.2, 0.1, seed=5, groups=groups, folds=4, fold=fold)
        assert _crossing(split, files, groups) == set()
        assert split["test"] == unfolded["test"]
        vals.append({p for p, _ in split["val"]})
        fold_of_group: dict[str, set[int]] = {}
        for path, group in zip(files, groups, strict=True):
            if path in split["fold_index"]:
                fold_of_group.setdefault(group, set()).add(split["fold_index"][path])
        assert all(len(f) == 1 for f in fold_of_group.values())
    pool = {p for p, _ in unfolded["train"] + unfolded["val"]}
    assert set().union(*vals) == pool and sum(map(len, vals)) == len(pool)
    for c in range(2):  # every fold holds each class, near a quarter of its pool
        sizes = [sum(1 for p in v if p.startswith(f"c{c}/")) for v in vals]
        share = sum(sizes) / 4
        assert min(sizes) > 0 and max(abs(s - share) for s in sizes) <= 8, sizes


def test_grouped_split_is_a_pure_function_of_its_inputs():
    files, labels, groups = _augmented([30, 30], seed=2)
    first = make_split(files, labels, 0.2, 0.0, seed=3, groups=groups, folds=3, fold=1)
    shuffled = list(zip(files, labels, groups, strict=True))
    random.Random(9).shuffle(shuffled)
    f2, l2, g2 = (list(t) for t in zip(*shuffled, strict=True))
    assert make_split(f2, l2, 0.2, 0.0, seed=3, groups=g2, folds=3, fold=1) == first
    assert make_split(files, labels, 0.2, 0.0, seed=4, groups=groups, folds=3, fold=1)["val"] != first["val"]


def test_few_large_groups_still_give_val_a_group_of_each_class():
    files = [f"c{c}/g{g}_{i}.jpg" for c in range(2) for g in range(3) for i in range(10)]
    labels = [int(f[1]) for f in files]
    groups = [f.split("_")[0] for f in files]
    split = make_split(files, labels, 0.2, 0.0, seed=0, groups=groups)
    assert split_class_counts(split, 2)["val"] == [10, 10]


def test_class_with_fewer_groups_than_folds_is_an_error_naming_the_key():
    files = [f"{c}/g{g}_{i}.jpg" for c in ("A", "B") for g in range(3 if c == "B" else 6) for i in range(4)]
    labels = [0 if f.startswith("A") else 1 for f in files]
    groups = [f.split("_")[0] for f in files]
    with pytest.raises(UserError, match=r"data.folds=4 needs at least 4 source groups .* but B has 3"):
        make_split(files, labels, 0.2, 0.0, seed=0, groups=groups, folds=4, class_names=["A", "B"])


# ---- data.group_pattern -----------------------------------------------------------------------------------
def test_pattern_first_capture_group_is_the_source_id():
    files = ["Monkeypox/M01_01_aug3.jpg", "Monkeypox/M01_01.jpg", "Others/NM2_flip.png"]
    assert groups_from_pattern(files, r"([^/]+?)(?:_aug\d+|_flip)?\.\w+$") == ["M01_01", "M01_01", "NM2"]
    assert groups_from_pattern(files, r"^[^/]+/[A-Z]+\d+") == ["Monkeypox/M01", "Monkeypox/M01", "Others/NM2"]


@pytest.mark.parametrize(
    ("pattern", "message"),
    [
        ("(M\\d+", "is not a valid regular expression (missing ), unterminated subpattern"),
        ("^zzz(\\d+)", "matches none of the 3 images (e.g. 'a/x1_aug1.jpg', 'a/x1_aug2.jpg' and 1 more)"),
        ("(x\\d)_aug", "gives no source id for 1 of the 3 images ('b/y2.jpg'); widen it"),
        ("(?:aug|y2)(\\d*)", "gives no source id for 1 of the 3 images ('b/y2.jpg')"),  # an empty id is no id
    ],
)
def test_bad_patterns_get_one_clear_sentence(pattern, message):
    files = ["a/x1_aug1.jpg", "a/x1_aug2.jpg", "b/y2.jpg"]
    with pytest.raises(UserError, match=re.escape(f"data.group_pattern='{pattern}' {message}")) as info:
        groups_from_pattern(files, pattern)
    assert "\n" not in str(info.value)


# ---- data.groups (CSV) ------------------------------------------------------------------------------------
@pytest.fixture
def augmented_tree(tmp_path: Path) -> Path:
    """Classes A (6 sources) and B (4 sources), 3 copies each: `A/a<k>_aug<j>.png`, 60 px images."""
    base = make_image_folder(tmp_path / "base", {"A": 6, "B": 4}, size=36)
    root = tmp_path / "aug"
    for cls in ("A", "B"):
        (root / cls).mkdir(parents=True)
        for k, src in enumerate(sorted((base / cls).iterdir())):
            for j in range(3):
                shutil.copy(src, root / cls / f"{cls.lower()}{k}_aug{j}.png")
    return root


def _dm(root: Path, out: Path, **kwargs) -> ImageFolderDataModule:
    return ImageFolderDataModule(root=str(root), image_size=32, batch_size=4, output_dir=str(out), **kwargs)


def _write_csv(path: Path, rows: list[str]) -> Path:
    path.write_text("\n".join(rows) + "\n")
    return path


def _all_rows(root: Path) -> list[str]:
    return [f"{p.relative_to(root).as_posix()},{p.name.split('_')[0]}" for p in sorted(root.rglob("*.png"))]


def test_groups_csv_with_header_keeps_sources_together_and_reports_them(augmented_tree, tmp_path, caplog):
    csv_path = _write_csv(tmp_path / "groups.csv", ["path,group", *_all_rows(augmented_tree)])
    dm = _dm(augmented_tree, tmp_path / "run", groups=str(csv_path), test_fraction=0.2)
    with caplog.at_level(logging.INFO, logger="densenet_se.data"):
        dm.setup()
    saved = json.loads((tmp_path / "run" / "split.json").read_text())
    place = _place(saved)
    by_group: dict[str, set[str]] = {}
    for path, group in saved["groups"].items():
        by_group.setdefault(group, set()).add(place[path])
    assert len(by_group) == 10 and all(len(s) == 1 for s in by_group.values())
    assert saved["grouped"] is True and saved["split_seed" if "split_seed" in saved else "seed"] == 428
    assert dm.split_report["grouped_split"] is True
    assert dm.split_report["groups"] == {
        "by": "data.groups",
        "value": str(csv_path),
        "count": 10,
        "per_class": {"A": 6, "B": 4},
        "mixed_class": 0,
    }
    assert "grouped by data.groups" in caplog.text and "10 source groups (A 6, B 4)" in caplog.text
    assert "look like augmented copies" not in caplog.text


def test_csv_without_header_and_windows_paths_is_read(augmented_tree, tmp_path):
    rows = [r.replace("/", "\\") for r in _all_rows(augmented_tree)]
    dm = _dm(augmented_tree, tmp_path / "run", groups=str(_write_csv(tmp_path / "g.csv", rows)))
    dm.setup()
    assert dm.split_report["groups"]["count"] == 10


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda rows: [*rows, "A/nope.png,a9"],
            r"names 1 files that are not images under data.root \('A/nope.png \(line 31\)'\)",
        ),
        (
            lambda rows: rows[1:],
            r"has no row for 1 of the 30 images \('A/a0_aug0.png'\); give every image a group",
        ),
        (
            lambda rows: [*rows[:3], "A/a0_aug1.png", *rows[3:]],
            r"line 4 is 'A/a0_aug1.png'; each row must be path,group",
        ),
        (
            lambda rows: [*rows, "A/a0_aug0.png,zz"],
            r"gives 'A/a0_aug0.png' two groups \('a0' on line 1, 'zz' on line 31\)",
        ),
    ],
)
def test_bad_csv_gets_one_clear_sentence(augmented_tree, tmp_path, edit, message):
    csv_path = _write_csv(tmp_path / "g.csv", edit(_all_rows(augmented_tree)))
    with pytest.raises(UserError, match=rf"data.groups={re.escape(str(csv_path))} .*{message}") as info:
        _dm(augmented_tree, tmp_path / "run", groups=str(csv_path)).setup()
    assert "\n" not in str(info.value)


def test_missing_csv_and_both_sources_are_errors(augmented_tree, tmp_path):
    with pytest.raises(UserError, match=r"data.groups=.*nothere.csv does not exist"):
        _dm(augmented_tree, tmp_path / "run", groups=str(tmp_path / "nothere.csv")).setup()
    with pytest.raises(UserError, match="are both set"):
        _dm(augmented_tree, tmp_path / "run", groups="g.csv", group_pattern="(x)")
    with pytest.raises(
        UserError, match=re.escape("data.group_pattern='(x' is not a valid regular expression")
    ):
        _dm(augmented_tree, tmp_path / "run", group_pattern="(x")  # refused before any image is read


def test_mixed_class_group_is_kept_whole_with_a_warning(augmented_tree, tmp_path, caplog):
    # a0 and b0 both become source "0": one group holding both classes.
    dm = _dm(augmented_tree, tmp_path / "run", group_pattern=r"[ab](\d+)_aug", folds=3, fold=1)
    with caplog.at_level(logging.WARNING, logger="densenet_se.data"):
        dm.setup()
    assert dm.split_report["groups"]["mixed_class"] == 4  # sources 0-3 exist in both A and B
    warnings = [r.getMessage() for r in caplog.records if "more than one class" in r.getMessage()]
    assert len(warnings) == 1 and "data.group_pattern" in warnings[0]
    place = _place(dm.split)
    for k in range(4):
        assert len({place[p] for p in dm.split["groups"] if dm.split["groups"][p] == str(k)}) == 1


# ---- spotting augmented copies ----------------------------------------------------------------------------
def test_augmented_names_get_one_warning_with_a_pattern_that_works(augmented_tree, tmp_path, caplog):
    dm = _dm(augmented_tree, tmp_path / "run")
    with caplog.at_level(logging.INFO, logger="densenet_se.data"):
        dm.setup()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "augmented copies" in warnings[0], warnings
    assert dm.split_report["grouped_split"] is False and dm.split_report["groups"] is None
    assert dm.split_report["leakage_warning"] == warnings[0]
    assert "split: not grouped" in caplog.text
    pattern = re.search(r"data.group_pattern='(.+?)'\"", warnings[0]).group(1)
    again = _dm(augmented_tree, tmp_path / "run2", group_pattern=pattern)
    again.setup()  # the suggestion, used as is, groups the 30 files into their 10 sources
    assert again.split_report["groups"]["count"] == 10


@pytest.mark.parametrize(
    ("names", "joined"),
    [
        (
            ["img12_flip.jpg", "img12_rot90.jpg", "img12.jpg", "img7_flip.jpg", "img7_rot90.jpg", "img7.jpg"],
            2,
        ),
        ([f"M{i:02d}_01_aug{j}.jpg" for i in range(3) for j in range(4)] + ["M00_01.jpg"], 3),
        ([f"photo{i} ({j}).png" for i in range(3) for j in (1, 2)] + [f"photo{i}.png" for i in range(3)], 3),
        ([f"x{i}-Aug_{j}.jpg" for i in range(4) for j in range(2)], 4),
    ],
)
def test_suggested_pattern_joins_the_copies(names, joined):
    files = [f"cls/{n}" for n in names]
    pattern = suggest_group_pattern(files)
    assert pattern is not None
    assert len(set(groups_from_pattern(files, pattern))) == joined


@pytest.mark.parametrize(
    "names",
    [
        [f"IMG_{i:04d}.jpg" for i in range(200)],  # camera numbering, not copies
        [f"case{i}_{j}.jpg" for i in range(20) for j in range(3)],  # bare numbers are never taken as copies
        ["a_flip.jpg", "b.jpg", "c_rot90.jpg", "d.jpg"],  # augmentation words, but nothing shared
    ],
)
def test_ordinary_names_get_no_warning(names):
    assert leakage_warning([f"cls/{n}" for n in names]) is None
