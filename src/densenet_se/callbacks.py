"""Training callbacks: the run report (metrics.json, curves.png, samples.png, confusion matrices, TensorBoard images
and HParams), per-epoch seeding (epoch N depends on (seed, N) only, so a resumed run repeats an uninterrupted one),
and the model summary of the network alone."""

from __future__ import annotations

import json
import logging
import math
import random
import time
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import ModelSummary
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.model_summary.model_summary import ModelSummary as LayerTable

from densenet_se import plots
from densenet_se.io import atomic_write_text
from densenet_se.metrics import BEST, BEST_KEY, MONITOR, best_sign, epoch_keys
from densenet_se.safety import after_checkpoints

log = logging.getLogger("densenet_se")

# metrics.json per epoch: `train_acc`, `train_loss`, `val_acc`, ... (densenet_se.metrics.METRICS)
EPOCH_KEYS = epoch_keys()


def _scalar(metrics: dict[str, Any], key: str) -> float | None:
    value = metrics.get(key)
    if value is None:
        return None
    value = float(value.item() if isinstance(value, torch.Tensor) else value)
    return value if math.isfinite(value) else None


def tensorboard_logger(trainer: L.Trainer) -> TensorBoardLogger | None:
    """The run's TensorBoard logger, if one is configured."""
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            return logger
    return None


def add_png(tb: TensorBoardLogger, tag: str, png: bytes, shape: tuple[int, ...], step: int) -> None:
    """Log PNG bytes of an RGB image (`shape`: H, W, 3) as a TensorBoard image, without encoding it again."""
    from tensorboard.compat.proto.summary_pb2 import Summary

    picture = Summary.Image(height=shape[0], width=shape[1], colorspace=3, encoded_image_string=png)
    tb.experiment._get_file_writer().add_summary(Summary(value=[Summary.Value(tag=tag, image=picture)]), step)


