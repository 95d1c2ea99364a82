"""The training task: data, module, callbacks, loggers, Trainer; fit, then test the best checkpoint."""

from __future__ import annotations

import logging
import shlex
import sys
from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelSummary
from lightning.pytorch.utilities.model_summary import get_human_readable_count
from omegaconf import DictConfig, OmegaConf

from densenet_se import console
from densenet_se.callbacks import RunReport, SeedEachEpoch, tensorboard_logger
from densenet_se.cli import check_multirun_launch, is_multirun
from densenet_se.config import plain, trainer_arguments, validate
from densenet_se.data import ImageFolderDataModule
from densenet_se.data.cache import default_cache_dir
from densenet_se.errors import UserError
from densenet_se.interrupt import interrupted, signal_of
from densenet_se.metrics import BEST, MONITOR
from densenet_se.module import Classifier, unwrap
from densenet_se.overrides import closest
from densenet_se.paths import check_outside
from densenet_se.resume import ResumeSession, checkpoint_path, prepare_resume
from densenet_se.rundir import CheckpointPaths, hold_run_dir
from densenet_se.safety import NonFiniteLossGuard, with_atomic_checkpoints
from densenet_se.trackers import finish as finish_trackers
from densenet_se.trackers import log_config

log = logging.getLogger("densenet_se")

# Lightning's ModelSummary lists the module's metric objects too: it is created as the same table of the network
# alone. (conf/callbacks/ keeps Lightning's name, so run directories made before still resume.)
SWAPPED_TARGETS = {"lightning.pytorch.callbacks.ModelSummary": "densenet_se.callbacks.NetworkSummary"}


def route_lightning_logs() -> None:
    """Send Lightning's own messages through the root handlers (console + the run's log file).

    Lightning adds its own console handler and stops propagation when it is imported before logging is set up,
    which would keep its messages out of `train.log`.
    """
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
        logger.propagate = True


def build_datamodule(cfg: DictConfig, output_dir: str | Path | None) -> ImageFolderDataModule:
    """The data module from `cfg.data` and `cfg.augment` (plain values), writing its reports to `output_dir`."""
    return ImageFolderDataModule(
        **plain(cfg.data),
        output_dir=str(output_dir) if output_dir else None,
        augmentation=plain(cfg.get("augment")),
    )


def class_weights(cfg: DictConfig, datamodule: ImageFolderDataModule) -> list[float] | None:
    """`optim.class_weights`: a list as given, or inverse class frequency over the training split for 'balanced'."""
    weights = plain(cfg.optim.class_weights)
    if weights != "balanced":
        return weights
    counts = [0] * datamodule.num_classes
    for _, label in datamodule.split["train"]:
        counts[label] += 1
    total = sum(counts)
    return [total / (len(counts) * c) if c else 0.0 for c in counts]


def build_module(cfg: DictConfig, datamodule: ImageFolderDataModule) -> Classifier:
    optim = plain(cfg.optim)
    optim["class_weights"] = class_weights(cfg, datamodule)
    return Classifier(
        num_classes=datamodule.num_classes,
        class_names=datamodule.class_names,
        image_size=cfg.data.image_size,
        model=plain(cfg.model),
        **optim,
    )


def _instantiate_all(section: DictConfig, what: str) -> list[Any]:
    objects = []
    for name, node in (section or {}).items():
        if node is None or not OmegaConf.is_dict(node) or "_target_" not in node:
            continue
        swapped = SWAPPED_TARGETS.get(str(node.get("_target_")))
        try:
            objects.append(instantiate(node, _target_=swapped) if swapped else instantiate(node))
        except Exception as ex:  # the one sentence names the entry that failed
            raise UserError(f"{what}.{name} could not be created: {_cause(ex)}") from ex
    return objects


def _cause(ex: BaseException) -> str:
    while ex.__cause__ is not None:
        ex = ex.__cause__
    return str(ex).strip().splitlines()[0] if str(ex).strip() else type(ex).__name__


def trainer_kwargs(cfg: DictConfig) -> dict[str, Any]:
    """`cfg.trainer` checked against Lightning's Trainer signature (unknown keys name the closest valid one)."""
    kwargs = plain(cfg.trainer) or {}
    valid = sorted(set(trainer_arguments()) - {"callbacks", "logger"})  # built here from cfg.callbacks/logger
    for key in kwargs:
        if key not in valid:
            close = closest(key, valid)
            hint = f"; did you mean trainer.{close}?" if close else "; see Lightning's Trainer arguments"
            raise UserError(f"trainer.{key} is not a Trainer argument{hint}")
    return kwargs


def hparams_for_logging(cfg: DictConfig) -> dict[str, Any]:
    """The hyperparameters shown in TensorBoard's HParams table and stored in metrics.json."""
    return {
        "model": plain(cfg.model),
        "optim": plain(cfg.optim),
        "data": {
            k: plain(cfg.data[k])
            for k in ("image_size", "batch_size", "val_fraction", "test_fraction", "split_seed", "augment")
        }
        # How the split was made (k-fold, grouped): .get, as a resumed run's saved config may predate them.
        | {
            k: plain(cfg.data.get(k))
            for k in ("source", "labels", "folds", "fold", "group_pattern", "groups")
        },
        "augment": plain(cfg.get("augment")),
        **({"ema": plain(cfg.ema)} if OmegaConf.select(cfg, "callbacks.ema") else {}),
        "seed": cfg.seed,
        "max_epochs": OmegaConf.select(cfg, "trainer.max_epochs"),
    }


