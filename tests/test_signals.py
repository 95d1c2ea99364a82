"""SIGTERM and SIGINT: real signals sent to real `python train.py` runs (mid-epoch, in the first epoch, in a
sweep) end with the signal's exit status (143, 130), one line with the command that continues the run, and a
usable last.ckpt once an epoch has finished; a sweep writes its summary with the job marked interrupted.
In-process: Lightning's own handling (SLURM's requeue signal included) stays in charge while it trains."""

from __future__ import annotations

import csv
import json
import os
import shlex
import signal
import stat
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from densenet_se.checkpoint import load_checkpoint
from densenet_se.interrupt import Interrupted, interrupted, signal_of, sigterm_raises
from densenet_se.train import run
from helpers.config import TINY, compose_cfg
from helpers.images import make_image_folder
from helpers.runs import signal_at_marker, train_process

CLASSES = {"Monkeypox": 24, "Others": 24}


def _wait_at(marker: Path, epoch: int) -> list[str]:
    """Overrides that hold the run at batch 1 of `epoch` (0-based) until a signal arrives."""
    return [
        "+callbacks.wait._target_=helpers.faultinject.WaitForSignal",
        f"+callbacks.wait.marker={marker}",
        f"+callbacks.wait.epoch={epoch}",
    ]


def _args(tmp_path: Path) -> list[str]:
    images = tmp_path / "images"
    if not images.exists():
        make_image_folder(images, CLASSES)
    return [*TINY, f"data.root={images}", f"paths.cache_dir={tmp_path / 'cache'}", "print_config=false"]


def _one_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-3000:]
    return lines[0]


