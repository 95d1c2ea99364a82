"""data.source: the csv source lists what the folders source scans, every bad labels CSV is one sentence, a csv run
trains, evaluates and resumes, and a third source (docs/ARCHITECTURE.md's textfile example) takes one file + one YAML."""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from densenet_se.config import DataConfig, compose_train_config, validate
from densenet_se.data import ImageFolderDataModule, sources
from densenet_se.errors import UserError
from helpers.config import CONF, TINY, compose_cfg
from helpers.docs import installed_example
from helpers.images import make_image_folder, write_bad_files
from helpers.runs import run_cli, run_train

# Not in name order: classes come out sorted by name whatever order the folders or rows give them in.
CLASSES = {"Others": 9, "Monkeypox": 11}


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    return make_image_folder(tmp_path / "images", CLASSES, size=36)


def _rows(root: Path) -> list[str]:
    """A `path,label` row for each image of `root`, labelled by its folder, in a shuffled order."""
    rows = [f"{p.relative_to(root).as_posix()},{p.parent.name}" for p in sorted(root.rglob("*.png"))]
    random.Random(0).shuffle(rows)
    return rows


def _csv(path: Path, rows: list[str], header: bool = True) -> Path:
    path.write_text("\n".join(["path,label", *rows] if header else rows) + "\n")
    return path


def _dm(root: Path, tmp_path: Path, **kwargs) -> ImageFolderDataModule:
    args = dict(root=str(root), image_size=32, batch_size=4, cache_dir=str(tmp_path / "cache"))
    return ImageFolderDataModule(**(args | kwargs))


def _without_source(split: dict) -> dict:
    return {k: v for k, v in split.items() if k not in ("source", "labels")}


@pytest.mark.parametrize(
    "settings",
    [{"test_fraction": 0.2, "split_seed": 7}, {"folds": 3, "fold": 2}, {"group_pattern": r"(\d)\.png$"}],
)
def test_csv_gives_the_folders_split_for_the_same_files_and_labels(tree, tmp_path, settings):
    folders = _dm(tree, tmp_path, **settings)
    folders.setup()
    # Shuffled rows, Windows separators, './' prefixes, a BOM, CRLF line ends and blank lines: the same listing.
    rows = [
        r.replace("/", "\\") if i % 3 == 0 else f"./{r}" if i % 3 == 1 else r
        for i, r in enumerate(_rows(tree))
    ]
    text = "\ufeffpath,label\r\n" + "\r\n".join(rows[:5]) + "\r\n\r\n" + "\r\n".join(rows[5:]) + "\r\n"
    (tmp_path / "labels.csv").write_text(text, newline="")
    listed = _dm(
        tree,
        tmp_path,
        source="csv",
        labels=str(tmp_path / "labels.csv"),
        output_dir=str(tmp_path / "run"),
        **settings,
    )
    listed.setup()
    assert listed.class_names == folders.class_names == ["Monkeypox", "Others"]
    assert listed.files == folders.files and listed.digests == folders.digests
    assert _without_source(listed.split) == _without_source(folders.split)
    saved = json.loads((tmp_path / "run" / "split.json").read_text())
    assert (saved["source"], saved["labels"]) == ("csv", str(tmp_path / "labels.csv"))
    assert (folders.split["source"], folders.split["labels"]) == ("folders", None)


def test_classes_are_the_labels_sorted_by_name_and_need_no_folders(tmp_path):
    # Files in one flat folder, labelled only by the CSV (as HAM10000 ships), its rows without a header.
    flat = tmp_path / "flat"
    flat.mkdir()
    tree = make_image_folder(tmp_path / "images", {"a": 6, "b": 6}, size=36)
    rows = []
    for i, path in enumerate(sorted(tree.rglob("*.png"))):
        shutil.copy(path, flat / f"ISIC_{i:04d}.png")
        rows.append(f"ISIC_{i:04d}.png,{'nv' if path.parent.name == 'a' else 'mel'}")
    dm = _dm(flat, tmp_path, source="csv", labels=str(_csv(tmp_path / "l.csv", rows, header=False)))
    dm.setup()
    assert dm.class_names == ["mel", "nv"]  # first seen is nv; sorted, as torchvision's ImageFolder
    assert dm.files == [f"ISIC_{i:04d}.png" for i in (*range(6, 12), *range(6))]
    assert dm.split["counts"] == {"train": [5, 5], "val": [1, 1], "test": [0, 0]}


