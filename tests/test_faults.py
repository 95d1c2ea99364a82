"""Faults: a crash while a checkpoint is written, a non-finite loss, and a checkpoint that carries code."""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from densenet_se import safety
from densenet_se.checkpoint import build_classifier, load_checkpoint
from densenet_se.cli import describe
from densenet_se.errors import UserError
from densenet_se.module import DenseNetSEClassifier
from densenet_se.safety import AtomicCheckpointIO, NonFiniteLossGuard, with_atomic_checkpoints
from densenet_se.train import run
from helpers.config import TINY, compose_cfg
from helpers.images import make_image_folder


def tiny_cfg(tmp_path: Path, *extra: str):
    images = tmp_path / "images"
    if not images.exists():
        make_image_folder(images, {"Monkeypox": 24, "Others": 24})
    return compose_cfg(tmp_path, [*TINY, f"data.root={images}", "print_config=false", *extra])


def test_a_crash_while_saving_keeps_the_previous_file(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"epoch": 0, "w": torch.ones(3)}, path)
    real_save = torch.save

    def dies_halfway(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 the first bytes of a zip")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", dies_halfway)
    with pytest.raises(OSError, match="No space left"):
        io.save_checkpoint({"epoch": 1, "w": torch.zeros(3)}, path)
    monkeypatch.setattr(torch, "save", real_save)
    loaded = torch.load(path, weights_only=True)
    assert loaded["epoch"] == 0 and torch.equal(loaded["w"], torch.ones(3))
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]  # no temp file left behind
    with pytest.raises(TypeError):
        io.save_checkpoint({}, path, storage_options={"x": 1})


