"""Crash-safe checkpoint files loaded with weights_only=True, and a stop at the first non-finite training loss."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from densenet_se.checkpoint import load_checkpoint
from densenet_se.errors import UserError
from densenet_se.io import atomic_torch_save

log = logging.getLogger("densenet_se")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint I/O with two guarantees: a file appears whole or not at all, and loading never
    unpickles anything but tensors and plain values.

    Lightning's own writer serialises to memory and then streams into the final path, so a kill during the
    write leaves a truncated last.ckpt that blocks resume; here the bytes go to a temp file that is renamed.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take storage_options, got {storage_options!r}.")
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(
        self,
        path: str | Path,
        map_location: Callable | str | torch.device | None = None,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        # Always weights_only=True (densenet_se.checkpoint): an unsafe file is refused before any of it runs.
        # Tensors come back on the CPU; the strategy moves the restored state to the device.
        if weights_only is False:
            log.warning("ignoring weights_only=False: checkpoints are always loaded with weights_only=True")
        return load_checkpoint(path)


def with_atomic_checkpoints(plugins: Any) -> list[Any]:
    """Trainer `plugins` plus AtomicCheckpointIO, unless a CheckpointIO is already given."""
    from lightning.fabric.plugins import CheckpointIO

    listed = [] if plugins is None else list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
    if any(isinstance(p, CheckpointIO) for p in listed):
        return listed
    return [*listed, AtomicCheckpointIO()]


class NonFiniteLossGuard(L.Callback):
    """Stop training with a UserError naming the step and epoch of the first nan/inf training loss.

    No checkpoint is written once a loss went non-finite (or once weights hold nan/inf), so
    `checkpoints/last.ckpt` keeps the last good epoch. Losses are kept as 0-d tensors and read together
    every `check_every_n_steps` steps and before any checkpoint or validation: one host read per check.
    Default: every step on CPU (a read is free there), every 50 steps on an accelerator, where reading a
    device value each step would stall the queue; training may then run up to 49 steps past the bad one.
    """

    def __init__(self, check_every_n_steps: int | None = None) -> None:
        self.check_every_n_steps = None if check_every_n_steps is None else max(int(check_every_n_steps), 1)
        self._pending: list[tuple[torch.Tensor, int, int, int]] = []  # (loss, global step, epoch, batch)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if not isinstance(loss, torch.Tensor):
            return
        self._pending.append((loss.detach(), trainer.global_step, trainer.current_epoch, batch_idx))
        every = self.check_every_n_steps or (1 if loss.device.type == "cpu" else 50)
        if len(self._pending) >= every:
            self.check(trainer)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.check(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.check(trainer)

    def on_save_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # Raising here stops the save itself: a diverged model never replaces the last good checkpoint.
        self.check(trainer)
        state = checkpoint.get("state_dict", {})
        floats = {k: t for k, t in state.items() if torch.is_tensor(t) and t.is_floating_point()}
        if floats and not bool(torch.stack([torch.isfinite(t).all() for t in floats.values()]).all()):
            bad = next(k for k, t in floats.items() if not bool(torch.isfinite(t).all()))
            raise UserError(
                f"training stopped in epoch {trainer.current_epoch + 1}: the model weights became non-finite "
                f"(first: {bad}), so no checkpoint was written; {self._advice(trainer)}"
            )

    def check(self, trainer: L.Trainer) -> None:
        """Raise UserError if any loss seen since the last check is nan or inf (one host read)."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        finite = torch.stack([torch.isfinite(loss).all() for loss, *_ in pending])
        if bool(finite.all()):
            return
        first = int((~finite).nonzero()[0].item())
        loss, step, epoch, batch_idx = pending[first]
        value = float(loss.float().reshape(-1)[0]) if loss.numel() else float("nan")
        raise UserError(
            f"training stopped: the training loss became {value} at step {step} (epoch {epoch + 1}, batch "
            f"{batch_idx + 1}); {self._advice(trainer)}"
        )

    @staticmethod
    def _advice(trainer: L.Trainer) -> str:
        lr = None
        if trainer.optimizers:
            lr = trainer.optimizers[0].param_groups[0].get("lr")
        hint = f"lower optim.lr (now {lr:g})" if isinstance(lr, float) else "lower optim.lr"
        where = ""
        callback = trainer.checkpoint_callback
        if callback is not None and getattr(callback, "dirpath", None):
            where = f"; the checkpoints written before it are kept in {callback.dirpath}"
        return f"{hint} or set trainer.gradient_clip_val=1.0{where}."
