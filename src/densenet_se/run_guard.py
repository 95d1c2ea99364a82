"""A run refused before it starts leaves nothing behind, and a run directory that cannot be written is one sentence.

Hydra creates the run directory, its `.hydra/` record and the log file before the command's task runs.
RunGuard, a Hydra callback (conf/hydra/default.yaml), runs before that: it refuses a place that cannot be
written, and notes which directories the run is about to create. When the task then refuses the run (exit
status 2: a bad value, a missing folder, an output inside the data) and those directories hold nothing but
what Hydra and the run lock wrote, `remove_refused_run` deletes them again. A directory that existed before
(a resumed run, a `hydra.run.dir` chosen by hand) is never removed, nor anything a run wrote into it.
A `hydra.run.dir` that already holds a run is refused before Hydra writes its record over that run's
(`check_not_a_run`). Torch-free.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any, ClassVar

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from densenet_se.distributed import is_rank_zero
from densenet_se.errors import UserError

# What a run refused before it started can hold: Hydra's record and log file, and the run lock.
HYDRA_RECORD = frozenset({"config.yaml", "hydra.yaml", "overrides.yaml"})
LOG_SUFFIXES = (".log", ".lock")
# What marks a directory as holding a run: Hydra's record of its command, its checkpoints, its metrics.
RUN_MARKERS = (".hydra/config.yaml", "checkpoints", "metrics.json")


class Refused(BaseException):
    """A refusal raised in a Hydra callback: Hydra 1.3 turns an Exception raised there into a warning and goes
    on, so the UserError travels as a BaseException up to the entry point (densenet_se.cli), which shows it."""

    def __init__(self, error: UserError) -> None:
        super().__init__(error)
        self.error = error


class RunGuard(Callback):
    """Hydra callback: before Hydra creates the run directory, refuse an unwritable one and note what is new."""

    # What this run is about to create: the run directory (or its topmost new parent), else the names already
    # in the existing run directory, which are never removed.
    before: ClassVar[tuple[Path, Path | None, frozenset[str]] | None] = None

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        RunGuard.before = None
        run_dir = Path(os.path.abspath(str(OmegaConf.select(config, "hydra.run.dir"))))
        existing = nearest_existing(run_dir)
        try:
            check_writable(run_dir, existing)
            if OmegaConf.select(config, "resume") in (None, ""):  # resume=RUN keeps RUN's record as it was
                check_not_a_run(run_dir)
        except UserError as error:
            raise Refused(error) from None
        if existing == run_dir:
            RunGuard.before = (run_dir, None, frozenset(p.name for p in run_dir.iterdir()))
        else:
            RunGuard.before = (
                run_dir,
                next(p for p in [run_dir, *run_dir.parents] if p.parent == existing),
                frozenset(),
            )

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(os.path.abspath(str(OmegaConf.select(config, "hydra.sweep.dir"))))
        try:
            check_not_a_sweep(sweep_dir)
        except UserError as error:
            raise Refused(error) from None


def nearest_existing(path: Path) -> Path:
    """`path` if it exists, else its nearest existing parent."""
    return next(p for p in [path, *path.parents] if p.exists())


def check_writable(run_dir: Path, existing: Path) -> None:
    """UserError naming the run directory if the run cannot create it or write into it."""
    where = "hydra.run.dir=<a writable folder>"
    if not existing.is_dir():
        raise UserError(
            f"cannot create the run directory {run_dir}: {existing} is a file; choose another place ({where})."
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        what = (
            f"the run directory {run_dir} is"
            if existing == run_dir
            else (f"cannot create the run directory {run_dir}: {existing} is")
        )
        raise UserError(
            f"{what} read-only for you; choose a writable place ({where}) or fix its permissions."
        )


def check_not_a_sweep(sweep_dir: Path) -> None:
    """UserError if `sweep_dir` already holds a sweep: its jobs' folders (0_..., 1_...) and records would be
    written over by the new sweep's jobs of the same numbers."""
    marker = sweep_dir / "multirun.yaml"
    if not marker.is_file():
        marker = next((p for p in sorted(sweep_dir.glob("*/.hydra/config.yaml"))), None)
    if marker is None:
        return
    raise UserError(
        f"hydra.sweep.dir={sweep_dir} already holds a sweep ({marker} is there), whose jobs this sweep would "
        "write over; choose another directory (or leave hydra.sweep.dir unset: each sweep gets its own)."
    )


