"""Test-only Lightning callbacks that hold a run at a known point (for SIGKILL, SIGTERM, SIGINT) or break it there.

Used through the config (`+callbacks.pause._target_=helpers.faultinject.PauseAtBatch`) with tests/ on PYTHONPATH.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import lightning as L


class PauseAtBatch(L.Callback):
    """Write `marker` and sleep at (epoch, batch) so a test can kill the run there; a run that finds the
    marker already written carries on."""

    def __init__(self, marker: str, epoch: int = 1, batch: int = 1, seconds: float = 600.0) -> None:
        self.marker, self.epoch, self.batch, self.seconds = Path(marker), epoch, batch, seconds

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int
    ) -> None:
        if trainer.current_epoch == self.epoch and batch_idx == self.batch and not self.marker.exists():
            self.marker.write_text(str(os.getpid()))
            time.sleep(self.seconds)


class WaitForSignal(L.Callback):
    """Write `marker` (holding the pid) at (epoch, batch), then wait there until a signal arrives, so a test
    can send SIGTERM or SIGINT at a known point: SIGINT raises in the wait, SIGTERM ends it (Lightning stops
    at the end of that batch). `seconds` bounds the wait, should the signal never come."""

    def __init__(self, marker: str, epoch: int = 1, batch: int = 1, seconds: float = 120.0) -> None:
        self.marker, self.epoch, self.batch, self.seconds = Path(marker), epoch, batch, seconds

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int
    ) -> None:
        if trainer.current_epoch != self.epoch or batch_idx != self.batch or self.marker.exists():
            return
        self.marker.write_text(str(os.getpid()))
        deadline = time.monotonic() + self.seconds
        while not trainer.received_sigterm and time.monotonic() < deadline:
            time.sleep(0.02)


class SendSignals(L.Callback):
    """Send `signals` (numbers), in order, to this very process at the end of batch `batch` of training epoch
    `epoch`, or at the epoch's end with batch=None: after the run report took the epoch's row, before Lightning
    writes its last.ckpt (checkpoint callbacks run last)."""

    def __init__(self, signals: list[int], epoch: int = 0, batch: int | None = None) -> None:
        self.signals, self.epoch, self.batch = [int(s) for s in signals], epoch, batch

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx
    ) -> None:
        if self.batch is not None and (trainer.current_epoch, batch_idx) == (self.epoch, self.batch):
            self._send()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.batch is None and trainer.current_epoch == self.epoch:
            self._send()

    def _send(self) -> None:
        for signum in self.signals:
            os.kill(os.getpid(), signum)
