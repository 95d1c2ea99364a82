"""Cross-validation summaries: the jobs of a `data.fold=range(K)` sweep as mean ± std per setting.

A sweep row (densenet_se.sweep.job_row) has `overrides` and the job's metrics; rows whose overrides differ only
in `data.fold` are the folds of one setting. The standard deviation is the sample one (n - 1), over the
folds that completed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from densenet_se.io import atomic_write_text, csv_text
from densenet_se.metrics import column_title, summary_keys
from densenet_se.overrides import override_key, override_value

FOLDS_CSV = "sweep_folds.csv"
FOLD_KEY = "data.fold"
# (row key, column title in the markdown table): the best validation value, then each test metric (METRICS).
FOLD_METRICS = tuple((key, column_title(key)) for key in summary_keys())


def _overrides(row: dict[str, Any]) -> list[str]:
    value = row.get("overrides") or []
    return value.split() if isinstance(value, str) else [str(o) for o in value]


def fold_of(overrides: Sequence[str]) -> int | None:
    """The `data.fold=i` of a job's overrides, or None for a job that is not one fold of several."""
    for override in overrides:
        if override_key(override) == FOLD_KEY:
            value = override_value(override) or ""
            return int(value) if value.strip().lstrip("-").isdigit() else None
    return None


def mean_std(values: Sequence[float | None]) -> tuple[float | None, float | None, int]:
    """(mean, sample standard deviation, n) of the finite values; std is None for fewer than 2 values."""
    finite = [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    n = len(finite)
    if n == 0:
        return None, None, 0
    mean = math.fsum(finite) / n
    if n < 2:
        return mean, None, n
    return mean, math.sqrt(math.fsum((v - mean) ** 2 for v in finite) / (n - 1)), n


def aggregate_folds(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per setting (the overrides other than data.fold), in order of first job: mean ± std of
    FOLD_METRICS over its completed folds. Empty when no job has a `data.fold` override."""
    settings: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for row in rows:
        overrides = _overrides(row)
        if fold_of(overrides) is None:
            continue
        setting = tuple(o for o in overrides if override_key(o) != FOLD_KEY)
        settings.setdefault(setting, []).append(row)
    out = []
    for setting, jobs in settings.items():
        done = [r for r in jobs if r.get("status") == "completed"]
        summary: dict[str, Any] = {
            "overrides": " ".join(setting),
            "folds": " ".join(str(f) for f in sorted(fold_of(_overrides(r)) for r in done)),
            "completed": len(done),
            "jobs": len(jobs),
        }
        for key, _ in FOLD_METRICS:
            mean, std, n = mean_std([r.get(key) for r in done])
            summary.update({f"{key}_mean": mean, f"{key}_std": std, f"{key}_n": n})
        out.append(summary)
    return out


def folds_csv(summaries: Sequence[dict[str, Any]]) -> str:
    """sweep_folds.csv: one row per setting, a mean, std and n column per metric."""
    columns = ["overrides", "folds", "completed", "jobs"]
    columns += [f"{key}_{part}" for key, _ in FOLD_METRICS for part in ("mean", "std", "n")]
    return csv_text(summaries, columns)


def _plus_minus(mean: float | None, std: float | None) -> str:
    if mean is None:
        return ""
    return f"{mean:.4f} ± {std:.4f}" if std is not None else f"{mean:.4f}"


def folds_markdown(summaries: Sequence[dict[str, Any]]) -> list[str]:
    """Markdown lines for sweep_summary.md: a mean ± std table, one row per setting, then the title of the
    per-job table that follows ([] when there are no fold jobs)."""
    if not summaries:
        return []
    shown = [(key, title) for key, title in FOLD_METRICS if any(s[f"{key}_n"] for s in summaries)]
    settings = [s["overrides"].split() for s in summaries]
    # Show what tells the settings apart (one setting: nothing, as the per-job table lists the overrides).
    common = [o for o in settings[0] if all(o in other for other in settings[1:])]
    lines = [
        "",
        "**Cross-validation: mean ± std over folds.** Jobs that differ only in `data.fold` are the folds of "
        "one setting; ± is the sample standard deviation (n - 1) over its completed folds "
        f"(also in `{FOLDS_CSV}`).",
        "",
        "| setting | folds completed | " + " | ".join(title for _, title in shown) + " |",
        "|" + "---|" * (2 + len(shown)),
    ]
    for summary, overrides in zip(summaries, settings, strict=True):
        own = " ".join(o for o in overrides if o not in common)
        cells = [f"`{own}`" if own else "(every job)", f"{summary['completed']} of {summary['jobs']}"]
        cells += [_plus_minus(summary[f"{key}_mean"], summary[f"{key}_std"]) for key, _ in shown]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return [*lines, "", "**Every job:**"]


def write_folds_csv(sweep_dir: str | Path, rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Write sweep_folds.csv at `sweep_dir` when the sweep has fold jobs; return the per-setting summaries."""
    summaries = aggregate_folds(rows)
    if summaries:
        atomic_write_text(Path(sweep_dir) / FOLDS_CSV, folds_csv(summaries))
    return summaries