def tune_learning_rate(
    cfg: DictConfig,
    module: Classifier,
    datamodule: ImageFolderDataModule,
    run_dir: Path,
    resuming: bool,
) -> None:
    """tune.lr_find=true: the range test on a new run; a resumed run keeps the rate its first session chose."""
    from densenet_se import tune

    if not resuming:
        tune.find_lr(cfg, module, datamodule, run_dir)
        return
    lr = tune.resumed_lr(run_dir)
    if lr is not None:
        tune.apply_lr(cfg, module, lr)
    log.info("lr_find ran when this run started (%s); the resumed optimizer keeps its rate", tune.RESULT_FILE)


def check_accelerator(kwargs: dict[str, Any]) -> None:
    """A GPU setting on a machine without one is one clear sentence; on a GPU, allow TF32 matmuls."""
    import torch

    accelerator = str(kwargs.get("accelerator", "auto"))
    has_cuda = torch.cuda.is_available()
    if accelerator in ("gpu", "cuda") and not has_cuda:
        raise UserError(
            f"trainer.accelerator={accelerator} needs a CUDA GPU and none is visible; "
            "use trainer=cpu (or trainer.accelerator=auto)."
        )
    if has_cuda and accelerator in ("gpu", "cuda", "auto"):
        # Before the Trainer exists, so Lightning does not suggest it; bf16 autocast leaves some matmuls in fp32.
        torch.set_float32_matmul_precision("high")


def build_trainer(cfg: DictConfig, run_dir: Path, report: RunReport) -> L.Trainer:
    callbacks = [report, *_instantiate_all(cfg.callbacks, "callbacks"), NonFiniteLossGuard()]
    loggers = _instantiate_all(cfg.logger, "logger")
    kwargs = trainer_kwargs(cfg)
    if any(isinstance(c, ModelSummary) for c in callbacks):  # Lightning would add its own, or say it does not
        kwargs.setdefault("enable_model_summary", False)
    kwargs["enable_progress_bar"] = console.progress_bars(kwargs.get("enable_progress_bar"))
    if kwargs["enable_progress_bar"] and sys.stdout.isatty():
        from lightning.pytorch.callbacks import RichProgressBar

        callbacks.append(RichProgressBar())
    # Epoch N depends on (seed, N) only, so a resumed run repeats an uninterrupted one.
    callbacks.append(SeedEachEpoch(cfg.seed))
    # A moved or copied run directory keeps its best score; no checkpoint names files outside its folder.
    callbacks.append(CheckpointPaths())
    # Checkpoints are written to a temp file and renamed, and always loaded with weights_only=True.
    kwargs["plugins"] = with_atomic_checkpoints(kwargs.get("plugins"))
    kwargs.setdefault("default_root_dir", str(run_dir))
    try:
        return L.Trainer(callbacks=callbacks, logger=loggers or False, **kwargs)
    except UserError:
        raise
    except Exception as ex:  # Lightning's MisconfigurationException names the flag; keep its first line
        raise UserError(f"the trainer settings are invalid: {_cause(ex)}") from ex


def resume_hint(cfg: DictConfig, run_dir: Path, report: RunReport) -> str:
    """What an interrupted run kept, and the command that continues it."""
    last = checkpoint_path(run_dir)
    if not last.is_file():
        return "no epoch had finished, so there is no checkpoint to continue from; start the run again"
    saved = report.saved_epochs()
    of = OmegaConf.select(cfg, "trainer.max_epochs", default=None)
    what = "the last finished epoch"
    if saved:
        what = f"epoch {saved[-1]['epoch'] + 1}" + (f" of {of}" if isinstance(of, int) and of > 0 else "")
    return f"{what} is saved in {last}; continue with: python train.py resume={shlex.quote(str(run_dir))}"


def best_checkpoint_report(
    cfg: DictConfig, trainer: L.Trainer, datamodule: ImageFolderDataModule, run_dir: Path
) -> dict[str, Any] | None:
    """RUN/report.html for the best checkpoint; returns the test split's intervals for metrics.json."""
    best_path = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    if not cfg.get("best_report", True) or not best_path:  # .get: a resumed run's config may predate the key
        return None
    from densenet_se.best_report import write_best_report

    try:
        return write_best_report(
            run_dir,
            best_path,
            datamodule,
            datamodule.split_report,
            trainer.strategy.root_device,
            with_test=bool(cfg.test_after_fit and datamodule.has_test),
        )
    except Exception as err:  # the run's checkpoints and metrics stand; eval.py can write the page later
        log.warning("could not write report.html for %s: %s: %s", best_path, type(err).__name__, err)
        return None


