"""A split.json may come from someone else: it never makes eval read outside data.root, and a broken one is one
sentence naming the file (eval and resume alike); resume refuses a run whose split.json is gone."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

import densenet_se.data.split as split_module
from densenet_se.data.split import read_split_file
from densenet_se.errors import UserError
from densenet_se.resume import ResumeSession
from helpers.crafted import checkpoint_run
from helpers.runs import run_cli

CLASSES = {"a": 2, "b": 2, "c": 2}


@pytest.fixture
def made(tmp_path: Path) -> dict[str, Path]:
    return checkpoint_run(tmp_path, CLASSES)


def _with_val(made: dict[str, Path], entries: list) -> None:
    split = json.loads(made["split"].read_text())
    made["split"].write_text(json.dumps({**split, "val": entries}))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["dotdot", "absolute", "empty"])
def test_eval_never_reads_outside_the_data_root(made, tmp_path, monkeypatch, capsys, kind):
    secret = tmp_path / "secret" / "x.png"
    secret.parent.mkdir()
    secret.write_bytes((made["images"] / "a" / "a_000.png").read_bytes())
    rel = {"dotdot": "../secret/x.png", "absolute": str(secret), "empty": ""}[kind]
    _with_val(made, [["a/a_000.png", 0], [rel, 1]])
    status = run_cli("eval", [f"ckpt_path={made['ckpt']}", f"hydra.run.dir={tmp_path / 'out'}"], monkeypatch)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert status == 2 and len(lines) == 1, lines
    assert lines[0] == (
        f"error: split file {made['split']} lists {rel!r} in val, which is not a path inside the data folder "
        "(it is empty, absolute or goes up with '..'); give the split.json that train.py wrote in the run's "
        "directory."
    )
    assert not (tmp_path / "out" / "eval.json").exists()


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("[1, 2]", "holds a JSON list, not the object train.py writes"),
        (
            "{not json",
            "is not valid JSON (Expecting property name enclosed in double quotes: line 1 column 2",
        ),
        (
            json.dumps({"val": [["a/a_000.png"]]}),
            "has a val entry ['a/a_000.png'] that is not a [relative path",
        ),
        (json.dumps({"val": [["a/a_000.png", "0"]]}), "has a val entry ['a/a_000.png', '0'] that is not"),
        (
            json.dumps({"class_names": ["a"], "val": [["a/a_000.png", 3]]}),
            "has a val entry ['a/a_000.png', 3]",
        ),
        (json.dumps({"val": {"a/a_000.png": 0}}), "has a 'val' that is not a list"),
        (json.dumps({"class_names": "abc"}), "has class_names that are not a list of names"),
    ],
)
def test_a_broken_split_file_is_one_sentence_naming_it(tmp_path, content, expected):
    path = tmp_path / "split.json"
    path.write_text(content)
    with pytest.raises(UserError) as info:
        read_split_file(path)
    message = str(info.value)
    assert message.startswith(f"split file {path} ") and expected in message, message
    assert "\n" not in message and message.endswith(".")


def test_eval_refuses_a_split_json_over_the_size_limit_before_reading_it(made, tmp_path, monkeypatch, capsys):
    # A real split.json of 1.6 MB against a 1 MiB limit (the real one, 1 GiB, is too big to write in a test).
    monkeypatch.setattr(split_module, "MAX_SPLIT_BYTES", 1 << 20)
    _with_val(made, [["a/a_000.png", 0]] * 80_000)
    assert made["split"].stat().st_size > 1 << 20
    status = run_cli("eval", [f"ckpt_path={made['ckpt']}", f"hydra.run.dir={tmp_path / 'out'}"], monkeypatch)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert status == 2 and lines == [
        f"error: split file {made['split']} is larger than 1 MiB, too big to be the split.json that train.py "
        "wrote in the run's directory."
    ], lines
    assert not (tmp_path / "out" / "eval.json").exists()


def test_eval_and_resume_report_a_split_json_holding_a_list(made, tmp_path, monkeypatch, capsys):
    made["split"].write_text("[]")
    status = run_cli("eval", [f"ckpt_path={made['ckpt']}", f"hydra.run.dir={tmp_path / 'out'}"], monkeypatch)
    err = capsys.readouterr().err
    assert status == 2 and f"error: split file {made['split']} holds a JSON list" in err, err
    session = ResumeSession(made["run"], made["ckpt"], cfg=None)
    with pytest.raises(UserError, match=f"^split file {made['split']} holds a JSON list"):
        session.check_split(SimpleNamespace(split={}, root=made["images"]))


def test_resume_refuses_a_run_whose_split_json_is_gone(made):
    made["split"].unlink()
    session = ResumeSession(made["run"], made["ckpt"], cfg=None)
    with pytest.raises(UserError) as info:
        session.check_split(SimpleNamespace(split={"train": [], "val": [], "test": []}, root=made["images"]))
    assert str(info.value) == (
        f"resume={made['run']}: {made['split']} is missing, so there is no record of which images this run "
        "trained and validated on; restore it from a copy of the run, or start a new run."
    )