def _bad_cases(root: Path, tmp_path: Path) -> dict[str, tuple[list[str], str]]:
    """name -> (rows after the header, the message after `data.labels=<csv> `)."""
    rows = sorted(_rows(root))
    first = rows[0].split(",")[0]
    (root / "Monkeypox" / "notes.txt").write_text("not an image")
    secret = tmp_path / "secret.png"
    shutil.copy(root / first, secret)
    (root / "Monkeypox" / "outside.png").symlink_to(secret)
    (root / "Monkeypox" / "alias.png").symlink_to(root / first)
    n = len(rows) + 2  # the line of a row added at the end
    return {
        "missing file": (
            [*rows, "Monkeypox/gone.png,Monkeypox"],
            f"names files that do not exist under data.root={root}: line {n} 'Monkeypox/gone.png'; paths are "
            "relative to data.root; fix them, or leave the rows out.",
        ),
        "duplicate": (
            [*rows, rows[0]],
            f"lists {first!r} twice, on lines 2 and {n}; keep one row per image.",
        ),
        "two spellings": (
            [*rows, f"Monkeypox//./{first.split('/')[1]},Monkeypox"],
            f"lists {first!r} twice, on lines 2 and {n}; keep one row per image.",
        ),
        "link to a listed file": (
            [*rows, "Monkeypox/alias.png,Monkeypox"],
            f"lists one file twice ({first!r}, 'Monkeypox/alias.png'), on lines 2 and {n}; keep one row per image.",
        ),
        "empty label": (
            [*rows[:3], f"{rows[3].split(',')[0]},", *rows[4:]],
            f"line 5 is '{rows[3].split(',')[0]},'; each row must be path,label with both filled in (quote a "
            "path that holds a comma).",
        ),
        "three cells": (
            [*rows, "a.png,b,c"],
            f"line {n} is 'a.png,b,c'; each row must be path,label with both filled in (quote a path that holds "
            "a comma).",
        ),
        "absolute path": (
            [*rows, f"{secret},Others"],
            f"names paths that are not inside data.root (empty, absolute, with '..' or a NUL byte): line {n} "
            f"{str(secret)!r}; paths are relative to data.root.",
        ),
        "up with ..": (
            [*rows, "Others/../../secret.png,Others"],
            f"names paths that are not inside data.root (empty, absolute, with '..' or a NUL byte): line {n} "
            "'Others/../../secret.png'; paths are relative to data.root.",
        ),
        "symlink out of the root": (
            [*rows, "Monkeypox/outside.png,Monkeypox"],
            f"names files that a symbolic link leads outside data.root={root}: line {n} 'Monkeypox/outside.png'; "
            "list the files inside data.root, or set data.root to the folder that holds them.",
        ),
        "one class": (
            [r for r in rows if r.endswith(",Monkeypox")],
            "names 1 class ('Monkeypox'); at least 2 are needed, one label per class.",
        ),
        "not an image extension": (
            [*rows, "Monkeypox/notes.txt,Monkeypox"],
            f"names files whose extension is not one of data.extensions (.jpg, .jpeg, .png, .bmp, .gif, .tif, "
            f".tiff, .webp): line {n} 'Monkeypox/notes.txt'; add the extension to data.extensions, or leave them "
            "out.",
        ),
        "long label": (
            [*rows[:-1], f"{rows[-1].split(',')[0]},{'x' * 256}"],
            f"gives class names longer than 255 characters: line {n - 1} {rows[-1].split(',')[0]!r}; shorten them.",
        ),
        "quote left open": (
            [*rows[:-1], f'{rows[-1].split(",")[0]},"Others', "Others/x.png,Others"],
            "gives class names holding a line break or another control character (a quote left open?): line "
            f"{n - 1} {rows[-1].split(',')[0]!r}; fix the quoting.",
        ),
        "no rows": ([], "lists no images; give one row per image, its path relative to data.root."),
    }


