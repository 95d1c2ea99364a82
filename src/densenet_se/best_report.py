"""report.html for a run's best checkpoint, written by train.py at the end: validation, plus test if any.

The same page eval.py writes (densenet_se.report_html), with the default settings: argmax decisions, no TTA,
no calibration, 2,000 bootstrap resamples. The images come from the data module's cache, so nothing is decoded
twice; the report costs one inference pass over val (and test) and a few figures.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from densenet_se import bootstrap
from densenet_se.assessment import Outputs, Settings, assess
from densenet_se.checkpoint import build_classifier, load_checkpoint
from densenet_se.inference import view_logits
from densenet_se.io import atomic_write_text
from densenet_se.report_html import leakage_statement, method_facts, render, split_section

log = logging.getLogger("densenet_se")

# Highest-loss images on the end-of-run page (eval.py's top_losses= sets it there).
TOP_LOSSES = 16
# What metrics.json["test"] gains from the report: the metrics training does not log, and every interval.
TEST_KEYS = (
    *(k for name in (*bootstrap.HEADLINE, *bootstrap.BINARY) for k in (name, f"{name}_ci")),
    "ece",
    "nll",
    "brier",
    "bootstrap",
)


def write_best_report(
    run_dir: Path,
    best_path: str | Path,
    datamodule: Any,
    split_report: dict[str, Any],
    device: torch.device,
    with_test: bool,
) -> dict[str, Any] | None:
    """Write RUN/report.html for checkpoint `best_path`; returns the test split's numbers (None without test)."""
    ckpt = load_checkpoint(best_path)
    hp = ckpt["hyper_parameters"]
    module = build_classifier(ckpt, source=f"checkpoint {best_path}").to(device)
    settings = Settings(class_names=[str(c) for c in hp["class_names"]])
    sections, test = [], None
    for split in ("val", "test") if with_test else ("val",):
        images, labels, paths = datamodule.split_images(split)
        if not len(labels):
            continue
        logits = view_logits(module, images, hp, datamodule.batch_size, device)
        result = assess(Outputs(split, logits, labels, paths), settings)
        _, section = split_section(
            result,
            lambda rows, images=images: images[rows],
            module,
            hp,
            device,
            TOP_LOSSES,
            f"{split.capitalize()} split",
        )
        sections.append(section)
        if split == "test":
            test = {k: result.metrics[k] for k in TEST_KEYS if k in result.metrics}
    if not sections:
        return None
    epoch = ckpt.get("epoch")
    facts = [
        (
            "checkpoint",
            f"{Path(best_path).resolve()}" + (f" (epoch {epoch + 1})" if isinstance(epoch, int) else ""),
        ),
        ("data", f"{datamodule.root} at {hp['image_size']} px"),
        ("split and leakage", leakage_statement(split_report)),
        *method_facts(result.metrics),
    ]
    title = f"Training run {run_dir.name}: best checkpoint"
    subtitle = (
        f"{len(settings.class_names)} classes ({', '.join(settings.class_names)}); "
        f"python eval.py ckpt_path={Path(best_path).resolve()} gives the same numbers and more options"
    )
    page = render(title, subtitle, facts, sections)
    atomic_write_text(run_dir / "report.html", page, errors="backslashreplace")  # names that are not UTF-8
    log.info("report.html for the best checkpoint written to %s", run_dir)
    return test
