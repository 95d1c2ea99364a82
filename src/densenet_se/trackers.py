"""Experiment-tracker presets (`logger=mlflow`, `logger=wandb`, `logger=many`): optional extras.

MLflow writes to any tracking URI, or by default to a local file store (`mlruns/` where you run, the place
`mlflow ui` looks). W&B runs offline (files under the run directory, `wandb sync` uploads them later) unless
`logger.wandb.offline=false`.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

from densenet_se.errors import UserError

DEFAULT_PROJECT = "densenet-se"
# MLflow's local file store, in the directory you run in (conf/logger/mlflow.yaml: ${paths.root_dir}/mlruns).
DEFAULT_STORE = "mlruns"


def _require(module: str, extra: str, preset: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise UserError(
            f"logger={preset} needs the {module} package: pip install 'densenet-se[{extra}]' "
            "(or pick another logger, e.g. logger=tensorboard)."
        )


def run_name(run_dir: str | Path) -> str:
    """A readable name from the run directory: `2026-11-30/12-00-00-000000`, or a sweep's job folder."""
    parts = Path(run_dir).parts
    return "/".join(parts[-2:]) if len(parts) >= 2 else str(run_dir)


def mlflow_logger(
    run_dir: str,
    save_dir: str = DEFAULT_STORE,
    tracking_uri: str | None = None,
    experiment_name: str | None = None,
    tags: dict[str, Any] | None = None,
    log_model: bool = False,
) -> Any:
    """Lightning's MLFlowLogger on `tracking_uri` ($MLFLOW_TRACKING_URI, else a file store in `save_dir`)."""
    _require("mlflow", "mlflow", "mlflow")
    from lightning.pytorch.loggers import MLFlowLogger

    uri = (
        tracking_uri
        or os.environ.get("MLFLOW_TRACKING_URI")
        or Path(save_dir).expanduser().resolve().as_uri()
    )
    if uri.startswith("file:"):
        # MLflow 3 refuses its file store unless told it is wanted; a local store is this preset's point.
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return MLFlowLogger(
        experiment_name=experiment_name or DEFAULT_PROJECT,
        run_name=run_name(run_dir),
        tracking_uri=uri,
        tags={"run_dir": str(run_dir), **(tags or {})},
        log_model=log_model,
    )


def wandb_logger(run_dir: str, project: str | None = None, offline: bool = True, **kwargs: Any) -> Any:
    """Lightning's WandbLogger writing under `run_dir/wandb/`; offline unless `offline=false`."""
    _require("wandb", "wandb", "wandb")
    from lightning.pytorch.loggers import WandbLogger

    return WandbLogger(
        project=project or DEFAULT_PROJECT,
        name=run_name(run_dir),
        save_dir=str(run_dir),
        offline=bool(offline),
        **kwargs,
    )


def log_config(loggers: list[Any], hparams: dict[str, Any]) -> None:
    """Record the run's settings (model, optim, data, augment, ema) in MLflow and W&B as nested parameters.

    Lightning already logs the module's own hyperparameters; this adds the recipe around it (`augment/policy`).
    """
    from lightning.pytorch.loggers import MLFlowLogger, WandbLogger

    for logger in loggers:
        if isinstance(logger, (MLFlowLogger, WandbLogger)):
            logger.log_hyperparams(hparams)


def finish(loggers: list[Any]) -> None:
    """End the W&B run of this training, so the next run of a sweep in this process starts its own.

    `finish()` hands the last records to W&B's service process, which writes them a moment later; `teardown()`
    waits for it, so the run file is complete when training returns (CI once read it before the service wrote).
    """
    from lightning.pytorch.loggers import WandbLogger

    finished = False
    for logger in loggers:
        if isinstance(logger, WandbLogger) and logger._experiment is not None:
            logger._experiment.finish()
            finished = True
    if finished:
        import wandb

        wandb.teardown()