@pytest.mark.slow
def test_training_killed_while_writing_last_ckpt_can_still_resume_and_evaluate(tmp_path, monkeypatch):
    real_atomic_save = safety.atomic_torch_save

    def dies_halfway(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError(28, "No space left on device")

    def atomic_save(
        checkpoint, path
    ):  # the real atomic writer, whose torch.save dies writing epoch 2's last.ckpt
        if Path(path).name == "last.ckpt" and checkpoint["epoch"] == 1:
            monkeypatch.setattr(torch, "save", dies_halfway)
        return real_atomic_save(checkpoint, path)

    monkeypatch.setattr(safety, "atomic_torch_save", atomic_save)
    with pytest.raises(OSError, match="No space left"):
        run(tiny_cfg(tmp_path))
    monkeypatch.undo()
    checkpoints = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["best.ckpt", "last.ckpt"]
    last = load_checkpoint(checkpoints / "last.ckpt")
    assert last["epoch"] == 0
    build_classifier(last)  # evaluation and predict can use it

    run(tiny_cfg(tmp_path, f"resume={tmp_path / 'run'}"))
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert [e["epoch"] for e in metrics["epochs"]] == [0, 1]
    assert load_checkpoint(checkpoints / "last.ckpt")["epoch"] == 1


def test_a_non_finite_loss_stops_with_the_step_and_keeps_the_good_checkpoint(tmp_path, monkeypatch):
    real_step = DenseNetSEClassifier.training_step

    def diverges_in_epoch_2(self, batch, batch_idx):
        loss = real_step(self, batch, batch_idx)
        return loss * float("nan") if self.current_epoch == 1 and batch_idx == 1 else loss

    monkeypatch.setattr(DenseNetSEClassifier, "training_step", diverges_in_epoch_2)
    checkpoints = tmp_path / "run" / "checkpoints"
    with pytest.raises(UserError) as err:
        run(tiny_cfg(tmp_path, "trainer.max_epochs=3"))
    message = describe(err.value)
    last = load_checkpoint(checkpoints / "last.ckpt")
    match = re.fullmatch(
        r"training stopped: the training loss became nan at step (\d+) \(epoch 2, batch 2\); lower optim.lr "
        r"\(now 0.01\) or set trainer.gradient_clip_val=1.0; the checkpoints written before it are kept in (.+)\.",
        message,
    )
    assert match, message
    assert int(match.group(1)) == last["global_step"] + 2 and Path(match.group(2)) == checkpoints
    # The last good epoch is kept, with finite weights; nothing diverged was written.
    assert last["epoch"] == 0
    assert all(torch.isfinite(t).all() for t in last["state_dict"].values() if t.is_floating_point())
    assert load_checkpoint(checkpoints / "best.ckpt")["epoch"] == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert [e["epoch"] for e in metrics["epochs"]] == [0]


def _guard_trainer(epoch: int = 0) -> SimpleNamespace:
    return SimpleNamespace(global_step=0, current_epoch=epoch, optimizers=[], checkpoint_callback=None)


def test_guard_reads_losses_in_groups_and_before_each_checkpoint():
    guard = NonFiniteLossGuard(check_every_n_steps=3)
    trainer = _guard_trainer()
    for step, value in enumerate([1.0, float("inf")], start=1):
        trainer.global_step = step
        guard.on_train_batch_end(trainer, None, {"loss": torch.tensor(value)}, None, step - 1)
    # Two losses pending, none read yet; a checkpoint save reads them first and is refused.
    with pytest.raises(UserError, match=r"became inf at step 2 \(epoch 1, batch 2\); lower optim.lr or"):
        guard.on_save_checkpoint(trainer, None, {"state_dict": {}})

    guard = NonFiniteLossGuard(check_every_n_steps=3)
    for step in (1, 2):
        trainer.global_step = step
        guard.on_train_batch_end(
            trainer, None, torch.tensor(float("nan") if step == 1 else 0.5), None, step - 1
        )
    trainer.global_step = 3
    with pytest.raises(UserError, match=r"became nan at step 1 \(epoch 1, batch 1\)"):
        guard.on_train_batch_end(trainer, None, {"loss": torch.tensor(0.1)}, None, 2)


def test_guard_refuses_to_save_non_finite_weights():
    guard = NonFiniteLossGuard()
    state = {"model.a.weight": torch.ones(2), "model.b.bias": torch.tensor([0.0, float("nan")])}
    with pytest.raises(
        UserError, match=r"in epoch 4: the model weights became non-finite \(first: model.b.bias\)"
    ):
        guard.on_save_checkpoint(_guard_trainer(epoch=3), None, {"state_dict": state})
    guard.on_save_checkpoint(
        _guard_trainer(), None, {"state_dict": {"a": torch.ones(2), "n": torch.tensor(3)}}
    )


class RunsCode:
    """A pickle payload: unpickling it calls exec, which writes the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('ran')",))


def test_a_checkpoint_that_carries_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "payload_ran"
    pickle.loads(pickle.dumps(RunsCode(marker)))  # the payload is live: plain unpickling runs it
    assert marker.read_text() == "ran"
    marker.unlink()

    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    torch.save(
        {"state_dict": {}, "hyper_parameters": {"num_classes": 2}, "epoch": 0, "x": RunsCode(marker)}, ckpt
    )

    # Lightning's loading path (the Trainer's CheckpointIO) and the resume path both refuse it.
    with pytest.raises(UserError, match=r"refusing to load checkpoint .*last.ckpt: it needs arbitrary code"):
        AtomicCheckpointIO().load_checkpoint(ckpt, weights_only=False)
    with pytest.raises(UserError, match=r"refusing to load checkpoint .*last.ckpt: it needs arbitrary code"):
        run(tiny_cfg(tmp_path, f"resume={run_dir}"))
    assert not marker.exists()
    assert not (run_dir / "metrics.json").exists()  # stopped before any work


def test_atomic_checkpoint_io_is_added_once():
    plugins = with_atomic_checkpoints(None)
    assert [type(p) for p in plugins] == [AtomicCheckpointIO]
    assert with_atomic_checkpoints(plugins) == plugins
    assert [type(p) for p in with_atomic_checkpoints(["x"])] == [str, AtomicCheckpointIO]
