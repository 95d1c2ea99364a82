"""experiment=finetune: pretrained weights from a state-dict file, a frozen then slower backbone, a full-rate head."""

from __future__ import annotations

import pytest
import torch

from densenet_se.checkpoint import load_checkpoint
from densenet_se.config import validate
from densenet_se.errors import UserError
from densenet_se.models import DenseNetSE
from densenet_se.module import Classifier
from densenet_se.train import run
from helpers.config import TINY, compose_cfg
from helpers.images import make_image_folder

LAYOUT = dict(growth_rate=4, block_config=[1, 1], num_init_features=8, se_reduction=2)
HEAD = ("classifier.", "se.")


def _pretrained_file(tmp_path) -> tuple[str, dict[str, torch.Tensor]]:
    torch.manual_seed(1)
    state = DenseNetSE(2, **LAYOUT).state_dict()
    path = tmp_path / "pretrained.pt"
    torch.save(state, path)
    return str(path), state


@pytest.mark.slow
def test_experiment_composes_the_recipe(tmp_path):
    cfg = compose_cfg(tmp_path, ["experiment=finetune"])
    assert cfg.model.pretrained == "imagenet" and list(cfg.model.block_config) == [6, 12, 24, 16]
    assert (cfg.optim.freeze_epochs, cfg.optim.backbone_lr_mult, cfg.optim.lr) == (2, 0.1, 1e-3)
    assert cfg.augment.policy == "light"


def test_head_trains_at_lr_and_backbone_at_its_share():
    module = Classifier(3, lr=0.01, backbone_lr_mult=0.1, model={**LAYOUT, "se_placement": "blocks"})
    groups = {g["name"]: g for g in module.configure_optimizers().param_groups}
    assert groups["head"]["lr"] == 0.01 and groups["backbone"]["lr"] == pytest.approx(0.001)
    names = {id(p): n for n, p in module.model.named_parameters()}
    head = sorted(names[id(p)] for p in groups["head"]["params"])
    backbone = [names[id(p)] for p in groups["backbone"]["params"]]
    assert head == sorted(n for n in names.values() if n.startswith((*HEAD, "features.se")))
    assert sorted(head + backbone) == sorted(names.values())  # every parameter exactly once
    assert any(n.startswith("features.se1.") for n in head)  # SE inside the blocks is head too
    plain = Classifier(3, lr=0.01, model=LAYOUT).configure_optimizers()
    assert len(plain.param_groups) == 1 and plain.param_groups[0]["lr"] == 0.01


@pytest.mark.slow
@pytest.mark.parametrize("epochs", [1, 2])
def test_backbone_stays_pretrained_while_frozen_then_learns(tmp_path, epochs):
    pretrained, state = _pretrained_file(tmp_path)
    images = make_image_folder(tmp_path / "images", {"a": 12, "b": 12})
    overrides = [*TINY, "experiment=finetune", f"model.pretrained={pretrained}"]
    cfg = compose_cfg(tmp_path, [*overrides, f"data.root={images}", "optim.freeze_epochs=1"])
    cfg.trainer.max_epochs = epochs
    run(cfg)
    trained = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")["state_dict"]
    backbone = [k for k in state if not k.startswith(HEAD)]
    changed = {k for k in backbone if not torch.equal(trained[f"model.{k}"], state[k])}
    if epochs == 1:  # frozen: weights and BatchNorm statistics exactly as loaded
        assert changed == set()
    else:
        assert {k for k in changed if k.endswith("conv0.weight")} and {k for k in changed if "running_" in k}
    assert not torch.equal(trained["model.classifier.weight"], state["classifier.weight"])


def test_bad_finetune_settings_are_one_sentence(tmp_path):
    with pytest.raises(
        UserError, match=r"^optim.backbone_lr_mult=2.0 is out of range; it must be a number in \[0, 1\]"
    ):
        validate(compose_cfg(tmp_path, ["optim.backbone_lr_mult=2"]))
    with pytest.raises(UserError, match=r"needs trainer.strategy=ddp_find_unused_parameters_true"):
        validate(compose_cfg(tmp_path, ["trainer=ddp", "optim.freeze_epochs=1"]))