def check_not_a_run(run_dir: Path) -> None:
    """UserError if `run_dir` already holds a run whose record (.hydra/) and files this command would overwrite.

    A SLURM job that was requeued runs its command again in its own directory (Lightning then resumes from its
    hpc checkpoint), and a DDP process other than rank zero joins the directory its rank zero made: both pass.
    """
    marker = next((run_dir / m for m in RUN_MARKERS if (run_dir / m).exists()), None)
    if marker is None or not is_rank_zero() or _requeued():
        return
    training = (run_dir / "checkpoints").is_dir() or (run_dir / "metrics.json").is_file()
    choose = f"continue that training with train.py resume={run_dir}, or choose" if training else "choose"
    raise UserError(
        f"hydra.run.dir={run_dir} already holds a run ({marker} is there), whose record this command would "
        f"overwrite; {choose} another directory (or leave hydra.run.dir unset)."
    )


def _requeued() -> bool:
    """True in a SLURM job that SLURM restarted (scontrol requeue, Lightning's auto-requeue, a node failure)."""
    count = os.environ.get("SLURM_RESTART_COUNT", "")
    return count.isdigit() and int(count) > 0


def log_file_error(ex: BaseException) -> UserError | None:
    """Hydra's "Unable to configure handler 'file'" (the run's log file cannot be opened) as one sentence."""
    if not (isinstance(ex, ValueError) and "Unable to configure handler" in str(ex)):
        return None
    cause = ex.__cause__ or ex.__context__
    while cause is not None and not isinstance(cause, OSError):
        cause = cause.__cause__ or cause.__context__
    if cause is None or cause.filename is None:
        return None
    path = Path(os.fsdecode(cause.filename))
    return UserError(
        f"cannot open the log file {path} ({cause.strerror}); choose a run directory where it can be written "
        f"(hydra.run.dir=<a writable folder>) or fix the permissions of {path.parent}."
    )


def remove_refused_run(run_dir: str | Path | None = None) -> bool:
    """Delete what this run created for its run directory (`run_dir`: Hydra's, checked to be the one noted) if
    it is only Hydra's record, log files and the run lock; return True if something was removed. Nothing that
    existed before the run is touched."""
    before, RunGuard.before = RunGuard.before, None
    if before is None or (run_dir is not None and Path(run_dir) != before[0]) or not before[0].is_dir():
        return False
    run_dir, created, kept = before
    if (
        created is not None
    ):  # a new directory (and maybe new parents): all of it, if it holds only bookkeeping
        chain = [run_dir, *run_dir.parents]
        new = chain[: chain.index(created) + 1]  # run_dir up to the topmost new directory
        for inner, outer in zip(new[:-1], new[1:], strict=True):  # each new parent holds only the next one
            if [child.name for child in outer.iterdir()] != [inner.name]:
                return False
    added = [entry for entry in run_dir.iterdir() if entry.name not in kept]
    if not added or not all(_is_bookkeeping(entry) for entry in added):
        return False
    removed = [created] if created is not None else added
    _close_log_files(removed)
    for entry in removed:
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
    return True


def _is_bookkeeping(entry: Path) -> bool:
    """Hydra's record (.hydra/ with its three files), a log file, or the run lock."""
    if entry.is_symlink():
        return False
    if entry.name == ".hydra" and entry.is_dir():
        return all(f.is_file() and not f.is_symlink() and f.name in HYDRA_RECORD for f in entry.iterdir())
    return entry.is_file() and entry.name.endswith(LOG_SUFFIXES)


def _close_log_files(removed: list[Path]) -> None:
    """Detach and close the log handlers writing into what is removed (Hydra's file handler), before it goes."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        name = getattr(handler, "baseFilename", None)
        if name and any(Path(name) == p or p in Path(name).parents for p in removed):
            root.removeHandler(handler)
            handler.close()
