"""The metrics, each defined once: name, title, torchmetrics definition, the stages that log it, and which way is
better.

Everything that names a metric reads it from METRICS: the module logs `<stage>/<name>` (`val/acc`), metrics.json
stores `<stage>_<name>` per epoch (`val_acc`), the sweep and fold summaries have a `test_<name>` column, and
eval.py reports `<name>`. To add a metric, add one line to METRICS.

Torch-free at import (the sweep summary is written by the entry point): `Metric.build` imports torchmetrics.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

STAGES = ("train", "val", "test")


@dataclass(frozen=True)
class Metric:
    """One metric of the classifier."""

    name: str  # logged as `<stage>/<name>`, stored as `<stage>_<name>`
    title: str  # for people: "F1 (macro)"
    stages: tuple[str, ...]  # the stages that log it
    higher_is_better: bool
    # A torchmetrics.classification class and its keyword arguments besides num_classes; None: the module
    # computes it (the loss).
    torchmetric: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    # Computed from the class probabilities' ranking (AUROC), also when the decisions come from a threshold.
    from_scores: bool = False

    def build(self, num_classes: int) -> Any:
        """A fresh torchmetrics object for `num_classes` classes (it takes probabilities or logits, and labels)."""
        if self.torchmetric is None:
            raise TypeError(f"{self.name} has no torchmetrics definition; the module computes it")
        import torchmetrics.classification

        return getattr(torchmetrics.classification, self.torchmetric)(num_classes, **self.options)


METRICS: tuple[Metric, ...] = (
    Metric("acc", "accuracy", STAGES, True, "MulticlassAccuracy", {"average": "micro"}),
    Metric("f1", "F1 (macro)", ("val", "test"), True, "MulticlassF1Score", {"average": "macro"}),
    # Macro one-vs-rest; with two classes this equals the binary AUROC.
    Metric(
        "auroc", "AUROC", ("val", "test"), True, "MulticlassAUROC", {"average": "macro"}, from_scores=True
    ),
    Metric("loss", "loss", STAGES, False),  # cross-entropy (class weights and label smoothing included)
)
# The metric whose best validation value picks the best epoch: best.ckpt, `val/acc_best`, metrics.json's
# `best_val_acc` (conf/callbacks/default.yaml monitors `val/<BEST>` too).
BEST = "acc"
MONITOR = f"val/{BEST}"
BEST_KEY = f"best_val_{BEST}"


def by_name(name: str) -> Metric:
    """The metric called `name`."""
    return next(m for m in METRICS if m.name == name)


def best_sign() -> int:
    """1 when a higher value of BEST is better, else -1: the best of some values is max(best_sign() * v)."""
    return 1 if by_name(BEST).higher_is_better else -1


def logged(stage: str, scored: bool = False) -> tuple[Metric, ...]:
    """The metrics `stage` logs, in METRICS order; `scored`: only those torchmetrics computes (not the loss)."""
    return tuple(m for m in METRICS if stage in m.stages and not (scored and m.torchmetric is None))


def epoch_keys() -> tuple[str, ...]:
    """The per-epoch keys of metrics.json: `train_acc`, `train_loss`, `val_acc`, ..."""
    return tuple(f"{stage}_{m.name}" for stage in ("train", "val") for m in logged(stage))


def summary_keys() -> tuple[str, ...]:
    """The metric columns of a sweep or fold summary: the best validation value, then every test metric."""
    return (BEST_KEY, *(f"test_{m.name}" for m in logged("test")))


def column_title(key: str) -> str:
    """`test_auroc` -> `test auroc`: the column title of a summary key in sweep_summary.md."""
    return key.replace("_", " ")


@contextmanager
def partial_sample(partial: bool) -> Iterator[None]:
    """While `partial` (Lightning's sanity check: a few batches, often of one class): no torchmetrics warning that
    the targets lack a class, which says nothing about the data there. A whole split still warns."""
    if not partial:
        yield
        return
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", r"No (positive|negative) samples in targets", UserWarning)
        yield
