"""Entry-point plumbing: Hydra main with errors shown as one sentence and a non-zero exit, and sweep jobs.

A bad override, an unknown key, an out-of-range value or a missing data folder prints one line on stderr
(`error: ...`) and exits with status 2, and a run refused that way leaves no directory behind
(densenet_se.run_guard). Set HYDRA_FULL_ERROR=1 for the full traceback. SIGINT and SIGTERM print one line on
how to continue and exit with 130 or 143 (densenet_se.interrupt). In a sweep each job runs through `run_job`:
a failing job is recorded in its job_status.json and the sweep goes on; an interrupted one stops the sweep.
"""

from __future__ import annotations

import atexit
import gc
import io
import json
import logging
import os
import re
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from densenet_se import config, distributed, resolvers, sweep
from densenet_se.console import file_only, warnings_logged
from densenet_se.errors import UserError
from densenet_se.interrupt import Interrupted, interrupted, sigterm_raises
from densenet_se.io import atomic_write_text, storage_error
from densenet_se.overrides import closest, comma_hint, quoting_hint
from densenet_se.run_guard import Refused, log_file_error, remove_refused_run

log = logging.getLogger("densenet_se")

EXIT_USER_ERROR = 2
_OURS = "DENSENET_SE_SET_HYDRA_FULL_ERROR"  # marks HYDRA_FULL_ERROR=1 as set by us, not by the person


def hydra_entry(
    task: Callable[[DictConfig], Any], config_name: str, config_dir: str | Path, schema: Any = None
) -> Callable[[], Any]:
    """Wrap `task` as a Hydra app reading `config_dir/config_name.yaml`, with one-line errors."""
    register()
    job = HydraJob(task, schema)

    @hydra.main(version_base="1.3", config_path=str(Path(config_dir).resolve()), config_name=config_name)
    def _main(cfg: DictConfig) -> Any:
        return job(cfg)

    def main() -> Any:
        # At exit, Python's shutdown would garbage-collect every object torch and Lightning created (1-2 s
        # of CPU after the run is done); frozen objects are skipped, and the OS frees the memory anyway.
        # Registered before torch and Lightning load (tasks import them), so it runs after their exit
        # handlers (last in, first out); once per process, however often main() runs.
        atexit.unregister(gc.freeze)
        atexit.register(gc.freeze)
        _escape_unprintable_output()
        trace = _wants_trace()
        saved = {key: os.environ.get(key) for key in ("HYDRA_FULL_ERROR", _OURS)}
        if not trace:
            # Let Hydra re-raise instead of printing its own multi-line report; we print one line below.
            os.environ["HYDRA_FULL_ERROR"] = os.environ[_OURS] = "1"
        try:
            # SIGTERM stops the run with status 143 and a line on how to continue (densenet_se.interrupt);
            # Python warnings reach the log file, and the console unless they are known noise (densenet_se.console).
            with sigterm_raises(), warnings_logged():
                return _run(trace)
        finally:  # in-process callers (tests, notebooks) get their environment back
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value

    def _run(wants_trace: bool) -> Any:
        try:
            result = _main()
        except Exception as ex:  # noqa: BLE001 - every failure becomes one sentence for a person
            if wants_trace:
                raise
            # A sweep that stopped after some jobs ran (e.g. every Optuna trial failed) also names its summary.
            swept = take_last_result()
            detail = f" ({swept.message()})" if swept and swept.failed else ""
            ex = log_file_error(ex) or ex
            if _is_user_error(ex):  # refused while Hydra set the run up: what it created goes again
                remove_refused_run()
            _report_and_exit(ex, schema, detail)
        except Refused as refused:  # before Hydra created anything (densenet_se.run_guard)
            _report_and_exit(refused.error)
        except BaseException as ex:  # SIGINT or SIGTERM: one line, and the signal's exit status
            stopped = interrupted(ex)
            if stopped is None:
                raise
            take_last_result()  # a sweep's summary, already written, is named in the line
            print(stopped.message(), file=sys.stderr)
            file_only(log, logging.WARNING, stopped.message())
            sys.exit(stopped.exit_code)
        swept = take_last_result()
        if swept is not None and swept.exit_code:  # every job ran; exit as the worst failed job would alone
            print(f"error: {swept.message()}", file=sys.stderr)
            sys.exit(swept.exit_code)
        return result

    return main


def register() -> None:
    """What conf/ needs before Hydra composes it: the schemas it extends and the resolvers conf/hydra/ uses."""
    config.register_configs()
    resolvers.register()


