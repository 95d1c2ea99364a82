"""Checkpoints written in a background thread: a point-in-time copy, whole files only, failures raised."""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch

from densenet_se import safety
from densenet_se.errors import UserError
from densenet_se.safety import BackgroundCheckpointIO


@pytest.fixture
def gate(monkeypatch) -> threading.Event:
    """Background writes wait for this event before writing, so the test controls when they happen."""
    event = threading.Event()
    real_save = safety.atomic_torch_save

    def gated_save(obj, path):
        assert event.wait(10), "the test never let the write go"
        return real_save(obj, path)

    monkeypatch.setattr(safety, "atomic_torch_save", gated_save)
    return event


def test_a_file_holds_the_weights_of_the_moment_it_was_asked_for(tmp_path, gate):
    io = BackgroundCheckpointIO()
    weights = torch.zeros(4)
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": weights}, "epoch": 0}, path)
    weights.add_(1.0)  # the next training step, while the write is still queued
    assert not path.exists()  # the training thread did not wait for the write
    gate.set()
    io.wait()
    assert torch.equal(torch.load(path, weights_only=True)["state_dict"]["w"], torch.zeros(4))
    io.teardown()


def test_removals_and_loads_wait_for_the_writes_queued_before_them(tmp_path, gate):
    io = BackgroundCheckpointIO()
    # The file itself, not its checks as a densenet-se checkpoint (densenet_se.checkpoint has those tests).
    io.checkpoint_io.load_checkpoint = lambda path, **kwargs: torch.load(path, weights_only=True)
    old, new = tmp_path / "epoch=0.ckpt", tmp_path / "epoch=1.ckpt"
    io.save_checkpoint({"epoch": 0}, old)
    io.save_checkpoint({"epoch": 1}, new)
    io.remove_checkpoint(old)  # ModelCheckpoint replacing its top-1 file
    gate.set()
    assert io.load_checkpoint(new)["epoch"] == 1  # waits for the queued write first
    io.teardown()
    # Removed after its own write, not before it (then the write would have brought it back).
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch=1.ckpt"]


def _dies_halfway(obj, f, *args, **kwargs):
    f.write(b"PK\x03\x04 the first bytes of a zip")
    raise OSError(28, "No space left on device")


def test_a_failed_background_write_is_raised_and_keeps_the_previous_file(tmp_path, monkeypatch):
    io = BackgroundCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"epoch": 0, "w": torch.ones(2)}, path)
    io.wait()
    monkeypatch.setattr(torch, "save", _dies_halfway)
    io.save_checkpoint({"epoch": 1, "w": torch.zeros(2)}, path)  # fails in the background
    deadline = time.monotonic() + 10
    while io._failure is None and time.monotonic() < deadline:  # the failure is recorded, not yet raised
        time.sleep(0.01)
    message = (
        r"could not write .*last\.ckpt: no space is left on its disk .*; the checkpoint keeps its previous"
    )
    with pytest.raises(UserError, match=message):
        io.save_checkpoint({"epoch": 2, "w": torch.zeros(2)}, path)  # raised before epoch 2 is queued
    io.wait()  # raised once, then cleared: epoch 2 was never queued, so nothing else failed
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["epoch"] == 0
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temp file left behind

    monkeypatch.setattr(torch, "save", _dies_halfway)
    io.save_checkpoint({"epoch": 3}, path)
    with pytest.raises(UserError, match=message):  # the end of training raises it too
        io.teardown()
    io.teardown()  # a second teardown (Lightning's error path) does not raise it again


def test_a_failure_at_teardown_does_not_hide_the_error_that_stopped_training(tmp_path, monkeypatch, caplog):
    io = BackgroundCheckpointIO()
    monkeypatch.setattr(torch, "save", _dies_halfway)
    io.save_checkpoint({"epoch": 0}, tmp_path / "last.ckpt")
    with pytest.raises(KeyError, match="the original error"):
        try:
            raise KeyError("the original error")
        except KeyError:
            io.teardown()  # Lightning tears down inside its exception handler
            raise
    assert "could not write checkpoint" in caplog.text and "No space left" in caplog.text


