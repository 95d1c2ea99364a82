"""What the console shows (docs/console.md): this project's own lines on stdout, every warning and error on stderr
except known third-party noise, and everything, timestamped, in the run's log file (train.log).

conf/hydra/job_logging/console.yaml wires these filters and the formatter into Hydra's logging set-up; the entry
points route Python warnings into logging (`warnings_logged`), so the log file keeps them too. Noise is listed
once, in NOISE, each entry matching one message of one library: a warning about the user's own setup still
reaches the console. Torch-free.
"""

from __future__ import annotations

import logging
import re
import shlex
import sys
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from densenet_se.checks import Range

OWN_LOGGER = "densenet_se"
# `log.info(..., extra=FILE_ONLY)`: for the log file, not the console (the full config, the layer table).
FILE_ONLY = {"console": False}

# print_config: compact (the overrides and where the full config is saved), full (every key), or false.
# true is full, as before print_config had values.
PRINT_CONFIG_RULE = Range(
    lambda v: isinstance(v, bool) or v in ("compact", "full"), "compact, full or false (true: full)"
)


@dataclass(frozen=True)
class Noise:
    """A third-party message the console does not show (the log file keeps it): its logger and text."""

    logger: str
    pattern: str  # a regular expression searched in the message
    why: str

    def matches(self, record: logging.LogRecord) -> bool:
        return record.name == self.logger and re.search(self.pattern, record.getMessage()) is not None


NOISE: tuple[Noise, ...] = (
    Noise(
        "py.warnings",
        # Lightning formats warnings from its own files without the category (FutureWarning here).
        r"lightning/pytorch/utilities/_pytree\.py:\d+: (FutureWarning: )?`isinstance\(treespec, LeafSpec\)` is "
        r"deprecated",
        "Lightning's own use of a torch API that torch 2.14 deprecates; nothing in the user's setup causes it",
    ),
    Noise(
        "py.warnings",
        r"lightning/pytorch/loops/fit_loop\.py:\d+: (\w+: )?The number of training batches \(\d+\) is smaller than "
        r"the logging interval",
        "a data set of fewer than 10 batches per epoch is not a mistake, and every metric is logged per epoch",
    ),
)


def is_own(record: logging.LogRecord) -> bool:
    """True for this project's loggers (densenet_se, densenet_se.data, ...)."""
    return record.name == OWN_LOGGER or record.name.startswith(f"{OWN_LOGGER}.")


def _for_console(record: logging.LogRecord) -> bool:
    return getattr(record, "console", True) is not False


class OwnLines(logging.Filter):
    """stdout: this project's own lines below WARNING (Lightning's INFO lines go to the log file only)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return is_own(record) and record.levelno < logging.WARNING and _for_console(record)


class Problems(logging.Filter):
    """stderr: every warning and error, ours and third-party, except the known noise in NOISE."""

    def filter(self, record: logging.LogRecord) -> bool:
        return (
            record.levelno >= logging.WARNING
            and _for_console(record)
            and not any(noise.matches(record) for noise in NOISE)
        )


class ConsoleFormatter(logging.Formatter):
    """Our lines as they are; `warning:` / `error:` before problems, with the library's name when not ours."""

    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        if record.name == "py.warnings":  # "file:line: Category: message\n  <source line>": the first line
            text = text.strip().splitlines()[0] if text.strip() else text
        elif not is_own(record):
            text = f"[{record.name}] {text}"
        if record.exc_info and record.levelno >= logging.ERROR:
            text = f"{text}\n{self.formatException(record.exc_info)}"
        if record.levelno >= logging.ERROR:
            return f"error: {text}"
        return f"warning: {text}" if record.levelno >= logging.WARNING else text


@contextmanager
def warnings_logged() -> Iterator[None]:
    """Python warnings become log records (logger py.warnings): the log file keeps them, NOISE keeps the
    console clear of the known ones. Before Hydra sets up logging they print on stderr as usual."""
    logging.captureWarnings(True)
    try:
        yield
    finally:
        logging.captureWarnings(False)


@contextmanager
def expected_warnings(*messages: str) -> Iterator[None]:
    """Hide warnings whose text is exactly one of `messages`: ones a situation makes certain and harmless (a
    resumed run's checkpoint folder is not empty). Any other warning, or the same one elsewhere, still shows."""
    with warnings.catch_warnings():
        for message in messages:
            warnings.filterwarnings("ignore", message=f"{re.escape(message)}$")
        yield


