"""K-fold cross-validation: the folds partition the pool by class, the test split stays put, sweeps give mean ± std."""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from densenet_se import folds, sweep
from densenet_se.data import ImageFolderDataModule
from densenet_se.data.split import make_split, split_class_counts
from densenet_se.errors import UserError
from densenet_se.folds import aggregate_folds, fold_of, folds_markdown, mean_std
from helpers.config import ROOT, TINY
from helpers.images import class_files, make_image_folder
from helpers.runs import subprocess_env


def test_fold_validation_sets_are_disjoint_cover_the_pool_and_are_stratified():
    files, labels = class_files([53, 27, 11])
    splits = [make_split(files, labels, 0.2, 0.1, seed=428, folds=5, fold=k) for k in range(5)]
    vals = [{p for p, _ in s["val"]} for s in splits]
    pool = set(files) - {p for p, _ in splits[0]["test"]}
    assert sum(map(len, vals)) == len(pool) and set().union(*vals) == pool  # disjoint and covering
    for split, val in zip(splits, vals, strict=True):
        assert {p for p, _ in split["train"]} == pool - val
        assert {p for p, i in split["fold_index"].items() if i == split["fold"]} == val
    per_fold = [split_class_counts(s, 3)["val"] for s in splits]
    for c, n_pool in enumerate([48, 24, 10]):  # 53, 27, 11 minus 5, 3, 1 test files
        sizes = [counts[c] for counts in per_fold]
        assert sum(sizes) == n_pool and max(sizes) - min(sizes) <= 1, sizes
    totals = [len(v) for v in vals]
    assert max(totals) - min(totals) <= 1, totals  # classes continue where the previous one stopped


def test_test_split_is_fixed_across_folds_and_equals_the_one_without_folds():
    files, labels = class_files([40, 30])
    plain = make_split(files, labels, 0.2, 0.15, seed=9)
    for k in range(4):
        split = make_split(files, labels, 0.2, 0.15, seed=9, folds=4, fold=k)
        assert split["test"] == plain["test"]
        assert split["folds"] == 4 and split["fold"] == k and split["val_fraction"] is None
    # Held out first, so val_fraction (unused with folds) does not move it either.
    assert make_split(files, labels, 0.3, 0.15, seed=9, folds=4, fold=0)["test"] == plain["test"]
    assert plain["folds"] == 0 and plain["fold"] is None and "fold_index" not in plain


def test_folds_are_a_pure_function_of_files_folds_and_seed():
    files, labels = class_files([25, 25])
    first = make_split(files, labels, 0.2, 0.0, seed=1, folds=5, fold=2)
    assert (
        make_split(list(reversed(files)), list(reversed(labels)), 0.2, 0.0, seed=1, folds=5, fold=2) == first
    )
    assert make_split(files, labels, 0.2, 0.0, seed=2, folds=5, fold=2)["fold_index"] != first["fold_index"]
    assert Counter(first["fold_index"].values()) == {k: 10 for k in range(5)}


@pytest.mark.parametrize(
    ("folds", "fold", "message"),
    [
        (1, 0, "data.folds=1 is out of range; it must be 0 (no folds) or an integer >= 2."),
        (-2, 0, "data.folds=-2 is out of range; it must be 0 (no folds) or an integer >= 2."),
        (5, 5, "data.fold=5 must be in 0..4 for data.folds=5"),
        (5, -1, "data.fold=-1 is out of range; it must be an integer >= 0."),
        (0, 2, "data.fold=2 needs data.folds, e.g. data.folds=5 data.fold=2"),
    ],
)
def test_bad_fold_settings_name_the_key(folds, fold, message):
    files, labels = class_files([20, 20])
    with pytest.raises(UserError, match=re.escape(message)):
        make_split(files, labels, 0.2, 0.0, seed=0, folds=folds, fold=fold)


def test_class_smaller_than_the_number_of_folds_is_an_error():
    files, labels = class_files([30, 6])
    with pytest.raises(
        UserError,
        match="data.folds=5 needs at least 5 images of each class outside the test split, but Others has 4",
    ):
        make_split(files, labels, 0.2, 0.3, seed=0, folds=5, class_names=["Monkeypox", "Others"])


def test_datamodule_writes_the_folds_to_split_json(tmp_path):
    root = make_image_folder(tmp_path / "images", {"A": 10, "B": 8}, size=32)
    dm = ImageFolderDataModule(
        root=str(root), image_size=32, output_dir=str(tmp_path / "run"), folds=3, fold=2, test_fraction=0.2
    )
    dm.setup()
    saved = json.loads((tmp_path / "run" / "split.json").read_text())
    assert saved["folds"] == 3 and saved["fold"] == 2 and saved["val_fraction"] is None
    assert saved["counts"]["test"] == [2, 2] and saved["counts"]["val"] == [2, 2]
    assert sorted(saved["fold_index"]) == sorted(p for name in ("train", "val") for p, _ in saved[name])
    assert sorted(p for p, _ in saved["val"]) == sorted(p for p, k in saved["fold_index"].items() if k == 2)
    assert dm.split_report == {
        "grouped_split": False,
        "groups": None,
        "folds": 3,
        "fold": 2,
        "leakage_warning": None,
    }


# ---- aggregation -----------------------------------------------------------------------------------------
def test_mean_std_is_the_sample_standard_deviation_over_finite_values():
    mean, std, n = mean_std([0.8, 0.9, None, float("nan"), 1.0])
    assert n == 3 and mean == pytest.approx(0.9) and std == pytest.approx(np.std([0.8, 0.9, 1.0], ddof=1))
    assert mean_std([0.5]) == (0.5, None, 1) and mean_std([]) == (None, None, 0)


