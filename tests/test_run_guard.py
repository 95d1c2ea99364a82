"""A run refused before it starts leaves nothing behind (not Hydra's .hydra/ and log file either), never removes
what was there before, and a run directory that cannot be written is one sentence with exit status 2."""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

import pytest

from densenet_se.errors import UserError
from densenet_se.run_guard import check_not_a_run
from helpers.config import TINY
from helpers.crafted import resumable_run
from helpers.images import make_image_folder
from helpers.runs import run_cli


def _train(monkeypatch, capsys, *args: str) -> tuple[int, list[str]]:
    status = run_cli("train", [*TINY, *args], monkeypatch)
    return status, [line for line in capsys.readouterr().err.splitlines() if line.strip()]


@pytest.mark.slow
@pytest.mark.parametrize("refusal", ["config error", "missing data", "run dir inside the data"])
def test_a_run_refused_before_it_starts_creates_nothing(tmp_path, monkeypatch, capsys, refusal):
    images = make_image_folder(tmp_path / "images", {"a": 3, "b": 3}, size=32)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    run_dir, data = tmp_path / "outputs" / "day" / "run", f"data.root={images}"
    if refusal == "config error":
        args = [data, "data.image_size=16"]
    elif refusal == "missing data":  # refused by the data module, after the run lock was taken
        args = [f"data.root={tmp_path / 'nowhere'}"]
    else:
        run_dir = images / "runs" / "one"
        args = [data]
    status, lines = _train(monkeypatch, capsys, *args, f"hydra.run.dir={run_dir}")
    assert status == 2 and len(lines) == 1 and lines[0].startswith("error: "), lines
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_a_refused_run_keeps_what_was_in_its_directory(tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "mine"
    run_dir.mkdir()
    (run_dir / "notes.txt").write_text("my notes\n")
    (run_dir / "train.log").write_text("an earlier log\n")
    status, lines = _train(monkeypatch, capsys, "data.image_size=16", f"hydra.run.dir={run_dir}")
    assert status == 2 and "data.image_size=16 is out of range" in lines[-1]
    # Hydra's new .hydra/ goes; the files that were there stay (the log keeps its old lines and this error).
    assert sorted(p.name for p in run_dir.iterdir()) == ["notes.txt", "train.log"]
    assert (run_dir / "notes.txt").read_text() == "my notes\n"
    log_text = (run_dir / "train.log").read_text()
    assert log_text.startswith("an earlier log\n") and "data.image_size=16 is out of range" in log_text


@pytest.fixture
def read_only(tmp_path, monkeypatch):
    """A folder without write permission; as root (whom permission bits do not stop) os.access answers as
    they say, as it would for anyone else."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)
    if os.geteuid() == 0:
        real = os.access

        def access(path, mode, *args, **kwargs):
            if mode & os.W_OK and not os.stat(path).st_mode & stat.S_IWUSR:
                return False
            return real(path, mode, *args, **kwargs)

        monkeypatch.setattr(os, "access", access)
    yield folder
    folder.chmod(0o755)


@pytest.mark.slow
@pytest.mark.parametrize("where", ["the run directory", "its parent"])
def test_a_read_only_run_directory_is_one_sentence(read_only, monkeypatch, capsys, where):
    run_dir = read_only if where == "the run directory" else read_only / "new" / "run"
    # data.image_size=16 would be refused too: the place is checked first, before Hydra writes anything.
    status, lines = _train(monkeypatch, capsys, "data.image_size=16", f"hydra.run.dir={run_dir}")
    what = (
        f"the run directory {run_dir} is"
        if where == "the run directory"
        else (f"cannot create the run directory {run_dir}: {read_only} is")
    )
    assert status == 2
    assert lines == [
        f"error: {what} read-only for you; choose a writable place (hydra.run.dir=<a writable folder>) or fix "
        "its permissions."
    ]
    assert list(read_only.iterdir()) == []


def test_a_log_file_that_cannot_be_opened_is_one_sentence(tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "run"
    (run_dir / "train.log").mkdir(parents=True)  # Hydra's log handler cannot open a folder
    status, lines = _train(monkeypatch, capsys, f"hydra.run.dir={run_dir}")
    assert status == 2
    assert lines == [
        f"error: cannot open the log file {run_dir / 'train.log'} (Is a directory); choose a run directory where "
        f"it can be written (hydra.run.dir=<a writable folder>) or fix the permissions of {run_dir}."
    ]


def test_refused_runs_never_reach_outside_their_own_directories(tmp_path, monkeypatch, capsys):
    # A new run directory beside other runs: only the new one goes, its parent and siblings stay.
    parent = tmp_path / "outputs"
    (parent / "older-run").mkdir(parents=True)
    status, _ = _train(monkeypatch, capsys, "data.image_size=16", f"hydra.run.dir={parent / 'new'}")
    assert status == 2 and [p.name for p in parent.iterdir()] == ["older-run"]
    assert Path(parent / "older-run").is_dir()


@pytest.mark.slow
@pytest.mark.parametrize("tool", ["train", "eval", "predict", "export"])
def test_a_run_directory_that_holds_a_run_is_refused_before_its_record_is_overwritten(
    tmp_path, monkeypatch, capsys, tool
):
    run_dir = resumable_run(tmp_path)
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    before = {p: p.read_bytes() for p in [*(run_dir / ".hydra").iterdir(), ckpt]}
    names = sorted(p.relative_to(run_dir) for p in run_dir.rglob("*"))
    args = {
        "train": TINY,
        "eval": [f"ckpt_path={ckpt}"],
        "predict": [f"ckpt_path={ckpt}", f"input={tmp_path / 'images'}"],
    }
    args["export"] = [f"ckpt_path={ckpt}", "format=state_dict"]
    status = run_cli(tool, [*args[tool], f"hydra.run.dir={run_dir}"], monkeypatch)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert status == 2
    assert lines == [
        f"error: hydra.run.dir={run_dir} already holds a run ({run_dir / '.hydra' / 'config.yaml'} is there), "
        f"whose record this command would overwrite; continue that training with train.py resume={run_dir}, "
        "or choose another directory (or leave hydra.run.dir unset)."
    ]
    assert {p: p.read_bytes() for p in before} == before
    assert sorted(p.relative_to(run_dir) for p in run_dir.rglob("*")) == names


@pytest.mark.parametrize("marker", ["checkpoints", "metrics.json"])
def test_checkpoints_or_metrics_alone_mark_a_run_but_requeued_slurm_jobs_and_other_ranks_pass(
    tmp_path, monkeypatch, marker
):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    if marker == "checkpoints":
        (run_dir / marker).mkdir()
    else:
        (run_dir / marker).write_text("{}")
    with pytest.raises(UserError, match=re.escape(f"({run_dir / marker} is there)")):
        check_not_a_run(run_dir)
    check_not_a_run(tmp_path / "new")  # nothing there yet
    # The same command again in a requeued SLURM job's own directory continues it (Lightning's hpc checkpoint).
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    check_not_a_run(run_dir)
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
    with pytest.raises(UserError):
        check_not_a_run(run_dir)
    monkeypatch.setenv("LOCAL_RANK", "1")  # a DDP process joining its rank zero's directory
    check_not_a_run(run_dir)


@pytest.mark.parametrize("marker", ["multirun.yaml", "0_seed=1/.hydra/config.yaml"])
def test_a_sweep_directory_that_holds_a_sweep_is_refused_before_its_jobs_are_overwritten(
    tmp_path, monkeypatch, capsys, marker
):
    sweep = tmp_path / "sweep"
    (sweep / marker).parent.mkdir(parents=True, exist_ok=True)
    (sweep / marker).write_text("kept: true\n")
    before = sorted(p.relative_to(sweep) for p in sweep.rglob("*"))
    status = run_cli(
        "train", ["-m", "seed=1,2", f"hydra.sweep.dir={sweep}", "print_config=false"], monkeypatch
    )
    assert status == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: hydra.sweep.dir={sweep} already holds a sweep ({sweep / marker} is there), whose jobs this "
        "sweep would write over; choose another directory (or leave hydra.sweep.dir unset: each sweep gets its "
        "own)."
    )
    assert sorted(p.relative_to(sweep) for p in sweep.rglob("*")) == before
    assert (sweep / marker).read_text() == "kept: true\n"