def _write_then_hang(path: str, marker: str) -> None:
    """Child process: one complete checkpoint, then a second one that stops halfway and waits to be killed."""
    io = BackgroundCheckpointIO()
    io.save_checkpoint({"epoch": 0, "w": torch.arange(1000.0)}, path)
    io.wait()
    real_save = torch.save

    def hangs_halfway(obj, f, *args, **kwargs):
        real_save(obj, f)
        f.truncate(f.tell() // 2)  # half of the new file's bytes are on disk ...
        f.flush()
        Path(marker).write_text(str(os.getpid()))
        time.sleep(60)  # ... when the process is killed

    torch.save = hangs_halfway
    io.save_checkpoint({"epoch": 1, "w": torch.zeros(1000)}, path)
    time.sleep(60)


def test_a_kill_during_a_background_write_leaves_the_previous_file_whole(tmp_path):
    path, marker = tmp_path / "checkpoints" / "last.ckpt", tmp_path / "writing"
    child = multiprocessing.get_context("fork").Process(
        target=_write_then_hang, args=(str(path), str(marker))
    )
    child.start()
    try:
        deadline = time.monotonic() + 60
        while not marker.exists() and child.is_alive() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert marker.exists(), "the child never reached the half-written file"
        os.kill(child.pid, signal.SIGKILL)
        child.join(10)
    finally:
        if child.is_alive():
            child.kill()
    assert child.exitcode == -signal.SIGKILL
    loaded = torch.load(path, weights_only=True)  # whole: the previous checkpoint, every byte of it
    assert loaded["epoch"] == 0 and torch.equal(loaded["w"], torch.arange(1000.0))
    leftovers = [p for p in path.parent.iterdir() if p != path]
    assert len(leftovers) == 1 and leftovers[0].name.startswith(".last.ckpt.")  # the half file kept its
    assert leftovers[0].stat().st_size > 0  # temp name, so nothing ever reads it as a checkpoint


def test_then_runs_after_the_queued_writes_and_not_after_a_failed_one(tmp_path, gate, monkeypatch):
    io = BackgroundCheckpointIO()
    path = tmp_path / "last.ckpt"
    seen = []
    io.save_checkpoint({"epoch": 0}, path)
    io.then(lambda: seen.append(torch.load(path, weights_only=True)["epoch"]))  # e.g. metrics.json
    assert seen == []  # the write is still held back; nothing waited for it
    gate.set()
    io.wait()
    assert seen == [0]  # it ran once the file was whole on disk

    monkeypatch.setattr(torch, "save", _dies_halfway)
    io.save_checkpoint({"epoch": 1}, path)
    io.then(lambda: seen.append("must not run"))
    with pytest.raises(UserError, match=r"could not write .*last\.ckpt"):
        io.wait()
    assert seen == [0]  # never ahead of a checkpoint that failed
    io.teardown()


def test_after_checkpoints_runs_at_once_with_a_synchronous_writer(tmp_path, gate):
    from types import SimpleNamespace

    from densenet_se.safety import AtomicCheckpointIO, after_checkpoints

    seen = []
    after_checkpoints(
        SimpleNamespace(strategy=SimpleNamespace(checkpoint_io=AtomicCheckpointIO())), lambda: seen.append(1)
    )
    assert seen == [1]
    background = BackgroundCheckpointIO()
    background.save_checkpoint({"epoch": 0}, tmp_path / "last.ckpt")
    after_checkpoints(
        SimpleNamespace(strategy=SimpleNamespace(checkpoint_io=background)), lambda: seen.append(2)
    )
    assert seen == [1]  # queued behind the held-back write
    gate.set()
    background.teardown()
    assert seen == [1, 2]