def progress_bars(enable_progress_bar: bool | None) -> bool:
    """Whether to draw progress bars: trainer.enable_progress_bar, else only when stdout is a terminal."""
    return sys.stdout.isatty() if enable_progress_bar is None else bool(enable_progress_bar)


def file_only(logger: logging.Logger, level: int, message: str) -> None:
    """`message` into the run's log file only (the caller printed it): the root logger's file handlers, if
    any. Before the run's logging is set up, Hydra's own handlers are there, and they print."""
    record = logger.makeRecord(logger.name, level, __file__, 0, message, None, None, extra=FILE_ONLY)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def print_logged(logger: logging.Logger, text: str, stream: Any = None, level: int = logging.INFO) -> None:
    """Print `text` (stdout, or `stream`) as it is, and put it in the run's log file too: a command's report
    that is printed, not logged, so that it also shows outside Hydra's logging (in-process callers)."""
    print(text, file=stream, flush=True)
    file_only(logger, level, text)


# ---------------------------------------------------------------------------------------------- train's lines
def show_config(cfg: DictConfig, resumed: bool = False) -> None:
    """print_config: compact (the overrides), full or false; the log file always gets the full config."""
    log = logging.getLogger(OWN_LOGGER)
    text = OmegaConf.to_yaml(cfg, resolve=True)
    mode = cfg.get("print_config", "compact")  # .get: a resumed run's config may predate the key
    if mode is True or mode == "full":
        log.info("config:\n%s", text)
        return
    log.info("config:\n%s", text, extra=FILE_ONLY)
    if mode != "compact":
        return
    from hydra.core.hydra_config import HydraConfig

    overrides, saved = [], None
    if HydraConfig.initialized():
        hydra = HydraConfig.get()
        overrides = list(hydra.overrides.task)
        if hydra.output_subdir and not resumed:  # a resumed session records its config later, elsewhere
            saved = Path(hydra.runtime.output_dir) / hydra.output_subdir / "config.yaml"
    given = " ".join(overrides) if overrides else "none (the defaults of conf/train.yaml)"
    where = f"the full config is in {saved}" if saved else "the full config is in the log file"
    log.info("config overrides: %s; %s (print it with print_config=full)", given, where)


def data_summary(split: Mapping[str, Any]) -> str:
    """One line from a split record (split.json): the images of each class, and how many each split holds."""
    names, counts = split["class_names"], split["counts"]  # counts: split -> images per class
    per_class = [sum(row[i] for row in counts.values()) for i in range(len(names))]
    classes = ", ".join(f"{name} {n}" for name, n in zip(names, per_class, strict=True))
    parts = ", ".join(f"{sum(row)} {name}" for name, row in counts.items() if sum(row))
    return f"data: {sum(per_class)} images of {len(names)} classes in {split['root']} ({classes}): {parts}"


def held_out_line(test: Mapping[str, Any]) -> str:
    """The held-out test split's result of the best checkpoint, with the 95 % intervals when computed."""

    def part(name: str, key: str) -> str | None:
        value, ci = test.get(key), test.get(f"{key}_ci")
        if value is None:
            return None
        return f"{name} {value:.4f}" + (f" ({ci[0]:.4f} to {ci[1]:.4f})" if ci else "")

    parts = [
        p for p in (part("acc", "acc"), part("balanced acc", "balanced_acc"), part("AUROC", "auroc")) if p
    ]
    intervals = " with 95 % intervals" if test.get("acc_ci") else ""
    return f"test split, best checkpoint{intervals}: " + ", ".join(parts)


def next_steps(run_dir: Path, checkpoint: str | Path | None, tensorboard: bool) -> list[str]:
    """The commands to look at the run and use its best checkpoint, with the real paths."""
    lines = ["next steps:"]
    if tensorboard:
        lines.append(f"  tensorboard --logdir {shlex.quote(str(run_dir))}")
    if checkpoint:
        ckpt = shlex.quote(str(checkpoint))
        lines.append(f"  python eval.py ckpt_path={ckpt}")
        lines.append(f"  python predict.py ckpt_path={ckpt} input=<folder>")
    return lines if len(lines) > 1 else []
