"""Entry-point plumbing: Hydra main with errors shown as one sentence and a non-zero exit.

A bad override, an unknown key, an out-of-range value or a missing data folder prints one line on stderr
(`error: ...`) and exits with status 2. Set HYDRA_FULL_ERROR=1 for the full traceback.
"""

from __future__ import annotations

import atexit
import difflib
import gc
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

import densenet_se.config as config  # registers the schemas in Hydra's ConfigStore
from densenet_se import sweep  # registers the resolvers conf/hydra/ uses
from densenet_se.errors import UserError

EXIT_USER_ERROR = 2
_OURS = "DENSENET_SE_SET_HYDRA_FULL_ERROR"  # marks HYDRA_FULL_ERROR=1 as set by us, not by the person


def hydra_entry(
    task: Callable[[DictConfig], Any], config_name: str, config_dir: str | Path, schema: Any = None
) -> Callable[[], Any]:
    """Wrap `task` as a Hydra app reading `config_dir/config_name.yaml`, with one-line errors."""

    def wants_trace() -> bool:
        # The person asked for tracebacks (not merely our own setting, inherited by e.g. DDP child processes).
        return os.environ.get("HYDRA_FULL_ERROR") == "1" and os.environ.get(_OURS) != "1"

    @hydra.main(version_base="1.3", config_path=str(Path(config_dir).resolve()), config_name=config_name)
    def _main(cfg: DictConfig) -> Any:
        # In a sweep a failing job is recorded and the sweep goes on (see densenet_se.sweep).
        if sweep.is_multirun():
            return sweep.run_job(task, cfg)
        try:
            return task(cfg)
        except Exception as ex:  # noqa: BLE001
            if wants_trace():
                raise
            # Exit here, inside the job: re-raised, Hydra would print its own "Error executing job" line too.
            _report_and_exit(ex, schema)

    def main() -> Any:
        # At exit, Python's shutdown would garbage-collect every object torch and Lightning created (1-2 s
        # of CPU after the run is done); frozen objects are skipped, and the OS frees the memory anyway.
        # Registered before torch and Lightning load (tasks import them), so it runs after their exit
        # handlers (last in, first out); once per process, however often main() runs.
        atexit.unregister(gc.freeze)
        atexit.register(gc.freeze)
        trace = wants_trace()
        saved = {key: os.environ.get(key) for key in ("HYDRA_FULL_ERROR", _OURS)}
        if not trace:
            # Let Hydra re-raise instead of printing its own multi-line report; we print one line below.
            os.environ["HYDRA_FULL_ERROR"] = os.environ[_OURS] = "1"
        try:
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
        except KeyboardInterrupt:
            print("error: interrupted; checkpoints written so far are kept.", file=sys.stderr)
            sys.exit(130)
        except Exception as ex:  # noqa: BLE001 - every failure becomes one sentence for a person
            if wants_trace:
                raise
            # A sweep that stopped after some jobs ran (e.g. every Optuna trial failed) also names its summary.
            swept = sweep.take_last_result()
            _report_and_exit(ex, schema, f" ({swept.message()})" if swept and swept.failed else "")
        swept = sweep.take_last_result()
        if swept is not None and swept.exit_code:  # every job ran; exit as the worst failed job would alone
            print(f"error: {swept.message()}", file=sys.stderr)
            sys.exit(swept.exit_code)
        return result

    return main


def _report_and_exit(ex: BaseException, schema: Any = None, detail: str = "") -> None:
    print(f"error: {describe(ex, schema)}{detail}", file=sys.stderr)
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
    return isinstance(ex, (UserError, ValueError)) or _is_config_error(ex)


def describe(ex: BaseException, schema: Any = None) -> str:
    """One sentence for a person, from any exception raised while composing or running.

    `schema`: the entry point's config dataclass, for "did you mean" hints (default: the training schema).
    """
    from hydra.errors import MissingConfigException, OverrideParseException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError

    user_error = _user_error_in_chain(ex)
    if user_error is not None:  # also one raised inside a resolver, e.g. resume=RUN_DIR in hydra.run.dir
        return str(user_error)
    if isinstance(ex, MissingConfigException):
        missing = (ex.missing_cfg_file or "").strip("/")
        if ex.options:
            group, _, name = missing.rpartition("/")
            close = difflib.get_close_matches(name, list(ex.options), n=1)
            hint = f" Did you mean {group}={close[0]}?" if close else ""
            return f"{group}={name} is not a known option; choose one of: {', '.join(ex.options)}.{hint}"
        return _first_line(str(ex))
    if isinstance(ex, OverrideParseException):
        return f"cannot parse the override {ex.override!r}: {_first_line(str(ex))}"
    cause = ex if isinstance(ex, OmegaConfBaseException) else ex.__cause__
    if isinstance(cause, (ConfigKeyError, ConfigAttributeError)) and getattr(cause, "full_key", None):
        key = str(cause.full_key)
        close = config.closest_key(key, schema or config.TrainConfig)
        if close == key:  # a real argument that the YAML does not list
            return f"{key} is not in the config; add it with +{key}=VALUE"
        hint = f"; did you mean {close}?" if close else "; see the keys in conf/ or the README"
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
