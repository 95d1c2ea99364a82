"""Wall-clock stamps of a training run for benchmarks/startup.py (`+callbacks.startup_stamp._target_=
stamp.startup_stamp`). Importing this module loads nothing, so a profile can start before it."""

from __future__ import annotations

import time
from typing import Any

# Set by startup.py's profiling wrapper: stopped and written out at the first training step.
PROFILER: Any = None
PROFILE_PATH: str | None = None


def _stamp(name: str) -> None:
    print(f"STAMP {name} {time.time():.6f} {time.process_time():.6f}", flush=True)


def startup_stamp() -> Any:
    """A callback printing `STAMP <name> <unix time> <process CPU seconds>` at fit start, after the sanity check, at each
    epoch's start, at the first training step, at the end of training and at the end of fit."""
    import lightning as L

    class StartupStamp(L.Callback):
        def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            _stamp("fit_start")

        def on_sanity_check_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            _stamp("sanity_done")

        def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            _stamp(f"epoch_start_{trainer.current_epoch}")

        def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, idx) -> None:
            if trainer.global_step == 0 and idx == 0:
                _stamp("first_step")
                if PROFILER is not None:
                    PROFILER.disable()
                    PROFILER.dump_stats(PROFILE_PATH)

        def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            _stamp("train_end")

        def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            _stamp("fit_end")

    return StartupStamp()
