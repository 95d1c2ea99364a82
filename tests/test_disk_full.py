"""A full disk (or quota, or read-only file system) is one sentence naming the file, and metrics.json never
lists an epoch that last.ckpt does not hold."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
import torch

from densenet_se import io as io_lib
from densenet_se import safety
from densenet_se.checkpoint import load_checkpoint
from densenet_se.cli import describe, exit_status
from densenet_se.errors import UserError
from densenet_se.io import atomic_torch_save, atomic_write_bytes, atomic_write_text
from densenet_se.train import run
from helpers.config import TINY, compose_cfg
from helpers.images import make_image_folder

REFUSED = [errno.ENOSPC, errno.EDQUOT, errno.EROFS]


class FullFile:
    """A file object whose disk fills up after `room` bytes, the way write() then fails."""

    def __init__(self, f, code: int, room: int = 100) -> None:
        self.f, self.code, self.room = f, code, room

    def write(self, data) -> int:
        n = len(memoryview(data).cast("B"))
        if n > self.room:
            raise OSError(self.code, os.strerror(self.code))
        self.room -= n
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.f.close()


WRITERS = {
    "text": lambda p: atomic_write_text(p, "x" * 10_000),
    "bytes": lambda p: atomic_write_bytes(p, b"x" * 10_000),
    "torch": lambda p: atomic_torch_save({"w": torch.zeros(10_000)}, p),  # RuntimeError from torch's writer
}


@pytest.mark.parametrize("code", REFUSED)
@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_a_refused_write_names_the_file_and_keeps_the_old_one(tmp_path, monkeypatch, code, writer):
    path = tmp_path / "out" / "metrics.json"
    path.parent.mkdir()
    path.write_text("old")
    real_fdopen = os.fdopen
    monkeypatch.setattr(io_lib.os, "fdopen", lambda fd, *a, **k: FullFile(real_fdopen(fd, *a, **k), code))
    with pytest.raises(UserError) as err:
        WRITERS[writer](path)
    what, fix = io_lib.STORAGE_ERRNOS[code]
    assert str(err.value) == f"could not write {path}: {what} ({os.strerror(code)}); {fix}."
    # Still an OSError, so code that tolerates a failed write (the image cache) still does.
    assert isinstance(err.value, OSError) and err.value.errno == code
    assert path.read_text() == "old" and sorted(p.name for p in path.parent.iterdir()) == ["metrics.json"]


def test_a_full_disk_under_another_writer_is_one_sentence_naming_its_file():
    raw = OSError(errno.ENOSPC, "No space left on device", "/runs/x/tensorboard/events.out")
    wrapped = RuntimeError("writer thread failed")
    wrapped.__context__ = raw
    assert describe(wrapped) == (
        "could not write /runs/x/tensorboard/events.out: no space is left on its disk "
        "(No space left on device); free some space or write to another disk."
    )
    assert exit_status(wrapped) == 2


def _checkpointed_epochs(path: Path) -> list[int]:
    state = load_checkpoint(path)
    (report,) = [v for k, v in state["callbacks"].items() if k.startswith("RunReport")]
    return [row["epoch"] for row in report["epochs"]]


@pytest.mark.slow
@pytest.mark.parametrize("extra", [[], ["trainer.check_val_every_n_epoch=2"]])
def test_disk_full_while_writing_last_ckpt(tmp_path, monkeypatch, extra):
    images = make_image_folder(tmp_path / "images", {"Monkeypox": 16, "Others": 16})
    cfg = compose_cfg(
        tmp_path, [*TINY, "trainer.max_epochs=3", f"data.root={images}", "print_config=false", *extra]
    )
    real_save, real_fdopen = safety.atomic_torch_save, os.fdopen

    def full_at_third_epoch(checkpoint, path):  # the disk fills up while epoch 3's last.ckpt is written
        if Path(path).name == "last.ckpt" and checkpoint["epoch"] == 2:
            with monkeypatch.context() as disk:
                disk.setattr(io_lib.os, "fdopen", lambda fd, *a, **k: FullFile(real_fdopen(fd, *a, **k), 28))
                return real_save(checkpoint, path)
        return real_save(checkpoint, path)

    monkeypatch.setattr(safety, "atomic_torch_save", full_at_third_epoch)
    with pytest.raises(UserError, match=r"could not write .*last\.ckpt: no space is left on its disk"):
        run(cfg)
    run_dir = tmp_path / "run"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    last = run_dir / "checkpoints" / "last.ckpt"
    assert load_checkpoint(last)["epoch"] == 1
    assert [row["epoch"] for row in metrics["epochs"]] == _checkpointed_epochs(last) == [0, 1]
    assert metrics["total_seconds"] == pytest.approx(
        sum(row["seconds"] for row in metrics["epochs"]), abs=1e-3
    )
