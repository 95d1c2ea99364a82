"""The soft-target loss and training accuracy of MixUp/CutMix, against PyTorch and numpy references."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from densenet_se.module import Classifier
from densenet_se.soft_targets import soft_cross_entropy, target_share

TINY_MODEL = dict(growth_rate=4, block_config=[1, 1], num_init_features=8, se_reduction=2)


@pytest.fixture
def logits() -> torch.Tensor:
    return torch.randn(12, 4, generator=torch.Generator().manual_seed(0)) * 2


@pytest.mark.parametrize("smoothing", [0.0, 0.2])
@pytest.mark.parametrize("weighted", [False, True])
def test_one_hot_targets_give_pytorchs_hard_label_loss(logits, smoothing, weighted):
    labels = torch.tensor([0, 1, 2, 3, 3, 2, 1, 0, 0, 0, 1, 3])
    weight = torch.tensor([0.5, 2.0, 1.0, 3.0]) if weighted else None
    want = F.cross_entropy(logits, labels, weight=weight, label_smoothing=smoothing)
    got = soft_cross_entropy(logits, F.one_hot(labels, 4).float(), weight, smoothing)
    assert float(got) == pytest.approx(float(want), rel=1e-6)


def test_unweighted_soft_targets_give_pytorchs_probability_loss(logits):
    targets = torch.softmax(torch.randn(12, 4, generator=torch.Generator().manual_seed(1)), dim=1)
    want = F.cross_entropy(logits, targets, label_smoothing=0.1)
    assert float(soft_cross_entropy(logits, targets, None, 0.1)) == pytest.approx(float(want), rel=1e-6)


def test_weighted_mixup_targets_weigh_each_image_by_its_mixed_class_weight(logits):
    # Images i mixes class a_i (share lam) and b_i: numpy from the definition in soft_cross_entropy's docstring.
    lam, a, b = 0.7, np.array([0, 1, 2, 3] * 3), np.array([1, 2, 3, 0] * 3)
    w = np.array([0.5, 2.0, 1.0, 3.0])
    targets = lam * np.eye(4)[a] + (1 - lam) * np.eye(4)[b]
    z = logits.double().numpy()
    log_p = z - z.max(1, keepdims=True) - np.log(np.exp(z - z.max(1, keepdims=True)).sum(1, keepdims=True))
    rows = np.arange(12)
    numerator = (lam * w[a] * -log_p[rows, a] + (1 - lam) * w[b] * -log_p[rows, b]).sum()
    want = numerator / (lam * w[a] + (1 - lam) * w[b]).sum()
    got = soft_cross_entropy(logits, torch.tensor(targets), torch.tensor(w, dtype=torch.float32))
    assert float(got) == pytest.approx(want, rel=1e-5)


def test_training_accuracy_under_mixing_is_the_targets_share_of_the_prediction(logits):
    rng = np.random.default_rng(0)
    targets = rng.dirichlet(np.ones(4), size=12)
    want = targets[np.arange(12), logits.numpy().argmax(1)]
    assert np.allclose(target_share(logits, torch.tensor(targets)).numpy(), want)
    labels = rng.integers(0, 4, 12)  # one-hot targets: plain accuracy
    share = target_share(logits, torch.tensor(np.eye(4)[labels])).mean()
    assert float(share) == pytest.approx(float(np.mean(logits.numpy().argmax(1) == labels)))


def test_the_module_trains_and_logs_on_soft_targets():
    module = Classifier(
        3, image_size=32, class_weights=[1.0, 2.0, 0.5], label_smoothing=0.1, model=TINY_MODEL
    )
    logged = {}
    module.log = lambda name, value, **kw: logged.__setitem__(name, value)
    x = torch.randn(6, 3, 32, 32)
    targets = torch.tensor([[0.6, 0.4, 0.0], [0.0, 1.0, 0.0], [0.3, 0.0, 0.7]] * 2)
    loss = module.training_step((x, targets), 0)
    loss.backward()
    with torch.no_grad():
        logits = module(x)
    want = soft_cross_entropy(logits, targets, torch.tensor([1.0, 2.0, 0.5]), 0.1)
    assert float(loss.detach()) == pytest.approx(float(want), rel=1e-5)
    share = targets[torch.arange(6), logits.argmax(1)].mean()
    assert float(logged["train/acc"].compute()) == pytest.approx(float(share))
