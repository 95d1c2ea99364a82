"""The Classifier without a Trainer: loss options, optimisers, schedules, plain hyperparameters."""

from __future__ import annotations

import pytest
import torch

from densenet_se.errors import UserError
from densenet_se.module import SCHEDULERS, Classifier, DenseNetSEClassifier
from helpers.crafted import TINY_MODEL


def make(**kwargs) -> Classifier:
    return Classifier(
        num_classes=3, class_names=["a", "b", "c"], image_size=32, **{"model": TINY_MODEL, **kwargs}
    )


def test_hparams_are_plain_python_values():
    module = make(model={**TINY_MODEL, "block_config": (1, 1)}, class_weights=(1, 2, 3))
    hp = dict(module.hparams)
    assert hp["model"]["block_config"] == [1, 1] and hp["class_weights"] == [1.0, 2.0, 3.0]
    # One nested dict of the arch's settings, every key of it (the defaults filled in).
    assert hp["model"]["arch"] == "densenet_se" and hp["model"]["se_placement"] == "head"

    def plain(v):
        return (
            v is None
            or isinstance(v, (bool, int, float, str))
            or (isinstance(v, list) and all(plain(x) for x in v))
            or (isinstance(v, dict) and all(isinstance(k, str) and plain(x) for k, x in v.items()))
        )

    assert all(plain(v) for v in hp.values()), hp


def test_class_weights_change_the_loss_and_must_match_classes():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
    y = torch.tensor([1, 1])
    plain_loss = make()._loss(logits, y)
    weighted = make(class_weights=[1.0, 5.0, 1.0])._loss(logits, y)
    # Only class 1 is present, so the weighted mean equals the unweighted one; mixing classes changes it.
    assert weighted == pytest.approx(plain_loss.item())
    mixed = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.5, 0.0]])
    y2 = torch.tensor([0, 1])
    # The harder sample (class 1) gets 5x the weight, so the weighted mean loss is higher.
    assert make(class_weights=[1.0, 5.0, 1.0])._loss(mixed, y2) > make()._loss(mixed, y2) + 0.05
    with pytest.raises(UserError, match="optim.class_weights has 2 values but the data has 3 classes"):
        make(class_weights=[1.0, 2.0])


def test_label_smoothing_raises_the_loss_of_confident_right_answers():
    logits = torch.tensor([[8.0, 0.0, 0.0]])
    y = torch.tensor([0])
    assert make(label_smoothing=0.2)._loss(logits, y) > make()._loss(logits, y)


@pytest.mark.parametrize(
    "name, cls", [("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW), ("sgd", torch.optim.SGD)]
)
def test_optimizers(name, cls):
    opt = make(optimizer=name, lr=0.05, weight_decay=0.01).configure_optimizers()
    assert isinstance(opt, cls)
    assert opt.param_groups[0]["lr"] == 0.05 and opt.param_groups[0]["weight_decay"] == 0.01


@pytest.mark.parametrize("scheduler", sorted(set(SCHEDULERS) - {"none"}))
def test_schedulers_are_configured(scheduler):
    out = make(scheduler=scheduler, warmup_epochs=0).configure_optimizers()
    assert isinstance(out, dict) and "lr_scheduler" in out
    if scheduler == "plateau":
        assert out["lr_scheduler"]["monitor"] == "val/acc"


def test_warmup_starts_at_a_tenth_of_lr():
    out = make(lr=0.1, warmup_epochs=2, scheduler="cosine").configure_optimizers()
    assert out["optimizer"].param_groups[0]["lr"] == pytest.approx(0.01)


def test_predict_step_returns_probabilities():
    module = make().eval()
    probs = module.predict_step(torch.randn(4, 3, 32, 32), 0)
    assert probs.shape == (4, 3)
    assert torch.allclose(probs.sum(dim=1), torch.ones(4), atol=1e-6)
    assert (probs >= 0).all()


@pytest.mark.slow
def test_state_dict_keys_do_not_depend_on_compile_flag():
    assert set(make().state_dict()) == set(make(model={**TINY_MODEL, "compile": True}).state_dict())


def test_the_old_name_and_flat_settings_build_the_same_module_and_other_archs_keys_are_refused():
    assert DenseNetSEClassifier is Classifier
    torch.manual_seed(0)
    nested = make()
    torch.manual_seed(0)  # code written before model.arch passes the settings one by one
    flat = DenseNetSEClassifier(num_classes=3, class_names=["a", "b", "c"], image_size=32, **TINY_MODEL)
    assert flat.hparams.model == nested.hparams.model and "growth_rate" not in flat.hparams
    assert flat.state_dict().keys() == nested.state_dict().keys()
    assert all(torch.equal(v, nested.state_dict()[k]) for k, v in flat.state_dict().items())
    with pytest.raises(ValueError, match=r"^model.lrr is not a setting of model.arch=densenet_se"):
        make(lrr=0.1)  # a misspelt keyword is not swallowed
    with pytest.raises(
        ValueError, match=r"^model.name is not a setting of model.arch=densenet_se; its settings"
    ):
        make(model={"name": "resnet18"})
    with pytest.raises(
        ValueError, match=r"^model.arch='resnet' is not allowed; choose one of: densenet_se, "
    ):
        make(model={"arch": "resnet"})