class RunReport(L.Callback):
    """Keeps the per-epoch history (saved in checkpoints, so resume continues it) and writes the run's reports.

    Only rank 0 writes files; every write is atomic, so a kill never leaves a half file. An epoch enters
    metrics.json only once the checkpoints it writes are on disk (at the next epoch's start or the end of
    training, as checkpoint callbacks save after this one), so metrics.json never lists an epoch that
    last.ckpt lacks, e.g. when the disk fills up while last.ckpt is written.
    """

    def __init__(
        self,
        run_dir: str | Path,
        hparams: dict[str, Any] | None = None,
        num_samples: int = 32,
        extra: dict[str, Any] | None = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.hparams = hparams or {}
        # Run facts that every metrics.json write carries (e.g. the split's leakage statement).
        self.extra = dict(extra or {})
        self.num_samples = num_samples
        self.epochs: list[dict[str, Any]] = []
        self.confmats: dict[int, list[list[int]]] = {}
        self.class_names: list[str] = []
        self.test: dict[str, Any] | None = None
        self.total_seconds = 0.0
        self._epoch_start: float | None = None
        self._validated_epoch: int | None = None
        self._saved_epoch = -1  # epochs up to this one are in metrics.json: their checkpoints are written
        self._queued_epoch = -1  # epochs up to this one are committed once the checkpoints queued so far are
        self._checkpointed_epoch = -1  # the last epoch in the newest checkpoint queued

    # Lightning stores this in every checkpoint (plain values only), so a resumed run keeps its history.
    def state_dict(self) -> dict[str, Any]:
        return {
            "epochs": self.epochs,
            "confmats": {str(k): v for k, v in self.confmats.items()},
            "total_seconds": self.total_seconds,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Lightning also restores callbacks when testing a checkpoint: an older checkpoint must not erase the
        # history this run already holds, so restore only into an empty report (i.e. when resuming).
        if self.epochs:
            return
        self.epochs = list(state_dict.get("epochs", []))
        restored = max((int(r["epoch"]) for r in self.epochs), default=-1)
        self._saved_epoch = self._queued_epoch = self._checkpointed_epoch = restored
        self.confmats = {int(k): v for k, v in state_dict.get("confmats", {}).items()}
        self.total_seconds = float(state_dict.get("total_seconds", 0.0))

    # ------------------------------------------------------------------------------------------------ hooks
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.class_names = list(pl_module.hparams.get("class_names", []))
        if not trainer.is_global_zero:
            return
        self._write_samples(trainer)
        self._write_hparams(trainer)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._commit(trainer)  # the previous epoch's checkpoints were written without error
        self._epoch_start = time.perf_counter()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._commit(trainer)

    def on_save_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        self._checkpointed_epoch = max((r["epoch"] for r in self.epochs), default=-1)

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        # Stopped (SIGTERM, Ctrl+C, an error) after an epoch's last.ckpt was queued but before the next epoch
        # committed it: list the epochs a checkpoint holds once it is on disk (teardown waits for the writer).
        self._commit(trainer, self._checkpointed_epoch)

    def _commit(self, trainer: L.Trainer, last: int | None = None) -> None:
        """List the finished epochs (up to `last`) in metrics.json: called once their checkpoints are saved."""
        if last is None:
            last = max((r["epoch"] for r in self.epochs), default=-1)
        if last <= self._queued_epoch:
            return
        self._queued_epoch = last

        def commit() -> None:
            self._saved_epoch = max(self._saved_epoch, last)
            if trainer.is_global_zero:
                self.write_metrics(trainer)

        # With checkpoints written in the background, only once the files queued before this point are on disk.
        after_checkpoints(trainer, commit)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # on_validation_end, not on_validation_epoch_end: callbacks' epoch-end hooks run before the module's,
        # which is where the epoch's confusion matrix is computed.
        if trainer.sanity_checking:
            return
        self._validated_epoch = trainer.current_epoch
        if not trainer.is_global_zero:
            return
        matrix = getattr(pl_module, "last_val_confmat", None)
        if matrix is None:
            return
        self.confmats[trainer.current_epoch] = matrix
        tb = tensorboard_logger(trainer)
        if tb is not None:  # a Pillow drawing of a few milliseconds, so every epoch gets one
            title = f"validation, epoch {trainer.current_epoch + 1}"
            image = plots.confusion_matrix_image(matrix, self.class_names, title)
            add_png(tb, "val/confusion_matrix", plots.png_bytes(image), image.shape, trainer.current_epoch)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        seconds = time.perf_counter() - (self._epoch_start or time.perf_counter())
        metrics = trainer.callback_metrics
        row: dict[str, Any] = {"epoch": trainer.current_epoch}
        for key in EPOCH_KEYS:
            row[key] = _scalar(metrics, key.replace("_", "/", 1))
        if self._validated_epoch != trainer.current_epoch:  # no validation this epoch
            row.update({key: None for key in EPOCH_KEYS if key.startswith("val_")})
        row["seconds"] = round(seconds, 3)
        self.epochs = [r for r in self.epochs if r["epoch"] != row["epoch"]] + [row]
        self.total_seconds += row["seconds"]  # the rounded epoch times, so the total is their sum
        if (
            trainer.is_global_zero
        ):  # metrics.json follows in _commit, once this epoch's checkpoints are written
            log.info(
                "epoch %d/%d  loss %s  acc %s  val_loss %s  val_acc %s  %.1fs",
                trainer.current_epoch + 1,
                trainer.max_epochs,
                _fmt(row["train_loss"]),
                _fmt(row["train_acc"]),
                _fmt(row["val_loss"]),
                _fmt(row["val_acc"]),
                seconds,
            )

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        self.write_metrics(trainer)
        if self.epochs:
            plots.save_png(plots.curves_image(self.epochs), self.run_dir / "curves.png")
        best = self.best()
        if best is not None and best["epoch"] in self.confmats:
            title = f"validation, best epoch {best['epoch'] + 1}"
            image = plots.confusion_matrix_image(self.confmats[best["epoch"]], self.class_names, title)
            plots.save_png(image, self.run_dir / "confusion_matrix.png")

    # ------------------------------------------------------------------------------------------------ reports
    def saved_epochs(self) -> list[dict[str, Any]]:
        """The rows of the epochs whose checkpoints are written: what metrics.json lists."""
        return [r for r in self.epochs if r["epoch"] <= self._saved_epoch]

    def best(self) -> dict[str, Any] | None:
        """The epoch with the best validation value of metrics.BEST (the first on ties, like ModelCheckpoint)."""
        key = f"val_{BEST}"
        scored = [r for r in self.saved_epochs() if r.get(key) is not None]
        if not scored:
            return None
        return max(scored, key=lambda r: (best_sign() * r[key], -r["epoch"]))

    def summary(self, trainer: L.Trainer | None = None) -> dict[str, Any]:
        best = self.best()
        best_path = None
        if trainer is not None and trainer.checkpoint_callback is not None:
            path = getattr(trainer.checkpoint_callback, "best_model_path", "")
            best_path = str(Path(path).resolve()) if path else None
        return {
            BEST_KEY: best[f"val_{BEST}"] if best else None,
            "best_epoch": best["epoch"] if best else None,
            "best_checkpoint": best_path,
            "class_names": self.class_names,
            "epochs": self.saved_epochs(),
            "total_seconds": round(sum(r["seconds"] for r in self.saved_epochs()), 3),
            "test": self.test,
            **({"hparams": self.hparams} if self.hparams else {}),
            **self.extra,
        }

    def write_metrics(self, trainer: L.Trainer | None = None) -> None:
        data = self.summary(trainer)
        atomic_write_text(self.run_dir / "metrics.json", json.dumps(data, indent=2) + "\n")

    def _write_samples(self, trainer: L.Trainer) -> None:
        datamodule = trainer.datamodule
        if datamodule is None:
            return
        try:
            images, labels = next(iter(datamodule.train_dataloader()))
        except StopIteration:
            return
        images = images[: self.num_samples]
        labels = labels[: self.num_samples]
        if images.dtype != torch.uint8:  # a data module that yields float tensors in [0, 1]
            images = (images.clamp(0, 1) * 255).to(torch.uint8)
        # Drawn and encoded once: the same PNG goes to samples.png and to TensorBoard.
        grid = plots.sample_grid(images.cpu().numpy(), labels.tolist(), self.class_names)
        png = plots.save_png(grid, self.run_dir / "samples.png")
        tb = tensorboard_logger(trainer)
        if tb is not None:
            add_png(tb, "samples", png, grid.shape, 0)

    def _write_hparams(self, trainer: L.Trainer) -> None:
        tb = tensorboard_logger(trainer)
        if tb is None or not self.hparams:
            return
        from torch.utils.tensorboard.summary import hparams as hparams_summary

        flat = {k: _hparam_value(v) for k, v in _flatten(self.hparams).items()}
        # Declare the metric without writing a placeholder value: the dashboard then shows the run's latest
        # `val/acc_best` scalar, never a stale -1.
        exp, ssi, sei = hparams_summary(flat, {f"{MONITOR}_best": math.nan})
        writer = tb.experiment._get_file_writer()
        for summary in (exp, ssi, sei):
            writer.add_summary(summary)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def _hparam_value(value: Any) -> int | float | str | bool:
    if isinstance(value, (bool, int, float, str)):
        return value
    if value is None:
        return "null"
    if isinstance(value, (list, tuple, np.ndarray)):
        return str(list(value))
    return str(value)


class NetworkSummary(ModelSummary):
    """Lightning's ModelSummary (the layer table, written to the log file) of the network alone: the metric
    objects the module holds (torchmetrics modules without parameters) are left out of the rows."""

    def _summary(self, trainer: L.Trainer, pl_module: L.LightningModule) -> LayerTable:
        return _NetworkTable(pl_module, max_depth=self._max_depth)


class _NetworkTable(LayerTable):
    @property
    def named_modules(self) -> list[tuple[str, torch.nn.Module]]:
        from torchmetrics import Metric, MetricCollection

        metrics = [n for n, m in self._model.named_modules() if isinstance(m, (Metric, MetricCollection))]
        return [
            (name, module)
            for name, module in super().named_modules
            if not any(name == m or name.startswith(f"{m}.") for m in metrics)
        ]


# ------------------------------------------------------------------------------------------------- seeding
def epoch_seed(seed: int, epoch: int, stream: int = 0) -> int:
    """A well-mixed 32-bit seed for one stream (0: data order, 1: training steps) of one epoch of one run."""
    return int(np.random.SeedSequence([int(seed), int(epoch), int(stream)]).generate_state(1)[0])


def seed_all(seed: int) -> None:
    """Seed Python, NumPy and torch (every device) alike."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class SeedEachEpoch(L.Callback):
    """Make epoch N depend on (seed, N) only, so epoch N of a resumed run repeats that of an uninterrupted one.

    At each training epoch start: the global RNGs (dropout, augmentation) are seeded from (seed, N), and the
    train loader's RandomSampler gets its own generator seeded from (seed, N). The sampler's generator is
    otherwise the DataLoader's, which every `iter()` also draws from, and Lightning calls `iter()` a
    different number of times in a resumed session than in an uninterrupted one. The sampler draws its
    order when the first batch is fetched, after this hook, with `data.num_workers=0`; worker processes
    prefetch earlier, so with workers the first epoch of a resumed session is shuffled differently.
    `data.cache=device` loaders (DeviceBatches) get the same (seed, N) through their `seed` and `epoch`.
    """

    def __init__(self, seed: int) -> None:
        self.seed = int(seed)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        epoch = trainer.current_epoch
        seed_all(epoch_seed(self.seed, epoch, stream=1))
        loaders = trainer.train_dataloader
        for loader in loaders if isinstance(loaders, (list, tuple)) else [loaders]:
            self._seed_order(loader, epoch)

    def _seed_order(self, loader: Any, epoch: int) -> None:
        from torch.utils.data import RandomSampler

        from densenet_se.data.loaders import DeviceBatches

        if isinstance(loader, DeviceBatches):
            if loader.shuffle:  # it shuffles with seed + epoch and counts epochs itself
                loader.seed, loader.epoch = epoch_seed(self.seed, 0, stream=2), epoch
            return
        sampler = getattr(loader, "sampler", None)
        if isinstance(sampler, RandomSampler):
            sampler.generator = torch.Generator().manual_seed(epoch_seed(self.seed, epoch, stream=2))
