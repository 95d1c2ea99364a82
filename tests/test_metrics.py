"""METRICS: each definition against scikit-learn, and every place that names a metric reads it from METRICS."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, f1_score, roc_auc_score

from densenet_se import callbacks, folds, sweep
from densenet_se.evaluate import compute_metrics
from densenet_se.metrics import (
    BEST_KEY,
    METRICS,
    MONITOR,
    best_sign,
    by_name,
    epoch_keys,
    logged,
    summary_keys,
)
from densenet_se.module import Classifier


def _sample(k: int, n: int = 60, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)
    labels = torch.tensor(np.r_[np.arange(k), rng.integers(0, k, n - k)])  # every class present
    logits = torch.tensor(rng.normal(size=(n, k))) + 1.5 * torch.nn.functional.one_hot(labels, k)
    return logits.float().softmax(dim=1), labels


# name -> scikit-learn's value from (labels, probabilities)
REFERENCE = {
    "acc": lambda y, p: accuracy_score(y, p.argmax(1)),
    "f1": lambda y, p: f1_score(y, p.argmax(1), average="macro"),
    "auroc": lambda y, p: (
        roc_auc_score(y, p[:, 1]) if p.shape[1] == 2 else roc_auc_score(y, p, multi_class="ovr")
    ),
}


@pytest.mark.parametrize("k", [2, 3])
def test_each_scored_metric_is_the_textbook_one(k):
    probs, labels = _sample(k)
    scored = [m.name for m in METRICS if m.torchmetric is not None]
    assert sorted(scored) == sorted(REFERENCE)
    out = compute_metrics(probs, labels, [f"c{i}" for i in range(k)], None)
    for name in scored:
        expected = REFERENCE[name](labels.numpy(), probs.numpy())
        assert float(by_name(name).build(k)(probs, labels)) == pytest.approx(expected, abs=1e-6), name
        assert out[name] == pytest.approx(expected, abs=1e-6), name


def test_every_list_of_metric_names_comes_from_metrics():
    assert (
        callbacks.EPOCH_KEYS
        == epoch_keys()
        == tuple(f"{stage}_{m.name}" for stage in ("train", "val") for m in METRICS if stage in m.stages)
    )
    test_columns = [f"test_{m.name}" for m in METRICS if "test" in m.stages]
    assert [c for c in sweep.CSV_COLUMNS if c.startswith(("test_", "best_val"))] == [BEST_KEY, *test_columns]
    assert [key for key, _ in folds.FOLD_METRICS] == list(summary_keys()) == [BEST_KEY, *test_columns]
    module = Classifier(
        3, model={"growth_rate": 4, "block_config": [1], "num_init_features": 8, "se_reduction": 2}
    )
    for stage, collection in (
        ("train", module.train_metrics),
        ("val", module.val_metrics),
        ("test", module.test_metrics),
    ):
        assert sorted(collection.keys()) == sorted(m.name for m in logged(stage, scored=True))


def test_the_yaml_callbacks_monitor_the_best_epoch_metric():
    from omegaconf import OmegaConf

    from helpers.config import CONF

    mode = "max" if best_sign() > 0 else "min"
    for name in ("default", "early_stopping"):
        node = OmegaConf.load(CONF / "callbacks" / f"{name}.yaml")
        watchers = [v for v in node.values() if OmegaConf.is_dict(v) and v.get("monitor")]
        assert watchers, name
        assert all((w.monitor, w.mode) == (MONITOR, mode) for w in watchers), name
