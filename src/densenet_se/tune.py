"""`tune.lr_find=true`: Lightning's learning-rate range test on the training split, before training.

It trains from the run's initial weights for `tune.num_training` steps while the learning rate grows
exponentially from `tune.min_lr` to `tune.max_lr`, then restores the weights. The run directory gets
`lr_find.png` (loss against learning rate, the suggestion marked) and `lr_find.json` (the suggestion and the
curve). `tune.apply=true` trains with the suggestion (the head's rate when optim.backbone_lr_mult < 1);
otherwise the run keeps optim.lr and the suggestion is only reported.
"""

from __future__ import annotations

import functools
import json
import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import lightning as L
from omegaconf import DictConfig, OmegaConf

from densenet_se.checks import Range, Rule
from densenet_se.console import progress_bars
from densenet_se.errors import UserError
from densenet_se.io import atomic_write_text

log = logging.getLogger("densenet_se")

RESULT_FILE = "lr_find.json"
PLOT_FILE = "lr_find.png"
# Lightning's suggestion skips the first 10 and the last point of the curve.
MIN_STEPS = 20
ALLOWED: dict[str, Rule] = {
    "min_lr": Range(lambda v: 0.0 < v <= 10.0, "a number in (0, 10]"),
    "max_lr": Range(lambda v: 0.0 < v <= 10.0, "a number in (0, 10]"),
    "num_training": Range(
        lambda v: v >= MIN_STEPS,
        f"an integer >= {MIN_STEPS} (the suggestion skips the first 10 steps)",
    ),
}
# Trainer settings the range test shares with the run; the rest (callbacks, loggers, limits) are its own.
_SHARED_TRAINER_KEYS = (
    "accelerator",
    "precision",
    "deterministic",
    "benchmark",
    "gradient_clip_val",
    "gradient_clip_algorithm",
)


def check(cfg: DictConfig) -> None:
    """tune.min_lr below tune.max_lr, and one device (each DDP process would find its own rate)."""
    if not OmegaConf.select(cfg, "tune.lr_find", default=False):
        return
    if cfg.tune.min_lr >= cfg.tune.max_lr:
        raise UserError(
            f"tune.min_lr={cfg.tune.min_lr:g} must be below tune.max_lr={cfg.tune.max_lr:g} (the range the "
            "learning-rate finder sweeps)."
        )
    devices = OmegaConf.select(cfg, "trainer.devices", default=1)
    nodes = OmegaConf.select(cfg, "trainer.num_nodes", default=1) or 1
    one = devices in (1, "1") or (OmegaConf.is_list(devices) and len(devices) == 1)
    if not one or nodes != 1:
        raise UserError(
            f"tune.lr_find=true runs on one device, not trainer.devices={devices} with "
            f"trainer.num_nodes={nodes}; find the rate in a one-device run, then set optim.lr in this one."
        )


def find_lr(
    cfg: DictConfig, module: L.LightningModule, datamodule: L.LightningDataModule, run_dir: Path
) -> float | None:
    """Run the range test, write lr_find.png/.json into `run_dir`, apply the suggestion if tune.apply; return it."""
    from lightning.pytorch.tuner import Tuner

    from densenet_se.plots import save_figure
    from densenet_se.safety import with_atomic_checkpoints

    tune = cfg.tune
    shared = {
        k: v for k, v in (OmegaConf.to_container(cfg.trainer) or {}).items() if k in _SHARED_TRAINER_KEYS
    }
    trainer = L.Trainer(
        **{k: v for k, v in shared.items() if v is not None},
        devices=1,
        max_epochs=-1,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
        num_sanity_val_steps=0,
        check_val_every_n_epoch=2**31 - 1,  # no validation: the test reads the training loss only
        default_root_dir=str(run_dir),  # its temporary copy of the initial weights goes here
        plugins=with_atomic_checkpoints(None),
    )
    configured = float(module.hparams.lr)
    with _range_test_bar(progress_bars(OmegaConf.select(cfg, "trainer.enable_progress_bar"))):
        finder = Tuner(trainer).lr_find(
            module,
            datamodule=datamodule,
            min_lr=float(tune.min_lr),
            max_lr=float(tune.max_lr),
            num_training=int(tune.num_training),
            update_attr=False,
        )
    if finder is None:  # fast_dev_run: Lightning skips the test
        return None
    suggested = finder.suggestion()
    lrs = [float(v) for v in finder.results["lr"]]
    losses = [float(v) if math.isfinite(v) else None for v in finder.results["loss"]]
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    finder.plot(suggest=True, ax=ax)
    ax.set_title(f"learning-rate range test: suggested {suggested:.3g}" if suggested else "no suggestion")
    save_figure(fig, run_dir / PLOT_FILE)
    applied = bool(tune.apply) and suggested is not None
    result = {
        "suggested_lr": suggested,
        "applied": applied,
        "configured_lr": configured,
        "min_lr": float(tune.min_lr),
        "max_lr": float(tune.max_lr),
        "num_training": int(tune.num_training),
        "steps": len(lrs),
        "lr": lrs,
        "loss": losses,
    }
    atomic_write_text(run_dir / RESULT_FILE, json.dumps(result, indent=2) + "\n")
    if suggested is None:
        log.warning("lr_find: no suggestion (too few finite losses); training with optim.lr=%g", configured)
    elif applied:
        apply_lr(cfg, module, suggested)
        log.info("lr_find: training with the suggested learning rate %.3g (was %g)", suggested, configured)
    else:
        log.info(
            "lr_find: suggested learning rate %.3g; training with optim.lr=%g (tune.apply=false)",
            suggested,
            configured,
        )
    return suggested


@contextmanager
def _range_test_bar(show: bool) -> Iterator[None]:
    """Lightning's range test draws its own tqdm bar on stderr whatever the trainer says (lightning 2.6 creates
    its callback with progress_bar_refresh_rate=1); it is drawn only where the training bars are."""
    from lightning.pytorch.tuner import lr_finder

    drawn = lr_finder.tqdm
    if not show:
        lr_finder.tqdm = functools.partial(drawn, disable=True)
    try:
        yield
    finally:
        lr_finder.tqdm = drawn


def apply_lr(cfg: DictConfig, module: L.LightningModule, lr: float) -> None:
    """Train (and record in hparams and checkpoints) with `lr` in place of optim.lr."""
    module.hparams.lr = float(lr)
    cfg.optim.lr = float(lr)


def resumed_lr(run_dir: Path) -> float | None:
    """The learning rate a resumed run was started with by tune.apply=true (its lr_find.json), if any."""
    path = run_dir / RESULT_FILE
    if not path.is_file() or path.stat().st_size > 10_000_000:  # our own small file; anything else is ignored
        return None
    try:
        result = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    lr = result.get("suggested_lr") if isinstance(result, dict) and result.get("applied") is True else None
    return float(lr) if isinstance(lr, (int, float)) and 0.0 < lr <= 10.0 else None