def test_every_bad_labels_csv_is_one_sentence_naming_its_line(tree, tmp_path):
    cases = _bad_cases(tree, tmp_path)
    for name, (rows, message) in cases.items():
        path = _csv(tmp_path / f"{name.replace(' ', '_')}.csv", rows)
        with pytest.raises(UserError) as info:
            _dm(tree, tmp_path, source="csv", labels=str(path)).setup()
        assert str(info.value) == f"data.labels={path} {message}", name


def test_unreadable_bytes_and_sizes_are_refused_before_any_image_is_read(tree, tmp_path):
    rows = "\n".join(["path,label", *_rows(tree)]).encode()
    latin = tmp_path / "latin1.csv"
    latin.write_bytes(rows + b"\nOthers/caf\xe9.png,Others\n")
    nul = tmp_path / "nul.csv"
    nul.write_bytes(rows + b"\nOthers/a\x00.png,Others\n")
    wide = tmp_path / "wide.csv"
    wide.write_bytes(rows + b"\nOthers/" + b"x" * 200_000 + b".png,Others\n")
    huge = tmp_path / "huge.csv"
    with open(huge, "wb") as f:
        f.truncate((64 << 20) + 1)  # sparse: nothing is written, and nothing may be read
    line = len(_rows(tree)) + 2
    expected = {
        latin: f"line {line} holds a byte that is not UTF-8 (0xe9); save the file as UTF-8 text, giving a CSV of "
        "path,label rows (paths relative to data.root, like images/ISIC_0024306.jpg,nv).",
        nul: f"names paths that are not inside data.root (empty, absolute, with '..' or a NUL byte): line {line} "
        "'Others/a\\x00.png'; paths are relative to data.root.",
        wide: f"line {line} cannot be read as CSV (field larger than field limit (131072)); give a CSV of path,label",
        huge: "is larger than 64 MiB, too big to be a CSV of path,label rows",
        tmp_path / "absent.csv": "does not exist or is not a file; give a CSV of path,label rows",
    }
    for path, message in expected.items():
        with pytest.raises(UserError) as info:
            _dm(tree, tmp_path, source="csv", labels=str(path)).setup()
        assert str(info.value).startswith(f"data.labels={path} {message}"), str(info.value)


def test_a_listed_class_whose_images_are_all_unreadable_stops_the_run(tree, tmp_path):
    good = _rows(tree)
    broken = sorted(write_bad_files(tree / "Broken"))  # 5 files with image extensions, none readable
    rows = [*good, *(f"Broken/{name},Broken" for name in broken)]
    path = _csv(tmp_path / "l.csv", rows)
    with pytest.raises(UserError) as info:
        _dm(tree, tmp_path, source="csv", labels=str(path), output_dir=str(tmp_path / "run")).setup()
    assert str(info.value) == (
        f"class 'Broken' (data.labels={path}, line {sum(CLASSES.values()) + 2}) has no readable image (its 5 "
        "files cannot be read); fix them, or leave the class out."
    )
    assert len((tmp_path / "run" / "bad_files.txt").read_text().splitlines()) == 5  # listed first
    # The folders source leaves such a folder out with a warning, as before.
    folders = _dm(tree, tmp_path)
    folders.setup()
    assert folders.class_names == ["Monkeypox", "Others"] and len(folders.bad_files) == 5