@pytest.mark.slow
@pytest.mark.subprocess
@pytest.mark.parametrize(
    ("signum", "status"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"]
)
def test_a_signal_mid_epoch_exits_with_its_status_and_the_command_that_continues(tmp_path, signum, status):
    run_dir, marker = tmp_path / "run dir", tmp_path / "waiting"
    proc = train_process([*_args(tmp_path), f"hydra.run.dir='{run_dir}'", *_wait_at(marker, 1)], tmp_path)
    out, err = signal_at_marker(proc, marker, signum)
    assert marker.exists(), err[-3000:]
    assert proc.returncode == status, err[-3000:]
    last = run_dir / "checkpoints" / "last.ckpt"
    command = f"python train.py resume={shlex.quote(str(run_dir))}"
    name = signal.Signals(signum).name
    assert (
        _one_line(err) == f"interrupted by {name}: epoch 1 of 2 is saved in {last}; continue with: {command}"
    )
    assert load_checkpoint(last)["epoch"] == 0  # whole (never torn) and holding epoch 1
    assert [e["epoch"] for e in json.loads((run_dir / "metrics.json").read_text())["epochs"]] == [0]
    assert not list(run_dir.rglob("*.tmp"))
    assert f"interrupted by {name}" in (run_dir / "train.log").read_text()
    if signum != signal.SIGTERM:
        return
    # The printed command continues the run to its end (the test's own callback goes first: resume creates
    # only the callbacks our config groups define).
    saved = run_dir / ".hydra" / "config.yaml"
    config = OmegaConf.load(saved)
    del config.callbacks["wait"]
    OmegaConf.save(config, saved)
    resumed = train_process(shlex.split(command)[2:], tmp_path)
    out, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err[-3000:]
    assert [e["epoch"] for e in json.loads((run_dir / "metrics.json").read_text())["epochs"]] == [0, 1]
    assert load_checkpoint(last)["epoch"] == 1


@pytest.mark.slow
@pytest.mark.subprocess
def test_sigterm_in_the_first_epoch_exits_143_and_says_to_start_again(tmp_path):
    run_dir, marker = tmp_path / "run", tmp_path / "waiting"
    proc = train_process([*_args(tmp_path), f"hydra.run.dir={run_dir}", *_wait_at(marker, 0)], tmp_path)
    out, err = signal_at_marker(proc, marker, signal.SIGTERM)
    assert proc.returncode == 143, err[-3000:]
    assert _one_line(err) == (
        "interrupted by SIGTERM: no epoch had finished, so there is no checkpoint to continue from; "
        "start the run again"
    )
    assert not (run_dir / "checkpoints").exists() or not list((run_dir / "checkpoints").iterdir())


@pytest.mark.slow
@pytest.mark.subprocess
def test_sigterm_stops_a_sweep_with_its_summary_and_the_job_marked_interrupted(tmp_path):
    sweep_dir, marker = tmp_path / "sweep", tmp_path / "waiting"
    args = ["-m", *_args(tmp_path), f"hydra.sweep.dir={sweep_dir}", "seed=1,2", *_wait_at(marker, 1)]
    out, err = signal_at_marker(train_process(args, tmp_path), marker, signal.SIGTERM)
    (job_dir,) = [p for p in sweep_dir.iterdir() if p.is_dir() and not p.name.startswith(".")]
    summary = sweep_dir / "sweep_summary.md"
    line = _one_line(err)
    assert line.startswith("interrupted by SIGTERM: sweep job 0: epoch 1 of 2 is saved in ")
    assert line.endswith(
        f"continue with: python train.py resume={job_dir}; the jobs after it did not run; see {summary}"
    )
    with open(sweep_dir / "sweep_summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["job"], r["status"]) for r in rows] == [("0", "interrupted")]
    assert "Jobs: 1 (1 interrupted)" in summary.read_text()
    assert json.loads((job_dir / "job_status.json").read_text())["exit_code"] == 143
    assert load_checkpoint(job_dir / "checkpoints" / "last.ckpt")["epoch"] == 0


def test_an_epoch_stopped_after_its_checkpoint_is_listed_in_metrics_json(tmp_path):
    # SIGTERM lands in epoch 1's end hooks: Lightning still writes that epoch's last.ckpt, then stops before
    # epoch 2 starts (where the epoch would have entered metrics.json).
    cfg = compose_cfg(
        tmp_path,
        [
            *_args(tmp_path),
            "+callbacks.sig._target_=helpers.faultinject.SendSignals",
            f"+callbacks.sig.signals=[{int(signal.SIGTERM)}]",
        ],
    )
    with pytest.raises(Interrupted) as stopped:
        run(cfg)
    run_dir = tmp_path / "run"
    assert stopped.value.exit_code == 143
    assert stopped.value.hint.startswith(f"epoch 1 of 2 is saved in {run_dir / 'checkpoints' / 'last.ckpt'};")
    assert load_checkpoint(run_dir / "checkpoints" / "last.ckpt")["epoch"] == 0
    assert [e["epoch"] for e in json.loads((run_dir / "metrics.json").read_text())["epochs"]] == [0]


def test_signal_of_knows_each_way_a_run_stops_on_a_signal():
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    def exit_while_handling(error: BaseException) -> SystemExit:
        try:
            try:
                raise error
            except BaseException:
                raise SystemExit(1) from None  # Lightning's sys.exit(1) after a Ctrl+C keeps it as context
        except SystemExit as ex:
            return ex

    assert signal_of(SIGTERMException()) == signal.SIGTERM
    assert signal_of(KeyboardInterrupt()) == signal.SIGINT
    assert signal_of(exit_while_handling(KeyboardInterrupt())) == signal.SIGINT
    assert signal_of(Interrupted(signal.SIGTERM)) == signal.SIGTERM
    assert signal_of(exit_while_handling(ValueError("x"))) is None
    assert signal_of(SystemExit(2)) is None and signal_of(ValueError("x")) is None
    # A hint given where the run directory is known survives the way up.
    assert interrupted(Interrupted(signal.SIGINT, "kept"), "other").message() == "interrupted by SIGINT: kept"
    assert interrupted(SIGTERMException(), "kept").exit_code == 143


def test_sigterm_outside_lightning_raises_at_once_and_the_default_comes_back():
    with pytest.raises(Interrupted) as stopped, sigterm_raises():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # interrupted by the handler's exception; never waited out
    assert stopped.value.signum == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


@pytest.mark.slow
def test_lightning_and_slurm_requeue_stay_in_charge_while_training(tmp_path, monkeypatch):
    # SLURM's requeue signal makes Lightning save an hpc checkpoint and requeue the job (a fake scontrol records
    # it); the SIGTERM that follows ends training at the batch's end, and the run exits as SIGTERM (143).
    scontrol = tmp_path / "bin" / "scontrol"
    scontrol.parent.mkdir()
    scontrol.write_text(f'#!/bin/sh\necho "$@" > {tmp_path / "requeued"}\n')
    scontrol.chmod(scontrol.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{scontrol.parent}{os.pathsep}{os.environ['PATH']}")
    for key, value in {"SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "densenet-se", "SLURM_NTASKS": "1"}.items():
        monkeypatch.setenv(key, value)
    for key in ("SLURM_PROCID", "SLURM_LOCALID", "SLURM_NODEID"):
        monkeypatch.setenv(key, "0")

    requeue_then_term = f"[{int(signal.SIGUSR1)},{int(signal.SIGTERM)}]"
    cfg = compose_cfg(
        tmp_path,
        [
            *_args(tmp_path),
            "+callbacks.sig._target_=helpers.faultinject.SendSignals",
            f"+callbacks.sig.signals={requeue_then_term}",
            "+callbacks.sig.epoch=1",
            "+callbacks.sig.batch=0",
        ],
    )
    with pytest.raises(Interrupted) as stopped, sigterm_raises():
        run(cfg)
    assert stopped.value.exit_code == 143 and "resume=" in stopped.value.hint
    assert (tmp_path / "requeued").read_text().split() == ["requeue", "4242"]
    assert [p.name for p in (tmp_path / "run").glob("hpc_ckpt_*.ckpt")] == ["hpc_ckpt_1.ckpt"]
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    # The requeued job runs the same command in the same run directory: Lightning continues from the hpc
    # checkpoint (epoch 2, after its first batch) to the end.
    cfg = compose_cfg(tmp_path, _args(tmp_path))
    run(cfg)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert [e["epoch"] for e in metrics["epochs"]] == [0, 1]
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")["epoch"] == 1
