"""`callbacks=ema`: an exponential moving average of the weights, with Lightning's WeightAveraging callback.

What Lightning's callback does: validation runs on the average (so val/acc and best.ckpt pick the averaged
weights), every checkpoint's `state_dict` holds the average (so eval.py, predict.py and export.py, which read
`state_dict`, use it) with the raw weights beside it in `current_model_state` and the update count in
`averaging_state`, and a resumed run reloads all three. What this subclass adds:

- a warm-up (`ema.warmup`): the decay used at update n is min(decay, (1 + n) / (10 + n)), as TensorFlow's
  ExponentialMovingAverage(num_updates) does. With a few hundred steps in a small-data run, a fixed 0.999 would
  still be mostly the initial weights at the end. n is the stored update count, so a resumed run continues the
  same sequence of decays;
- testing a checkpoint after fit (train.py's test of best.ckpt) keeps its averaged `state_dict`: Lightning's
  callback would put the raw `current_model_state` back whenever it still holds an average from fitting.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import WeightAveraging
from lightning.pytorch.trainer.states import TrainerFn

from densenet_se.checks import Range, Rule

ALLOWED: dict[str, Rule] = {
    "decay": Range(lambda v: 0.0 < v < 1.0, "a number in (0, 1), e.g. 0.999"),
}


def ema_decay(decay: float, updates: int, warmup: bool) -> float:
    """The decay applied at the update that follows `updates` earlier ones."""
    return min(decay, (1.0 + updates) / (10.0 + updates)) if warmup else decay


def ema_update(decay: float, warmup: bool) -> Callable[[list, list, Any], None]:
    @torch.no_grad()
    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], num_averaged: Any) -> None:
        # The AveragedModel already read its update count on the host this step, so int() syncs nothing new.
        d = ema_decay(decay, int(num_averaged), warmup)
        if averaged[0].is_floating_point():
            torch._foreach_lerp_(averaged, current, 1.0 - d)
        else:  # integer buffers (BatchNorm's num_batches_tracked) follow the model
            for a, c in zip(averaged, current, strict=True):
                a.copy_(c)

    return update


class EMAWeights(WeightAveraging):
    """Exponential moving average of all weights and BatchNorm statistics, updated after every optimizer step."""

    def __init__(self, decay: float = 0.999, warmup: bool = True) -> None:
        super().__init__(use_buffers=True, multi_avg_fn=ema_update(float(decay), bool(warmup)))
        self.decay, self.warmup = float(decay), bool(warmup)

    def on_load_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if trainer.state.fn != TrainerFn.FITTING:
            return  # testing/validating a checkpoint: its state_dict is already the average, and stays
        super().on_load_checkpoint(trainer, pl_module, checkpoint)