def test_data_source_and_labels_are_checked_before_any_work(tree, tmp_path):
    with pytest.raises(UserError) as info:
        _dm(tree, tmp_path, source="csv")
    assert str(info.value).startswith(
        "data.source=csv reads its images and classes from data.labels, which is not"
    )
    with pytest.raises(UserError) as info:
        _dm(tree, tmp_path, labels="l.csv")
    assert str(info.value) == (
        "data.labels=l.csv is not read by data.source=folders (its classes are its sub-folders); set "
        "data.labels=null, or choose a source that reads it (data=csv)."
    )
    nope = "data.source='nope' is not allowed; choose one of: csv, folders."
    with pytest.raises(UserError) as info:
        _dm(tree, tmp_path, source="nope")
    assert str(info.value) == nope
    for overrides, message in (
        (["data=csv"], "data.source=csv reads its images and classes from data.labels, which is not set; "),
        (["data.source=nope"], nope),
    ):
        with pytest.raises(UserError) as info:  # config.validate: before the run directory is made
            validate(compose_cfg(tmp_path, overrides))
        assert str(info.value).startswith(message), str(info.value)


@pytest.mark.slow
def test_each_sources_yaml_chooses_it_and_sets_only_data_keys(tmp_path):
    # That every key has a comment: tests/test_config_docs.py, for all of conf/.
    keys = set(OmegaConf.structured(DataConfig))
    for source in sources.registry().values():
        cfg = compose_cfg(tmp_path, [f"data={source.config}"])
        assert cfg.data.source == source.name
    for path in sorted((CONF / "data").glob("*.yaml")):
        for line in path.read_text().splitlines():
            key = re.match(r"^(\w+):", line)
            if key and key.group(1) != "defaults":
                assert key.group(1) in keys, f"{path.name}: {key.group(1)}"


# ---- a csv run end to end -----------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_csv_run_trains_evaluates_and_resumes_only_on_its_labels(tree, tmp_path, monkeypatch, capsys):
    from densenet_se.resume import prepare_resume, resumed_config
    from densenet_se.train import build_datamodule, run

    labels = _csv(tmp_path / "labels.csv", _rows(tree))
    overrides = [*TINY, "data=csv", f"data.root={tree}", f"data.labels={labels}", "data.test_fraction=0.2"]
    cfg = compose_cfg(tmp_path, [*overrides, "print_config=false"])
    assert run(cfg) is not None
    run_dir = tmp_path / "run"
    saved = json.loads((run_dir / "split.json").read_text())
    assert saved["source"] == "csv" and saved["class_names"] == ["Monkeypox", "Others"]
    folders = _dm(tree, tmp_path, test_fraction=0.2)
    folders.setup()
    assert {k: saved[k] for k in ("train", "val", "test")} == {
        k: folders.split[k] for k in ("train", "val", "test")
    }
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["hparams"]["data"]["source"] == "csv" and metrics["hparams"]["data"]["labels"] == str(
        labels
    )
    # eval.py reads split.json: no source needed.
    (run_dir / ".hydra").mkdir()
    OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml")
    ckpt = run_dir / "checkpoints" / "best.ckpt"
    status = run_cli(
        "eval", [f"ckpt_path={ckpt}", "split=test", f"hydra.run.dir={tmp_path / 'eval'}"], monkeypatch
    )
    assert status == 0, capsys.readouterr().err
    assert json.loads((tmp_path / "eval" / "eval.json").read_text())["n"] == len(saved["test"])

    # Resume: the labels file may move (same rows, another order); data.source may not change.
    def with_labels(path: Path) -> list[str]:
        return [*(o for o in overrides if not o.startswith("data.labels=")), f"data.labels={path}"]

    moved = _csv(tmp_path / "moved.csv", sorted(_rows(tree)))
    composed = compose_cfg(tmp_path / "c", [*with_labels(moved), f"resume={run_dir}"])
    resumed = resumed_config(composed, run_dir, [f"data.labels={moved}"])
    assert resumed.data.labels == str(moved) and resumed.data.source == "csv"
    with pytest.raises(UserError, match=r"^data.source cannot change when resuming"):
        resumed_config(composed, run_dir, ["data.source=folders"])
    session = prepare_resume(composed)
    same = build_datamodule(resumed, None)
    same.setup()
    session.check_split(same)  # the same files under the same labels
    # The same files with the labels of two swapped: refused, naming them.
    names = saved["class_names"]
    label_of = {p: names[label] for k in ("train", "val", "test") for p, label in saved[k]}
    a = saved["train"][0][0]
    b = next(p for p in sorted(label_of) if label_of[p] != label_of[a])
    swapped = {**label_of, a: label_of[b], b: label_of[a]}
    edited = _csv(tmp_path / "edited.csv", [f"{p},{c}" for p, c in swapped.items()])
    relabelled = build_datamodule(compose_cfg(tmp_path / "e", with_labels(edited)), None)
    relabelled.setup()
    with pytest.raises(UserError) as info:
        session.check_split(relabelled)
    first, second = sorted((a, b))
    assert str(info.value) == (
        f"data.labels={edited} gives 2 of this run's images another class than it started with ({first} "
        f"{label_of[first]!r} now {swapped[first]!r}, {second} {label_of[second]!r} now {swapped[second]!r}; see "
        f"{run_dir / 'split.json'}); restore the labels, or start a new run instead of resume=."
    )


