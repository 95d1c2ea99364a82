"""Bootstrap intervals: the vectorised stratified bootstrap vs a per-resample loop of torchmetrics calls.

Both compute the same statistics (accuracy, balanced accuracy, macro F1, macro AUROC and, for two classes,
sensitivity, specificity, PPV, NPV) on synthetic scores with ties. The vectorised side is timed on the full
number of resamples, --repeats times (median and minimum); the loop on --baseline-resamples resamples, its
time per resample scaled to the full number. Target (issue 12): 2,000 resamples of 10,000 images in a few
seconds (<= 5 s) on 2 CPU cores.

    OMP_NUM_THREADS=2 python benchmarks/bootstrap_speed.py --images 10000 --resamples 2000
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import torch
from torchmetrics.functional.classification import (
    multiclass_accuracy,
    multiclass_auroc,
    multiclass_f1_score,
    multiclass_precision,
    multiclass_recall,
)

from densenet_se.bootstrap import bootstrap_intervals

TARGET_SECONDS = 5.0


def scores(n: int, k: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities [n, k] rounded to 3 decimals, so scores tie as softmax outputs do, labels [n])."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, k, n)
    logits = rng.normal(size=(n, k))
    logits[np.arange(n), labels] += 1.5
    probs = np.round(np.exp(logits) / np.exp(logits).sum(1, keepdims=True), 3)
    probs[:, -1] = 1.0 - probs[:, :-1].sum(1)
    return probs, labels


def loop_seconds_per_resample(probs: np.ndarray, labels: np.ndarray, resamples: int) -> float:
    """Seconds per resample of the obvious implementation: index, then one torchmetrics call per metric."""
    k = probs.shape[1]
    p, y = torch.tensor(probs, dtype=torch.float32), torch.tensor(labels)
    members = [torch.nonzero(y == c).flatten() for c in range(k)]
    generator = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    for _ in range(resamples):
        idx = torch.cat([m[torch.randint(len(m), (len(m),), generator=generator)] for m in members])
        pp, yy = p[idx], y[idx]
        multiclass_accuracy(pp, yy, k, average="micro")
        multiclass_accuracy(pp, yy, k, average="macro")
        multiclass_f1_score(pp, yy, k, average="macro")
        multiclass_auroc(pp, yy, k, average="macro")
        if k == 2:
            multiclass_recall(pp, yy, k, average=None)
            multiclass_precision(pp, yy, k, average=None)
    return (time.perf_counter() - start) / resamples


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--resamples", type=int, default=2_000)
    parser.add_argument("--classes", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--baseline-resamples", type=int, default=20)
    args = parser.parse_args(argv)
    probs, labels = scores(args.images, args.classes)
    preds = probs.argmax(1)
    positive = 0 if args.classes == 2 else None
    bootstrap_intervals(probs[:200], labels[:200], preds[:200], 10, 0, 0.95, positive)  # warm-up
    times = []
    for repeat in range(args.repeats):
        start = time.perf_counter()
        bootstrap_intervals(probs, labels, preds, args.resamples, repeat, 0.95, positive)
        times.append(time.perf_counter() - start)
    per_resample = loop_seconds_per_resample(probs, labels, args.baseline_resamples)
    loop = per_resample * args.resamples
    ours = statistics.median(times)
    print(
        f"{args.resamples} resamples of {args.images} images, {args.classes} classes, "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, load {os.getloadavg()[0]:.2f}"
    )
    print(f"{'method':<40} {'median s':>9} {'min s':>8}")
    print(f"{'vectorised (densenet_se.bootstrap)':<40} {ours:>9.3f} {min(times):>8.3f}")
    print(f"{'torchmetrics per resample (scaled)':<40} {loop:>9.3f} {'':>8}")
    print(f"speed-up: {loop / ours:.1f}x")
    verdict = "met" if ours <= TARGET_SECONDS else "NOT met"
    print(f"target <= {TARGET_SECONDS:g} s: {ours:.3f} s {verdict}")


if __name__ == "__main__":
    main()
