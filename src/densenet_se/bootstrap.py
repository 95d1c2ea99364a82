"""Stratified percentile bootstrap over images: how far each headline metric could move on another sample.

Each resample draws, within every true class, as many images as the class has, with replacement. A resample
is then a vector of draw counts per image, and every statistic is a weighted count: the confusion matrix from
summed weights per (true, predicted) pair, the AUROC from weighted rank sums (Mann-Whitney, ties counted
half), so 2,000 resamples of 10,000 images are a few array passes, not 2,000 metric calls. The point estimates
themselves come from torchmetrics (densenet_se.evaluate); the statistics below use the same definitions
(macro averages over the classes with tp + fp + fn > 0, as torchmetrics averages them).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from statistics import NormalDist

import numpy as np

from densenet_se.errors import UserError

# Resamples per block: bounds memory at about CHUNK * N * 8 bytes per array whatever bootstrap.n is.
CHUNK = 100
# The statistics an interval is reported for (key in eval.json -> name for people); BINARY: two classes only.
HEADLINE = {"acc": "accuracy", "balanced_acc": "balanced accuracy", "f1": "F1 (macro)", "auroc": "AUROC"}
BINARY = {"sensitivity": "sensitivity", "specificity": "specificity", "ppv": "PPV", "npv": "NPV"}
# The metrics that are one proportion (successes / trials): at 0 or 1 every resample gives the same value.
PROPORTIONS = ("acc", "sensitivity", "specificity", "ppv", "npv")


MAX_RESAMPLES = 100_000


def check_settings(n: int, level: float) -> None:
    """UserError for bootstrap.n outside [0, MAX_RESAMPLES] or bootstrap.level outside (0, 1)."""
    if not 0 <= n <= MAX_RESAMPLES:
        raise UserError(f"bootstrap.n={n} is out of range; it must be 0 (no intervals) to {MAX_RESAMPLES:,}.")
    if not 0.0 < level < 1.0:
        raise UserError(f"bootstrap.level={level:g} is out of range; it must be in (0, 1), e.g. 0.95.")


def stratified_counts(labels: np.ndarray, n: int, seed: int, chunk: int = CHUNK) -> Iterator[np.ndarray]:
    """Blocks of float64 [b, N] draw counts: each row resamples every class's images with replacement."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    members = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        # Images sorted by class (as bootstrap_intervals passes them) fill a block by slices, not scatter.
        contiguous = idx[-1] - idx[0] + 1 == len(idx)
        members.append((slice(idx[0], idx[-1] + 1) if contiguous else idx, len(idx)))
    for start in range(0, n, chunk):
        b = min(chunk, n - start)
        counts = np.empty((b, len(labels)))
        for where, size in members:
            draws = rng.integers(0, size, size=(b, size), dtype=np.int64)
            flat = (draws + np.arange(b)[:, None] * size).ravel()
            counts[:, where] = np.bincount(flat, minlength=b * size).reshape(b, size)
        yield counts


def confusion_matrices(counts: np.ndarray, labels: np.ndarray, preds: np.ndarray, k: int) -> np.ndarray:
    """[b, k, k] confusion matrices (rows: true) of the weighted resamples `counts` [b, N]."""
    pair = np.asarray(labels) * k + np.asarray(preds)
    order = np.argsort(pair, kind="stable")
    sorted_pair = pair[order]
    starts = np.flatnonzero(np.r_[True, sorted_pair[1:] != sorted_pair[:-1]])
    sums = np.add.reduceat(counts[:, order], starts, axis=1)
    out = np.zeros((counts.shape[0], k * k))
    out[:, sorted_pair[starts]] = sums
    return out.reshape(-1, k, k)


def _safe(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1), 0.0)


def confusion_statistics(cm: np.ndarray, positive: int | None) -> dict[str, np.ndarray]:
    """acc, balanced_acc (macro recall), macro F1 and, for two classes, sensitivity/specificity/PPV/NPV."""
    tp = np.diagonal(cm, axis1=1, axis2=2)
    actual, predicted = cm.sum(axis=2), cm.sum(axis=1)
    fn, fp = actual - tp, predicted - tp
    used = (tp + fp + fn) > 0  # torchmetrics' macro average leaves out classes absent from both
    n_used = np.maximum(used.sum(axis=1), 1)
    out = {
        "acc": tp.sum(axis=1) / cm.sum(axis=(1, 2)),
        "balanced_acc": (_safe(tp, actual) * used).sum(axis=1) / n_used,
        "f1": (_safe(2 * tp, 2 * tp + fp + fn) * used).sum(axis=1) / n_used,
    }
    if positive is not None:
        negative = 1 - positive
        nan = np.full(len(cm), np.nan)
        with np.errstate(divide="ignore", invalid="ignore"):
            # Undefined in a resample (e.g. no positive call, so no PPV): left out of the percentiles.
            for name, c, den in (
                ("sensitivity", positive, actual),
                ("specificity", negative, actual),
                ("ppv", positive, predicted),
                ("npv", negative, predicted),
            ):
                out[name] = np.where(den[:, c] > 0, tp[:, c] / np.where(den[:, c] > 0, den[:, c], 1), nan)
    return out