def run(cfg: DictConfig) -> float | None:
    """Train as `cfg` says; return the best validation accuracy (the value sweepers optimise)."""
    route_lightning_logs()
    session = prepare_resume(cfg) if cfg.resume else None
    if session is not None:  # the run's own config (train.py) and its checkpoint, checked before any work
        cfg = session.cfg
    validate(cfg)
    check_accelerator(trainer_kwargs(cfg))  # before any data work
    run_dir = Path(cfg.paths.output_dir)
    # Files written inside the image folder would be scanned as images (curves.png as a class) next time.
    data_root = {"data.root": Path(cfg.data.root)}
    check_outside("hydra.run.dir", run_dir, data_root)
    check_outside("data.cache_dir", cfg.data.cache_dir or default_cache_dir(), data_root)
    run_dir.mkdir(parents=True, exist_ok=True)
    with hold_run_dir(run_dir):  # one process writes a run directory at a time
        # Filled in as the run goes (its hyperparameters once lr_find has run, the split's statement).
        report = RunReport(run_dir)
        try:
            return _train(cfg, session, run_dir, report)
        except BaseException as ex:  # SIGINT or SIGTERM: exit status 130 or 143 and how to continue (cli)
            if signal_of(ex) is None:
                raise
            raise interrupted(ex, resume_hint(cfg, run_dir, report)) from None


def _train(cfg: DictConfig, session: ResumeSession | None, run_dir: Path, report: RunReport) -> float | None:
    """The run once its config passed every check and this process holds the run directory."""
    log.info("run directory: %s", run_dir)
    console.show_config(cfg, resumed=session is not None)
    L.seed_everything(cfg.seed, workers=True, verbose=False)

    # A resumed run keeps its split.json and bad_files.txt; the new scan must give the same split.
    datamodule = build_datamodule(cfg, None if session else run_dir)
    datamodule.prepare_data()
    datamodule.setup("fit")
    log.info("%s", console.data_summary(datamodule.split))
    if session is not None:
        session.check_split(datamodule)
        log.info("resuming %s after epoch %d from %s", run_dir, session.epoch, session.checkpoint)
    module = build_module(cfg, datamodule)
    if OmegaConf.select(cfg, "tune.lr_find"):
        tune_learning_rate(cfg, module, datamodule, run_dir, resuming=session is not None)
    report.hparams = hparams_for_logging(cfg)
    # The split's leakage statement (grouped_split, groups, folds, fold) in every metrics.json write.
    report.extra = dict(datamodule.split_report)
    trainer = build_trainer(cfg, run_dir, report)
    log_config(trainer.loggers, report.hparams)
    network = unwrap(module)
    n = trainer.max_epochs or 0
    epochs = f"for {n} epoch{'s' if n > 1 else ''}" if n > 0 else "with no epoch limit"
    log.info(
        "training %s (%s parameters) on %s %s",
        type(network).__name__,
        get_human_readable_count(sum(p.numel() for p in network.parameters())).strip(),
        trainer.strategy.root_device.type + (f" x{trainer.world_size}" if trainer.world_size > 1 else ""),
        epochs,
    )
    check_multirun_launch(trainer)  # Lightning's DDP re-launch cannot run inside a sweep

    ckpt_path = str(session.checkpoint) if session else None
    if session is not None:
        session.record()  # every check passed: this session's settings now carry into the next resume
    # Resuming continues in a checkpoint folder that holds files by design: Lightning's warning about it is not.
    expected = [
        f"Checkpoint directory {c.dirpath} exists and is not empty." for c in trainer.checkpoint_callbacks
    ]
    with console.expected_warnings(*(expected if session else [])):
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)

    if cfg.test_after_fit and datamodule.has_test:
        best_path = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        results = trainer.test(
            module, datamodule=datamodule, ckpt_path=best_path or None, verbose=False, weights_only=True
        )
        test = {k.split("/", 1)[1]: float(v) for k, v in (results[0] if results else {}).items()}
        test["confusion_matrix"] = module.last_test_confmat
        report.test = test
    if trainer.is_global_zero:
        with_intervals = best_checkpoint_report(cfg, trainer, datamodule, run_dir)
        if with_intervals and report.test is not None:
            report.test.update(with_intervals)
        report.write_metrics(trainer)
    finish_trackers(trainer.loggers)
    best = report.best()
    best_path = report.summary(trainer)["best_checkpoint"]
    if best is not None:
        log.info(
            "best %s %.4f at epoch %d; checkpoint %s",
            MONITOR,
            best[f"val_{BEST}"],
            best["epoch"] + 1,
            best_path,
        )
    if report.test is not None and trainer.is_global_zero:
        log.info("%s", console.held_out_line(report.test))
    if trainer.is_global_zero and not is_multirun():  # a sweep names its summary instead
        last = checkpoint_path(run_dir)
        for line in console.next_steps(
            run_dir, best_path or (last if last.is_file() else None), tensorboard_logger(trainer) is not None
        ):
            log.info("%s", line)
    return best[f"val_{BEST}"] if best else None


__all__ = ["run", "build_datamodule", "build_module"]
