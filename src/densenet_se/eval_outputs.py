"""What eval.py leaves in its run directory: eval.json, predictions.csv, calibration.json, figures, report.html."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from densenet_se.assessment import Assessment, prediction_rows
from densenet_se.calibration import calibration_record
from densenet_se.io import atomic_write_bytes, atomic_write_text, csv_text
from densenet_se.report_html import FIGURES, leakage_statement, method_facts, render, split_section

# Every file write_outputs may write (the output checks refuse a directory where one would replace an input).
OUTPUT_FILES = ("eval.json", "predictions.csv", "calibration.json", "report.html", *FIGURES)


def eval_facts(m: dict[str, Any]) -> list[tuple[str, str]]:
    """The page's 'what was evaluated' table for an eval.json."""
    epoch = m.get("epoch")
    return [
        ("checkpoint", f"{m['ckpt_path']}" + (f" (epoch {epoch + 1})" if isinstance(epoch, int) else "")),
        ("split", f"{m['split']}, as listed in {m['split_file']}"),
        ("data", f"{m['data_root']} at {m['image_size']} px"),
        ("split and leakage", m.get("leakage") or leakage_statement(None)),
        *method_facts(m),
    ]


def write_outputs(
    out_dir: Path,
    result: Assessment,
    module: torch.nn.Module,
    images: torch.Tensor,
    hparams: dict[str, Any],
    device: torch.device,
    top_k: int,
    missing: int = 0,
) -> list[str]:
    """Write every output of one eval into `out_dir` (atomically); returns the file names."""
    m = result.metrics
    figures, section = split_section(
        result,
        lambda rows: images[rows],
        module,
        hparams,
        device,
        top_k,
        f"{m['split'].capitalize()} split",
        missing,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "eval.json", json.dumps(m, indent=2) + "\n")
    columns, rows = prediction_rows(result)
    # Paths and class names that are not UTF-8 are written as the bytes the file system holds.
    atomic_write_text(out_dir / "predictions.csv", csv_text(rows, columns), errors="surrogateescape")
    written = ["eval.json", "predictions.csv"]
    cal = m.get("calibration")
    if cal:
        record = calibration_record(
            cal["temperature"],
            m["class_names"],
            fitted_on={"split": "val", "n": cal.get("n"), "tta": m["tta"]},
            source={
                "checkpoint": m["ckpt_path"],
                "epoch": m.get("epoch"),
                "val_nll_before": cal.get("val_nll_before"),
                "val_nll_after": cal.get("val_nll_after"),
            },
        )
        atomic_write_text(out_dir / "calibration.json", json.dumps(record, indent=2) + "\n")
        written.append("calibration.json")
    for name, png in figures.items():
        atomic_write_bytes(out_dir / name, png)
        written.append(name)
    title = f"Evaluation: {Path(m['ckpt_path']).name} on the {m['split']} split"
    subtitle = f"{m['n']} images, {len(m['class_names'])} classes ({', '.join(m['class_names'])})"
    page = render(title, subtitle, eval_facts(m), [section])
    atomic_write_text(out_dir / "report.html", page, errors="backslashreplace")  # names that are not UTF-8
    written.append("report.html")
    return written
