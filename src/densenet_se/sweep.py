"""Sweeps (`python train.py -m ...`, Optuna, submitit): job directory names, the shared image cache of a sweep's
jobs, the refusal of multi-process jobs, and the sweep summary (sweep_summary.csv / .md at the sweep root).

Running each job (a failure recorded, the sweep going on) is entry-point plumbing: densenet_se.cli.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from densenet_se import distributed
from densenet_se.errors import UserError
from densenet_se.folds import aggregate_folds, folds_markdown, write_folds_csv
from densenet_se.io import atomic_write_text, csv_text
from densenet_se.metrics import BEST_KEY, best_sign, column_title, logged
from densenet_se.overrides import override_key
from densenet_se.run_guard import Refused

log = logging.getLogger("densenet_se")

STATUS_FILE = "job_status.json"
# How a job ended: completed, failed (an error), interrupted (SIGINT or SIGTERM stopped it and the sweep), or
# incomplete (no job_status.json: killed outright, or still running).
JOB_STATUSES = ("completed", "failed", "interrupted", "incomplete")
SUMMARY_CSV = "sweep_summary.csv"
SUMMARY_MD = "sweep_summary.md"
# Longer job directory names are cut and end in a hash of the full name (names stay unique and valid).
MAX_DIRNAME = 100
# The metrics each job reports: the best validation value, then every metric of the test split (METRICS).
TEST_KEYS = tuple(m.name for m in logged("test"))
CSV_COLUMNS = (
    "job",
    "status",
    "overrides",
    BEST_KEY,
    "best_epoch",
    *(f"test_{name}" for name in TEST_KEYS),
    "seconds",
    "run_dir",
    "error",
)


# ---------------------------------------------------------------------------------------------- resolvers
def _safe(text: str) -> str:
    # Brackets and quotes go; separators inside values become '-'; anything else outside [A-Za-z0-9._=-] too.
    text = re.sub(r"[\[\](){}'\"]", "", text)
    text = re.sub(r"[^A-Za-z0-9._=-]+", "-", text)
    return re.sub(r"-{2,}", "-", text).strip("-")


def _short_number(value: str) -> str:
    # Optuna's 0.0028528060291470388 reads as 0.002853 in a name; the exact value is in .hydra/overrides.yaml.
    if re.fullmatch(r"-?\d*\.\d{7,}(e-?\d+)?|-?\d\.\d{5,}e-?\d+", value):
        return f"{float(value):.4g}"
    return value


def _name_item(override: str) -> str:
    key, _, value = override.lstrip("+~").partition("=")
    return f"{_safe(key)}={_safe(_short_number(value))}"


def job_dir_name(num: Any, overrides: Sequence[str], exclude: Sequence[str] = ()) -> str:
    """`<num>_<key=value>__<key=value>...` from a job's overrides, in filename-safe characters.

    `model.block_config=[6,12,24,16]` becomes `model.block_config=6-12-24-16`, `data.root=/a b/c`
    `data.root=a-b-c` and long decimals keep 4 significant digits; hydra.* and `exclude` keys are left out.
    A name over MAX_DIRNAME characters keeps the overrides that fit whole and ends in 8 hex digits of a hash
    of the full name.
    """
    excluded = set(exclude or ())
    items = [
        _name_item(o)
        for o in overrides
        if not override_key(o).startswith("hydra.") and override_key(o) not in excluded
    ]
    body = "__".join(items)
    if len(body) > MAX_DIRNAME:
        digest = hashlib.sha1(body.encode()).hexdigest()[:8]
        kept = ""
        for item in items:  # whole overrides only: a value cut short would read as another value
            if len(kept) + len(item) + 2 > MAX_DIRNAME - 9:
                break
            kept = f"{kept}__{item}" if kept else item
        body = f"{kept or body[: MAX_DIRNAME - 9]}-{digest}"
    return f"{num}_{body}" if body else str(num)


def slurm_tasks(devices: Any) -> int:
    """SLURM tasks per node for `trainer.devices` (one task per device); 'auto' cannot be sized in advance."""
    if OmegaConf.is_list(devices) or isinstance(devices, (list, tuple)):
        return len(devices)
    if str(devices).isdigit() and int(devices) >= 1:
        return int(devices)
    raise UserError(
        f"trainer.devices={devices} cannot size a SLURM job; set trainer.devices to the number of GPUs per node "
        "(e.g. trainer.devices=4), which becomes the job's tasks and GPUs per node."
    )


def slurm_gpus(accelerator: Any, devices: Any) -> int | None:
    """GPUs per node to request: one per device, or None (no --gpus-per-node line) for CPU runs."""
    return None if str(accelerator) == "cpu" else slurm_tasks(devices)


# ---------------------------------------------------------------------------------------------- sweep jobs
def share_image_cache(cfg: DictConfig, overrides: Sequence[str]) -> None:
    """Sweep jobs use the disk cache (decoded once, shared by every job) unless data.cache was given."""
    data = cfg.get("data")
    if (
        data is None
        or data.get("cache") != "memory"
        or any(override_key(o) == "data.cache" for o in overrides)
    ):
        return
    data.cache = "disk"
    log.info("sweep job: data.cache=disk, so the jobs of this sweep decode the images only once")


def multirun_ddp_message(processes: int) -> str:
    return (
        f"a sweep (-m or hparams_search) cannot start {processes} training processes per job: Lightning starts "
        "them by re-running the command, which would restart the sweep; sweep with one device per job "
        "(trainer.devices=1), or launch the jobs with hydra/launcher=slurm so srun starts one task per device."
    )


# ---------------------------------------------------------------------------------------------- summary
def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _job_number(job_dir: Path, status: dict[str, Any] | None) -> int | None:
    if status and isinstance(status.get("job"), int):
        return status["job"]
    hydra_yaml = job_dir / ".hydra" / "hydra.yaml"
    if hydra_yaml.is_file():
        num = OmegaConf.select(OmegaConf.load(hydra_yaml), "hydra.job.num", default=None)
        if isinstance(num, int):
            return num
    head = job_dir.name.split("_", 1)[0]
    return int(head) if head.isdigit() else None


def _job_overrides(job_dir: Path, status: dict[str, Any] | None) -> list[str]:
    if status and isinstance(status.get("overrides"), list):
        return [str(o) for o in status["overrides"]]
    path = job_dir / ".hydra" / "overrides.yaml"
    return [str(o) for o in OmegaConf.load(path)] if path.is_file() else []


def job_row(job_dir: Path, sweep_dir: Path) -> dict[str, Any] | None:
    """One summary row from a job directory (metrics.json, job_status.json), or None if it is not a job."""
    status = _read_json(job_dir / STATUS_FILE)
    metrics = _read_json(job_dir / "metrics.json")
    if status is None and metrics is None and not (job_dir / ".hydra").is_dir():
        return None
    num = _job_number(job_dir, status)
    if num is None:
        return None
    metrics = metrics or {}
    test = metrics.get("test") or {}
    # No job_status.json: the job was killed (or is still running) before it could record how it ended.
    state = (status or {}).get("status", "incomplete")
    row: dict[str, Any] = {
        "job": num,
        "status": state,
        "overrides": " ".join(_job_overrides(job_dir, status)),
        BEST_KEY: metrics.get(BEST_KEY),
        "best_epoch": metrics.get("best_epoch"),
        **{f"test_{k}": test.get(k) for k in TEST_KEYS},
        "seconds": (status or {}).get("seconds", metrics.get("total_seconds")),
        "run_dir": str(job_dir.relative_to(sweep_dir)),
        "error": (status or {}).get("error")
        or ("no job_status.json: killed or still running" if not status else ""),
        "exit_code": int((status or {}).get("exit_code", 1)),
    }
    return row


def collect_jobs(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """A row per job directory under `sweep_dir`, ordered by job number."""
    sweep_dir = Path(sweep_dir)
    rows = [
        row
        for child in sorted(sweep_dir.iterdir())
        if child.is_dir() and not child.name.startswith(".")
        for row in [job_row(child, sweep_dir)]
        if row is not None
    ]
    return sorted(rows, key=lambda r: r["job"])


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4f}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def _varying(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """(overrides shared by every job, per-job overrides that differ between jobs)."""
    lists = [r["overrides"].split() for r in rows]
    common = [o for o in lists[0] if all(o in lst for lst in lists[1:])] if lists and len(lists) > 1 else []
    return common, [[o for o in lst if o not in common] for lst in lists]


def summary_markdown(sweep_dir: Path, rows: list[dict[str, Any]]) -> str:
    """sweep_summary.md: counts, the best job, the cross-validation table of a k-fold sweep, a row per job."""
    counts = {s: sum(r["status"] == s for r in rows) for s in JOB_STATUSES}
    lines = [
        "# Sweep summary",
        "",
        f"Sweep directory: `{sweep_dir}`  ",
        f"Jobs: {len(rows)} ({', '.join(f'{n} {s}' for s, n in counts.items() if n)})  ",
    ]
    scored = [r for r in rows if isinstance(r[BEST_KEY], (int, float)) and r["status"] == "completed"]
    if scored:
        best = max(scored, key=lambda r: (best_sign() * r[BEST_KEY], -r["job"]))
        lines.append(
            f"Best: job {best['job']}, {column_title(BEST_KEY)} {best[BEST_KEY]:.4f}, `{best['run_dir']}`  "
        )
    common, varying = _varying(rows)
    if common:
        lines.append(f"Overrides of every job: `{' '.join(common)}`  ")
    # The test scores (the loss is in the CSV), when some job had a test split.
    tests = [f"test_{m.name}" for m in logged("test", scored=True)]
    if not any(r[key] is not None for r in rows for key in tests):
        tests = []  # no job had a test split: no test columns
    header = ["job", "status", "overrides", column_title(BEST_KEY), "best epoch", *map(column_title, tests)]
    header += ["seconds", "run dir", "error"]
    lines += folds_markdown(aggregate_folds(rows))  # a data.fold=range(K) sweep: mean ± std per setting
    lines += ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row, own in zip(rows, varying, strict=True):
        cells = [row["job"], row["status"], f"`{' '.join(own)}`" if own else "", row[BEST_KEY]]
        cells += [row["best_epoch"], *(row[key] for key in tests)]
        seconds = f"{row['seconds']:.1f}" if isinstance(row["seconds"], (int, float)) else row["seconds"]
        cells += [seconds, f"`{row['run_dir']}`", row["error"]]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def summary_csv(rows: list[dict[str, Any]]) -> str:
    return csv_text(rows, CSV_COLUMNS)


def write_summary(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """Write sweep_summary.csv and sweep_summary.md (and sweep_folds.csv for k-fold jobs); return the rows."""
    sweep_dir = Path(sweep_dir)
    rows = collect_jobs(sweep_dir) if sweep_dir.is_dir() else []
    atomic_write_text(sweep_dir / SUMMARY_CSV, summary_csv(rows))
    write_folds_csv(sweep_dir, rows)  # sweep_folds.csv, only when the jobs are folds (densenet_se.folds)
    # The markdown holds the folds table once: summary_markdown builds it from the same rows.
    atomic_write_text(sweep_dir / SUMMARY_MD, summary_markdown(sweep_dir, rows))
    return rows


@dataclass
class SweepResult:
    """How the last sweep of this process ended (read by the entry point to choose its exit status)."""

    sweep_dir: Path
    rows: list[dict[str, Any]] = field(default_factory=list)

    @property
    def failed(self) -> list[dict[str, Any]]:
        return [r for r in self.rows if r["status"] != "completed"]

    @property
    def exit_code(self) -> int:
        """0 if every job completed, else the status the worst failed job would have had as a single run."""
        return max((r["exit_code"] or 1 for r in self.failed), default=0)

    def message(self) -> str:
        first = self.failed[0]
        return (
            f"{len(self.failed)} of {len(self.rows)} sweep jobs did not complete (job {first['job']}: "
            f"{first['error']}); see {self.sweep_dir / SUMMARY_MD}"
        )


class SweepSummary(Callback):
    """Hydra callback: refuses sweeps that Lightning cannot run, and writes the summary when a sweep ends."""

    # How the sweep that ended last in this process went (densenet_se.cli.take_last_result reads it once).
    last_result: SweepResult | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        launcher = str(OmegaConf.select(config, "hydra.launcher._target_", default=""))
        trainer = OmegaConf.select(config, "trainer", default=None)
        if trainer is None or launcher.endswith("SlurmLauncher"):
            return
        # Fail before any job starts; cli.check_multirun_launch catches what a job's overrides add.
        processes = distributed.expected_processes(trainer)
        if processes > 1 and "spawn" not in str(trainer.get("strategy", "auto")):
            # As Refused: Hydra would turn a UserError raised here into a warning and start every job anyway.
            raise Refused(UserError(multirun_ddp_message(processes)))

    def on_job_end(self, config: DictConfig, job_return: Any = None, **kwargs: Any) -> None:
        # Refreshed after every job, so a sweep that is killed or stops early still has its summary.
        if (
            str(OmegaConf.select(config, "hydra.mode", default="")) == "RunMode.MULTIRUN"
            and distributed.is_rank_zero()
        ):
            self._summarise(config)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        rows = self._summarise(config)
        done = sum(r["status"] == "completed" for r in rows)
        summary = Path(str(config.hydra.sweep.dir)).resolve() / SUMMARY_MD
        log.info("sweep summary (%d of %d jobs completed): %s", done, len(rows), summary)

    @staticmethod
    def _summarise(config: DictConfig) -> list[dict[str, Any]]:
        return summarise(Path(str(config.hydra.sweep.dir)).resolve())


def summarise(sweep_dir: Path) -> list[dict[str, Any]]:
    """Write the summary of `sweep_dir` and keep how the sweep went for the entry point's exit status."""
    rows = write_summary(sweep_dir)
    SweepSummary.last_result = SweepResult(sweep_dir, rows)
    return rows
