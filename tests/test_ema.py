"""callbacks=ema: the average follows its definition; validation, best.ckpt, test, eval, predict and export use
it; a resumed run continues it exactly."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf, open_dict
from torch import nn
from torch.optim.swa_utils import AveragedModel

from densenet_se.checkpoint import build_classifier, load_checkpoint
from densenet_se.data import ImageFolderDataModule
from densenet_se.data.images import normalize
from densenet_se.ema import ema_update
from densenet_se.train import run
from helpers.config import TINY, compose_cfg, task_cfg
from helpers.images import make_image_folder

CLASSES = {"a": 14, "b": 14, "c": 14}
EMA = ["callbacks=ema", "ema.decay=0.9", "print_config=false", "data.test_fraction=0.2"]


@pytest.mark.parametrize("warmup", [False, True])
def test_the_average_follows_its_recursion(warmup):
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    averaged = AveragedModel(model, multi_avg_fn=ema_update(0.9, warmup), use_buffers=True)
    seen = []
    for _ in range(30):
        with torch.no_grad():
            model.weight.add_(torch.randn_like(model.weight))
        seen.append(model.weight.detach().numpy().copy())
        averaged.update_parameters(model)
    want = seen[0]  # the first update copies; update n then keeps d_n of the average
    for n, current in enumerate(seen[1:], start=1):
        d = min(0.9, (1 + n) / (10 + n)) if warmup else 0.9
        want = d * want + (1 - d) * current
    assert np.allclose(averaged.module.weight.detach().numpy(), want, atol=1e-6)


def test_ema_combines_with_early_stopping(tmp_path):
    both = compose_cfg(tmp_path, ["callbacks=[ema,early_stopping]", "ema.decay=0.99"])
    assert both.callbacks.ema.decay == 0.99 and both.callbacks.early_stopping.patience == 5
    assert both.callbacks.model_checkpoint.monitor == "val/acc"


def _datamodule(cfg) -> ImageFolderDataModule:
    dm = ImageFolderDataModule(**OmegaConf.to_container(cfg.data, resolve=True))
    dm.setup()
    return dm


def _mean_loss(module: nn.Module, loader) -> float:
    losses, count = 0.0, 0
    with torch.inference_mode():
        for images, labels in loader:
            losses += float(F.cross_entropy(module(normalize(images)), labels, reduction="sum"))
            count += len(labels)
    return losses / count


def _compose(name: str, overrides: list[str], out: Path):
    cfg = task_cfg(name, overrides)
    if "output_dir" in cfg:
        with open_dict(cfg):
            cfg.output_dir = str(out)
    return cfg


@pytest.fixture(scope="module")
def ema_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("ema")
    images = make_image_folder(base / "images", CLASSES, size=40)
    cfg = compose_cfg(base, [*TINY, f"data.root={images}", *EMA, "trainer.max_epochs=3"])
    run(cfg)
    return cfg, base / "run"


@pytest.mark.slow
def test_validation_best_checkpoint_and_test_use_the_average(ema_run):
    cfg, run_dir = ema_run
    best = load_checkpoint(run_dir / "checkpoints" / "best.ckpt")
    assert set(best) >= {"state_dict", "current_model_state", "averaging_state"}
    assert int(best["averaging_state"]["n_averaged"]) == best["global_step"]  # one update per step
    averaged = build_classifier(best)
    raw = build_classifier({**best, "state_dict": best["current_model_state"]})
    dm = _datamodule(cfg)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    row = next(r for r in metrics["epochs"] if r["epoch"] == metrics["best_epoch"])
    # The logged validation loss of the best epoch is the averaged weights' loss, not the raw weights'.
    val_avg, val_raw = _mean_loss(averaged, dm.val_dataloader()), _mean_loss(raw, dm.val_dataloader())
    assert row["val_loss"] == pytest.approx(val_avg, abs=1e-5) and abs(val_avg - val_raw) > 1e-3
    # train.py's test of best.ckpt after fit: the average too (Lightning's callback would reload the raw weights).
    assert metrics["test"]["loss"] == pytest.approx(_mean_loss(averaged, dm.test_dataloader()), abs=1e-5)


@pytest.mark.slow
def test_eval_predict_and_export_read_the_average(ema_run, tmp_path):
    import densenet_se.evaluate as evaluate
    import densenet_se.export as export
    import densenet_se.predict as predict

    cfg, run_dir = ema_run
    ckpt_path = run_dir / "checkpoints" / "best.ckpt"
    best = load_checkpoint(ckpt_path)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    result = evaluate.run(_compose("eval", [f"ckpt_path={ckpt_path}", "split=test"], tmp_path / "eval"))
    assert [result[k] for k in ("acc", "f1", "auroc")] == [metrics["test"][k] for k in ("acc", "f1", "auroc")]

    image = next(Path(cfg.data.root).rglob("*.png"))
    out = tmp_path / "p.csv"
    predict.run(_compose("predict", [f"ckpt_path={ckpt_path}", f"input={image}", f"output={out}"], tmp_path))
    with open(out, newline="") as f:
        (row,) = list(csv.DictReader(f))
    got = [float(row[name]) for name in CLASSES]
    from densenet_se.data.images import load_image

    x = normalize(load_image(image, 32)[None])
    with torch.inference_mode():
        want = build_classifier(best)(x).softmax(1)[0].tolist()
        raw = build_classifier({**best, "state_dict": best["current_model_state"]})(x).softmax(1)[0].tolist()
    assert got == pytest.approx(want, abs=1e-6) and got != pytest.approx(raw, abs=1e-4)

    weights = tmp_path / "w.pt"
    export.run(
        _compose("export", [f"ckpt_path={ckpt_path}", "format=state_dict", f"output={weights}"], tmp_path)
    )
    exported = torch.load(weights, weights_only=True)
    for key, value in best["state_dict"].items():
        assert torch.equal(exported[key.removeprefix("model.")], value), key


@pytest.mark.slow
def test_resume_continues_the_average_exactly(tmp_path):
    images = make_image_folder(tmp_path / "images", CLASSES, size=40)
    args = [*TINY, f"data.root={images}", *EMA, "model.drop_rate=0.2", "augment=light"]
    run(compose_cfg(tmp_path / "whole", args))
    first = compose_cfg(tmp_path / "cut", [*args, "trainer.max_epochs=1"])
    run(first)
    cut = tmp_path / "cut" / "run"
    (cut / ".hydra").mkdir()
    OmegaConf.save(first, cut / ".hydra" / "config.yaml")
    run(compose_cfg(tmp_path / "cut", [*args, f"resume={cut}"]))
    whole = load_checkpoint(tmp_path / "whole" / "run" / "checkpoints" / "last.ckpt")
    resumed = load_checkpoint(cut / "checkpoints" / "last.ckpt")
    assert resumed["epoch"] == whole["epoch"] == 1
    for part in ("state_dict", "current_model_state", "averaging_state"):
        assert whole[part].keys() == resumed[part].keys()
        for key, value in whole[part].items():
            assert torch.allclose(resumed[part][key].float(), value.float(), atol=1e-6), (part, key)