def test_aggregate_groups_folds_by_the_other_overrides():
    def row(job, se, fold, acc, status="completed"):
        overrides = f"model.se_reduction={se} data.folds=3 data.fold={fold}"
        return {"job": job, "status": status, "overrides": overrides, "best_val_acc": acc, "test_acc": None}

    rows = [
        row(0, 4, 0, 0.8),
        row(1, 4, 1, 0.9),
        row(2, 4, 2, 0.7),
        row(3, 8, 0, 0.6),
        row(4, 8, 1, None, status="failed"),
        row(5, 8, 2, 0.5),
        {"job": 6, "status": "completed", "overrides": "model.se_reduction=2", "best_val_acc": 0.99},
    ]
    summaries = aggregate_folds(rows)
    assert [s["overrides"] for s in summaries] == [
        "model.se_reduction=4 data.folds=3",
        "model.se_reduction=8 data.folds=3",
    ]
    first, second = summaries
    assert (first["completed"], first["jobs"], first["folds"]) == (3, 3, "0 1 2")
    assert first["best_val_acc_mean"] == pytest.approx(0.8)
    assert first["best_val_acc_std"] == pytest.approx(np.std([0.8, 0.9, 0.7], ddof=1))
    assert (second["completed"], second["jobs"], second["folds"]) == (2, 3, "0 2")
    assert second["best_val_acc_mean"] == pytest.approx(0.55) and first["test_acc_n"] == 0
    lines = folds_markdown(summaries)
    assert "| `model.se_reduction=4` | 3 of 3 | 0.8000 ± 0.1000 |" in lines
    assert "| `model.se_reduction=8` | 2 of 3 | 0.5500 ± 0.0707 |" in lines
    assert not any("test acc" in line for line in lines)  # no test split: no test columns
    assert fold_of(["data.fold=3"]) == 3 and fold_of(["data.folds=3"]) is None
    assert aggregate_folds(rows[6:]) == [] and folds_markdown([]) == []
    assert "| (every job) | 3 of 3 | 0.8000 ± 0.1000 |" in folds_markdown(summaries[:1])


def test_k_fold_sweep_summary_has_one_cross_validation_table(tmp_path, monkeypatch):
    # Three finished folds as their job directories hold them: the summary needs no training.
    for fold, acc in enumerate((0.8, 0.9, 0.7)):
        job = tmp_path / f"{fold}_data.fold={fold}"
        job.mkdir()
        (job / "metrics.json").write_text(json.dumps({"best_val_acc": acc, "best_epoch": 0, "test": None}))
        status = {"job": fold, "overrides": ["data.folds=3", f"data.fold={fold}"], "status": "completed"}
        (job / sweep.STATUS_FILE).write_text(json.dumps({**status, "exit_code": 0, "seconds": 1.0}))
    written = []
    write = folds.atomic_write_text
    monkeypatch.setattr(
        folds, "atomic_write_text", lambda path, text: written.append(path) or write(path, text)
    )
    sweep.write_summary(tmp_path)
    summary = (tmp_path / sweep.SUMMARY_MD).read_text()
    assert summary.count("**Cross-validation: mean ± std over folds.**") == 1, summary
    assert summary.count("| (every job) | 3 of 3 | 0.8000 ± 0.1000 |") == 1
    assert summary.count("**Every job:**") == 1 and summary.count("| job | status |") == 1
    assert [Path(p).name for p in written] == [folds.FOLDS_CSV]  # sweep_folds.csv written once


@pytest.mark.slow
@pytest.mark.subprocess
def test_three_fold_sweep_summary_reports_mean_and_std(tmp_path):
    root = make_image_folder(tmp_path / "images", {"Monkeypox": 12, "Others": 12}, size=32)
    sweep_dir = tmp_path / "sweep"
    args = [
        *TINY,
        f"data.root={root}",
        f"paths.cache_dir={tmp_path}/cache",
        "data.test_fraction=0.25",
        "data.folds=3",
        "data.fold=range(3)",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=1",
        "print_config=false",
        "logger=csv",
        f"hydra.sweep.dir={sweep_dir}",
    ]
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "-m", *args],
        cwd=tmp_path,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = [json.loads(p.read_text()) for p in sorted(sweep_dir.glob("*/metrics.json"))]
    assert len(metrics) == 3 and sorted(m["fold"] for m in metrics) == [0, 1, 2]
    assert all(m["folds"] == 3 and m["grouped_split"] is False for m in metrics)
    tests = {
        json.dumps(json.loads((p.parent / "split.json").read_text())["test"])
        for p in sweep_dir.glob("*/metrics.json")
    }
    assert len(tests) == 1  # one test split for every fold
    with open(sweep_dir / "sweep_folds.csv", newline="") as f:
        (row,) = list(csv.DictReader(f))
    assert row["completed"] == "3" and row["folds"] == "0 1 2"
    for key, values in (
        ("best_val_acc", [m["best_val_acc"] for m in metrics]),
        ("test_acc", [m["test"]["acc"] for m in metrics]),
        ("test_auroc", [m["test"]["auroc"] for m in metrics]),
    ):
        assert float(row[f"{key}_mean"]) == pytest.approx(np.mean(values), abs=1e-9)
        assert float(row[f"{key}_std"]) == pytest.approx(np.std(values, ddof=1), abs=1e-9)
    summary = (sweep_dir / "sweep_summary.md").read_text()
    best = [m["best_val_acc"] for m in metrics]
    assert f"{np.mean(best):.4f} ± {np.std(best, ddof=1):.4f}" in summary