class RankSums:
    """One-vs-rest AUROC of class scores under resampling weights (weighted Mann-Whitney U, ties half)."""

    def __init__(self, scores: np.ndarray, is_positive: np.ndarray) -> None:
        self.pos = np.flatnonzero(is_positive)
        neg = np.flatnonzero(~np.asarray(is_positive, dtype=bool))
        self.neg = neg[np.argsort(scores[neg], kind="stable")]
        ranked = scores[self.neg]
        # For each positive: how many negatives score below it, and how many at most as high (ties between).
        self.below = np.searchsorted(ranked, scores[self.pos], side="left")
        self.upto = np.searchsorted(ranked, scores[self.pos], side="right")

    def auroc(self, counts: np.ndarray) -> np.ndarray:
        """[b] AUROC per resample; 0 where a class has no positive or no negative (as torchmetrics)."""
        cum = np.zeros((counts.shape[0], len(self.neg) + 1))
        np.cumsum(counts[:, self.neg], axis=1, out=cum[:, 1:])
        pos = counts[:, self.pos]
        # A tied negative counts half: below + (upto - below) / 2.
        wins = 0.5 * (pos * (cum[:, self.below] + cum[:, self.upto])).sum(axis=1)
        return _safe(wins, pos.sum(axis=1) * cum[:, -1])


def resampled_statistics(
    counts: np.ndarray,
    probs: np.ndarray,
    labels: np.ndarray,
    preds: np.ndarray,
    positive: int | None = None,
    ranks: list[RankSums] | None = None,
) -> dict[str, np.ndarray]:
    """Every statistic of the resamples `counts` [b, N]; `auroc_per_class` is [b, k] (macro AUROC its mean)."""
    k = probs.shape[1]
    labels = np.asarray(labels)
    ranks = ranks or [RankSums(probs[:, c], labels == c) for c in range(k)]
    out = confusion_statistics(confusion_matrices(counts, labels, preds, k), positive)
    per_class = np.stack([r.auroc(counts) for r in ranks], axis=1)
    out["auroc_per_class"] = per_class
    out["auroc"] = per_class.mean(axis=1)
    return out


def percentile_interval(values: np.ndarray, level: float) -> np.ndarray | None:
    """[low, high] percentiles enclosing `level` of the finite resampled values (per column for 2-D input)."""
    tail = (1.0 - level) / 2.0
    finite = np.isfinite(values)
    if not finite.any(axis=0).all():
        return None
    return np.nanquantile(np.where(finite, values, np.nan), [tail, 1.0 - tail], axis=0)


def bootstrap_intervals(
    probs: np.ndarray,
    labels: np.ndarray,
    preds: np.ndarray,
    n: int,
    seed: int,
    level: float,
    positive: int | None = None,
) -> dict[str, list[float] | list[list[float]] | None]:
    """`level` percentile intervals of the headline metrics over `n` stratified resamples of the images.

    `preds` are the decisions (argmax or a threshold), held fixed; `positive` (two classes) adds the binary
    metrics. `auroc_per_class` is a list of [low, high], one per class.
    """
    order = np.argsort(np.asarray(labels), kind="stable")  # classes contiguous: resampled by slices
    probs = np.asarray(probs, dtype=np.float64)[order]
    labels, preds = np.asarray(labels)[order], np.asarray(preds)[order]
    ranks = [RankSums(probs[:, c], labels == c) for c in range(probs.shape[1])]
    blocks: dict[str, list[np.ndarray]] = {}
    for counts in stratified_counts(labels, n, seed):
        for name, values in resampled_statistics(counts, probs, labels, preds, positive, ranks).items():
            blocks.setdefault(name, []).append(values)
    out: dict[str, list[float] | list[list[float]] | None] = {}
    for name, parts in blocks.items():
        bounds = percentile_interval(np.concatenate(parts), level)
        if bounds is None:
            out[name] = None
        elif bounds.ndim == 2:
            out[name] = [[float(lo), float(hi)] for lo, hi in bounds.T]
        else:
            out[name] = [float(bounds[0]), float(bounds[1])]
    return out


def wilson_interval(successes: int, trials: int, level: float) -> list[float]:
    """Wilson score interval of a proportion: stays honest at 0 or n successes, where the bootstrap cannot vary.

    With no errors among n images the percentile bootstrap gives [1, 1]; Wilson gives about [1 - 3.8/n, 1].
    """
    z = NormalDist().inv_cdf(0.5 + level / 2.0)
    p = successes / trials
    centre = (p + z * z / (2 * trials)) / (1 + z * z / trials)
    half = z / (1 + z * z / trials) * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials))
    return [max(0.0, centre - half), min(1.0, centre + half)]
