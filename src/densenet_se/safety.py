"""Crash-safe checkpoint files written off the training thread and loaded with weights_only=True, and a stop at
the first non-finite training loss."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.plugins.io import AsyncCheckpointIO
from lightning_utilities.core.apply_func import apply_to_collection

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
        _refuse_storage_options(self, storage_options)
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


class BackgroundCheckpointIO(AsyncCheckpointIO):
    """AtomicCheckpointIO run in one background thread, so the step loop never waits for the disk.

    The checkpoint's tensors are copied on the calling thread first, so a file holds the weights of the moment
    it was asked for, not of some later step. One thread runs the writes and removals in the order they were
    asked for, and loading waits for them. A write that failed (disk full, permissions) is raised as a
    UserError at the next save, load or `wait()`, or when training ends: the failed file keeps its previous
    contents, as AtomicCheckpointIO guarantees.
    """

    def __init__(self, checkpoint_io: TorchCheckpointIO | None = None) -> None:
        super().__init__(checkpoint_io or AtomicCheckpointIO())
        self._failure: tuple[str, str, BaseException] | None = None  # (verb, path, error)

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None
    ) -> None:
        _refuse_storage_options(self, storage_options)
        self._raise_failure()  # stop before queueing anything newer than a file that could not be written
        snapshot = apply_to_collection(checkpoint, torch.Tensor, lambda t: t.detach().clone())
        self._submit("write", str(path), self.checkpoint_io.save_checkpoint, snapshot, path, storage_options)

    def remove_checkpoint(self, path: str | Path) -> None:
        # Queued behind the writes: removing a file whose write is still pending would let the write recreate it.
        self._submit("remove", str(path), self.checkpoint_io.remove_checkpoint, path)

    def load_checkpoint(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        self.wait()
        return self.checkpoint_io.load_checkpoint(*args, **kwargs)

    def wait(self) -> None:
        """Block until every queued write and removal is done; raise a failed one as a UserError."""
        if self._executor is not None:
            self._executor.submit(lambda: None).result()  # one worker, so everything queued before is done
        self._raise_failure()

    def then(self, fn: Callable[[], Any]) -> None:
        """Run `fn` in the writer thread once every write queued so far is on disk; not at all if one failed
        (that failure is raised as usual). For files that must never get ahead of the checkpoints."""

        def after() -> None:
            if self._failure is None:
                fn()

        self._submit("write", "(after the checkpoints)", after)

    def teardown(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        if sys.exc_info()[1] is not None and self._failure is not None:
            # Training is already stopping with an error; that one is the story, this one is a footnote.
            verb, path, error = self._failure
            self._failure = None
            log.error("could not %s checkpoint %s: %s", verb, path, error)
        self._raise_failure()

    def _submit(self, verb: str, path: str, fn: Callable[..., Any], *args: Any) -> None:
        self._ensure_setup()

        def run() -> None:
            try:
                fn(*args)
            except BaseException as error:  # kept for the training thread, which raises it
                if self._failure is None:
                    self._failure = (verb, path, error)

        assert self._executor is not None
        self._executor.submit(run)

    def _raise_failure(self) -> None:
        if self._failure is None:
            return
        (verb, path, error), self._failure = self._failure, None
        if isinstance(
            error, UserError
        ):  # a refused write (StorageError): it names the file and the fix already
            raise UserError(
                f"{str(error).rstrip('.')}; the checkpoint keeps its previous contents (if any), so continue with "
                "resume=RUN_DIR once that is fixed."
            ) from error
        if isinstance(error, OSError):
            raise UserError(
                f"could not {verb} checkpoint {path}: {error.strerror or error}; the file keeps its previous "
                "contents (if any): free disk space or fix the folder's permissions, then continue with "
                "resume=RUN_DIR."
            ) from error
        raise error


def after_checkpoints(trainer: L.Trainer, fn: Callable[[], Any]) -> None:
    """Run `fn` once the checkpoints the trainer has written so far are on disk: at once with a synchronous
    CheckpointIO, in the writer thread after them with BackgroundCheckpointIO (training does not wait)."""
    io = trainer.strategy.checkpoint_io
    if isinstance(io, BackgroundCheckpointIO):
        io.then(fn)
    else:
        fn()


def _refuse_storage_options(io: Any, storage_options: Any) -> None:
    if storage_options is not None:
        raise TypeError(f"{type(io).__name__} does not take storage_options, got {storage_options!r}.")


def with_atomic_checkpoints(plugins: Any) -> list[Any]:
    """Trainer `plugins` plus BackgroundCheckpointIO (atomic writes off the training thread), unless a
    CheckpointIO is already given."""
    from lightning.fabric.plugins import CheckpointIO

    listed = [] if plugins is None else list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
    if any(isinstance(p, CheckpointIO) for p in listed):
        return listed
    return [*listed, BackgroundCheckpointIO()]


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
        # One flat copy and one check (a copy of the weights costs less than a kernel launch per tensor).
        if floats and not bool(
            torch.cat([t.detach().reshape(-1).float() for t in floats.values()]).isfinite().all()
        ):
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