@pytest.mark.slow
@pytest.mark.subprocess
def test_a_bad_labels_csv_is_one_line_and_exit_2_from_train_py(tree, tmp_path):
    labels = _csv(tmp_path / "labels.csv", [*_rows(tree), "Others/gone.png,Others"])
    proc = run_train(
        [*TINY, "data=csv", f"data.root={tree}", f"data.labels={labels}", f"hydra.run.dir={tmp_path}/run"],
        cwd=tmp_path,
    )
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert lines == [
        f"error: data.labels={labels} names files that do not exist under data.root={tree}: line "
        f"{sum(CLASSES.values()) + 2} 'Others/gone.png'; paths are relative to data.root; fix "
        "them, or leave the rows out."
    ], proc.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


# ---- a third source: one file plus one YAML ------------------------------------------------------------------
@pytest.fixture
def textfile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The documented textfile source installed: its file in the sources package, its YAML in a copy of conf/."""
    yield from installed_example(tmp_path, monkeypatch, sources, "textfile", "data/textfile")


@pytest.mark.slow
def test_a_third_source_takes_one_file_and_one_yaml(textfile, tree, tmp_path):
    from densenet_se.train import run

    assert list(sources.registry()) == ["csv", "folders", "textfile"]
    listed = sorted(p.relative_to(tree).as_posix() for p in tree.rglob("*.png"))[2:]  # all but two images
    text = "# the training list\n" + "\n".join(listed) + "\n\nstray.png\n"
    (tmp_path / "list.txt").write_text(text)
    overrides = [*TINY, "data=textfile", f"data.root={tree}", f"data.labels={tmp_path / 'list.txt'}"]
    with pytest.raises(UserError, match=r"choose one of: csv, folders, textfile\.$"):
        validate(compose_train_config([*overrides, "data.source=nope"], tmp_path / "bad", textfile))
    cfg = compose_train_config([*overrides, "trainer.max_epochs=1", "print_config=false"], tmp_path, textfile)
    validate(cfg)
    with pytest.raises(UserError) as info:  # a file outside any folder has no class
        run(cfg)
    assert str(info.value) == (
        f"data.labels={tmp_path / 'list.txt'} gives images no class: line {len(listed) + 3} 'stray.png'; give "
        "each image its class."
    )
    (tmp_path / "list.txt").write_text(text.replace("stray.png\n", ""))
    run(cfg)
    saved = json.loads((tmp_path / "run" / "split.json").read_text())
    assert saved["source"] == "textfile" and saved["class_names"] == ["Monkeypox", "Others"]
    assert sorted(p for k in ("train", "val", "test") for p, _ in saved[k]) == listed
    assert all(p.startswith(saved["class_names"][label]) for p, label in saved["train"] + saved["val"])
    assert (tmp_path / "run" / "checkpoints" / "best.ckpt").is_file()