class HydraJob:
    """The function Hydra runs: the task with one-line errors; in a sweep, `run_job` (the sweep goes on).

    A submitit job unpickles it in a fresh process, where `__setstate__` registers what conf/ needs before
    Hydra resolves the job's directory name.
    """

    def __init__(self, task: Callable[[DictConfig], Any], schema: Any = None) -> None:
        self.task, self.schema = task, schema

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        register()

    def __call__(self, cfg: DictConfig) -> Any:
        if is_multirun():
            return run_job(self.task, cfg)
        try:
            return self.task(cfg)
        except Exception as ex:  # noqa: BLE001
            if _is_user_error(ex):  # refused before it started: Hydra's directory and log file go again
                from hydra.core.hydra_config import HydraConfig

                remove_refused_run(HydraConfig.get().runtime.output_dir)
            if _wants_trace():
                raise
            # Exit here, inside the job: re-raised, Hydra would print its own "Error executing job" line too.
            _report_and_exit(ex, self.schema)


def _wants_trace() -> bool:
    # The person asked for tracebacks (not merely our own setting, inherited by e.g. DDP child processes).
    return os.environ.get("HYDRA_FULL_ERROR") == "1" and os.environ.get(_OURS) != "1"


# ---------------------------------------------------------------------------------------------- sweep jobs
def is_multirun() -> bool:
    """True inside a job of a Hydra multirun (`-m`, hparams_search=..., a launcher plugin)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def run_job(task: Callable[[DictConfig], Any], cfg: DictConfig) -> Any:
    """Run one sweep job; a failure is logged as one line, recorded in job_status.json, and the sweep goes on.
    SIGINT or SIGTERM records the job as interrupted, writes the sweep summary, and stops the sweep.

    Returns the task's value, or None for a failed job (Optuna then records the trial as failed; a NaN would
    make hydra-optuna-sweeper 1.3 stop the search).
    """
    from hydra.core.hydra_config import HydraConfig

    hydra_cfg = HydraConfig.get()
    job_dir = Path(hydra_cfg.runtime.output_dir)
    overrides = [str(o) for o in hydra_cfg.overrides.task]
    status: dict[str, Any] = {"job": int(hydra_cfg.job.num), "overrides": overrides}
    sweep.share_image_cache(cfg, overrides)
    start = time.perf_counter()
    try:
        value = task(cfg)
    except Exception as ex:  # noqa: BLE001 - one job's failure must not stop the others
        line = describe(ex)
        log.error("job %s failed: %s", status["job"], line)
        status.update(
            status="failed",
            error=line,
            exit_code=exit_status(ex),
            traceback="".join(traceback.format_exception(ex)),
        )
        value = None
    except BaseException as ex:  # SIGINT or SIGTERM stops the whole sweep, with its summary written
        stopped = interrupted(ex)
        if stopped is None:
            raise
        status.update(status="interrupted", error=stopped.message(), exit_code=stopped.exit_code)
        _write_status(job_dir, status, start)
        summary = Path(hydra_cfg.sweep.dir).resolve() / sweep.SUMMARY_MD
        if distributed.is_rank_zero():
            sweep.summarise(summary.parent)
        hint = f"sweep job {status['job']}" + (f": {stopped.hint}" if stopped.hint else "")
        raise Interrupted(stopped.signum, f"{hint}; the jobs after it did not run; see {summary}") from None
    else:
        status.update(status="completed", value=value, exit_code=0)
    _write_status(job_dir, status, start)
    return value


def _write_status(job_dir: Path, status: dict[str, Any], start: float) -> None:
    status["seconds"] = round(time.perf_counter() - start, 3)
    if distributed.is_rank_zero():
        atomic_write_text(job_dir / sweep.STATUS_FILE, json.dumps(status, indent=2, default=str) + "\n")


def check_multirun_launch(trainer: Any) -> None:
    """Refuse, in a multirun, a strategy that Lightning would start by re-running the command line."""
    if not is_multirun():
        return
    try:
        from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher
    except ImportError:  # pragma: no cover - a Lightning without it cannot re-launch either
        return
    strategy = trainer.strategy
    environment = getattr(strategy, "cluster_environment", None)
    if environment is not None and environment.creates_processes_externally:
        return  # srun or torchrun started every process: nothing is re-launched
    if isinstance(getattr(strategy, "launcher", None), _SubprocessScriptLauncher):
        raise UserError(sweep.multirun_ddp_message(trainer.world_size))


def take_last_result() -> sweep.SweepResult | None:
    """How the sweep that just ended in this process went (once: the next call gives None), or None."""
    result, sweep.SweepSummary.last_result = sweep.SweepSummary.last_result, None
    return result


# ---------------------------------------------------------------------------------------------- errors


def _escape_unprintable_output() -> None:
    """A file or class name that is not UTF-8 is printed escaped (\\udcXX) instead of stopping the program."""
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, io.TextIOWrapper) and stream.errors == "strict":
            stream.reconfigure(errors="backslashreplace")


def _report_and_exit(ex: BaseException, schema: Any = None, detail: str = "") -> None:
    line = f"{describe(ex, schema)}{detail}"
    print(f"error: {line}", file=sys.stderr)
    file_only(log, logging.ERROR, line)  # the run's log file tells how it ended too
    if not _is_user_error(ex):
        print("(set HYDRA_FULL_ERROR=1 for the full traceback)", file=sys.stderr)
    sys.exit(exit_status(ex))


def exit_status(ex: BaseException) -> int:
    """2 for something a person must fix (config, data, UserError), 1 for anything else."""
    return EXIT_USER_ERROR if _is_user_error(ex) else 1


def _is_config_error(ex: BaseException) -> bool:
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    return isinstance(ex, (HydraException, OmegaConfBaseException))


def _is_user_error(ex: BaseException) -> bool:
    return isinstance(ex, (UserError, ValueError)) or _is_config_error(ex) or storage_error(ex) is not None


def describe(ex: BaseException, schema: Any = None) -> str:
    """One sentence for a person, from any exception raised while composing or running.

    `schema`: the entry point's config dataclass, for "did you mean" hints (default: the training schema).
    """
    from hydra.errors import MissingConfigException, OverrideParseException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError

    user_error = _user_error_in_chain(ex)
    if user_error is not None:  # also one raised inside a resolver, e.g. resume=RUN_DIR in hydra.run.dir
        return str(user_error)
    refused = storage_error(ex)  # a full disk under a writer that is not ours (Hydra, TensorBoard, logging)
    if refused is not None:
        return str(refused)
    if isinstance(ex, MissingConfigException):
        missing = (ex.missing_cfg_file or "").strip("/")
        if ex.options:
            group, _, name = missing.rpartition("/")
            close = closest(name, ex.options)
            hint = f" Did you mean {group}={close}?" if close else ""
            return f"{group}={name} is not a known option; choose one of: {', '.join(ex.options)}.{hint}"
        return _first_line(str(ex))
    if isinstance(ex, OverrideParseException):  # e.g. a regular expression with ( ) [ ], unquoted
        return quoting_hint(ex.override)
    ambiguous = re.match(r"Ambiguous value for argument '(.*)'", str(ex)) if _is_config_error(ex) else None
    if ambiguous:  # key=a,b without -m
        return comma_hint(ambiguous.group(1))
    cause = ex if isinstance(ex, OmegaConfBaseException) else ex.__cause__
    if isinstance(cause, (ConfigKeyError, ConfigAttributeError)) and getattr(cause, "full_key", None):
        key = str(cause.full_key)
        other_arch = config.unknown_model_setting(key, getattr(cause, "object_type", None))
        if other_arch:  # model.* is typed by the chosen arch's schema
            return other_arch
        close = config.closest_key(key, schema or config.TrainConfig)
        if close == key:  # a real argument that the YAML does not list
            return f"{key} is not in the config; add it with +{key}=VALUE"
        hint = f"; did you mean {close}?" if close else "; the keys are listed, with comments, in conf/"
        return f"{key} is not a valid config key{hint}"
    if isinstance(cause, ValidationError) and getattr(cause, "full_key", None):
        return f"{cause.full_key}: {_first_line(cause.msg if hasattr(cause, 'msg') else str(cause))}"
    if isinstance(cause, OmegaConfBaseException):
        return _first_line(str(cause))
    if isinstance(ex, ValueError):
        return _first_line(str(ex))
    return f"{type(ex).__name__}: {_first_line(str(ex))}"


def _user_error_in_chain(ex: BaseException | None) -> UserError | None:
    seen: set[int] = set()
    while ex is not None and id(ex) not in seen:
        if isinstance(ex, UserError):
            return ex
        seen.add(id(ex))
        ex = ex.__cause__ or ex.__context__
    return None


def _first_line(text: str) -> str:
    for line in text.strip().splitlines():
        if line.strip():
            return line.strip()
    return text.strip()
