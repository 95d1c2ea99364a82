"""resume=RUN_DIR: a run SIGKILLed mid-epoch continues in its own directory, with its own config, to the
metrics of an uninterrupted run; bad resume requests are one clear sentence."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from densenet_se.callbacks import EPOCH_KEYS, SeedEachEpoch
from densenet_se.errors import UserError
from densenet_se.resume import RESUMABLE_KEYS, ResumeSession, find_run_dir, resumed_config
from densenet_se.train import run
from helpers.config import TINY, compose_cfg
from helpers.images import make_image_folder
from helpers.runs import train_process

# Dropout and augmentation on: a resumed run must also repeat their random draws.
ARGS = [*TINY, "trainer.max_epochs=3", "model.drop_rate=0.2", "augment=light", "print_config=false"]


def train_py(args: list[str], cwd: Path) -> subprocess.Popen:
    return train_process(args, cwd, stderr=subprocess.STDOUT)


def scalars(event_dir: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(event_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


@pytest.mark.slow
@pytest.mark.subprocess
def test_killed_run_resumes_to_the_metrics_of_an_uninterrupted_run(tmp_path):
    images = make_image_folder(tmp_path / "images", {"Monkeypox": 24, "Others": 24})
    args = [*ARGS, f"data.root={images}", f"paths.cache_dir={tmp_path / 'cache'}"]

    # The uninterrupted run (in-process: the same code the CLI runs).
    run(compose_cfg(tmp_path / "ref", args))
    ref_dir = tmp_path / "ref" / "run"
    reference = json.loads((ref_dir / "metrics.json").read_text())

    # The same run from the command line, SIGKILLed in its second epoch (a space and a non-ASCII letter in
    # its path), held there by a test callback until the kill lands.
    run_dir = tmp_path / "killed run ü"
    marker = tmp_path / "paused"
    proc = train_py(
        [
            *args,
            f"hydra.run.dir='{run_dir}'",
            "+callbacks.pause._target_=helpers.faultinject.PauseAtBatch",
            f"+callbacks.pause.marker={marker}",
        ],
        cwd=tmp_path,
    )
    deadline = time.monotonic() + 600  # a safety net for a hung run, not a timing assertion
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    proc.kill()
    output = proc.communicate()[0]
    assert marker.exists(), output[-3000:]
    assert proc.returncode == -9
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["epoch"] == 0
    assert [e["epoch"] for e in json.loads((run_dir / "metrics.json").read_text())["epochs"]] == [0]
    # The pause callback was this test's instrument, and a resumed run creates only the callbacks our config
    # groups define (densenet_se.rundir): it goes before resuming.
    saved = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    del saved.callbacks["pause"]
    OmegaConf.save(saved, run_dir / ".hydra" / "config.yaml")
    hydra_files = {p.name: p.read_bytes() for p in (run_dir / ".hydra").iterdir()}

    resumed = train_py([f"resume='{run_dir}'"], cwd=tmp_path)
    output = resumed.communicate(timeout=600)[0]
    assert resumed.returncode == 0, output[-3000:]

    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert [e["epoch"] for e in metrics["epochs"]] == [0, 1, 2]
    for got, want in zip(metrics["epochs"], reference["epochs"], strict=True):
        for key in EPOCH_KEYS:
            assert got[key] == pytest.approx(want[key], abs=1e-6), (got["epoch"], key)
    assert metrics["best_epoch"] == reference["best_epoch"]
    assert metrics["best_val_acc"] == pytest.approx(reference["best_val_acc"], abs=1e-6)
    assert Path(metrics["best_checkpoint"]).parent == (run_dir / "checkpoints").resolve()
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 2

    # TensorBoard: one event dir, a second event file, and the curves continue at the same steps.
    events = sorted((run_dir / "tensorboard").rglob("events.out.tfevents.*"))
    assert len(events) == 2 and {e.parent for e in events} == {run_dir / "tensorboard"}
    for tag in ("train/loss", "val/acc", "val/acc_best"):
        got, want = scalars(run_dir / "tensorboard", tag), scalars(ref_dir / "tensorboard", tag)
        assert [s for s, _ in got] == [s for s, _ in want], tag
        assert [v for _, v in got] == pytest.approx([v for _, v in want], abs=1e-6), tag

    # The original .hydra/ files are kept; the resumed session recorded its own beside them.
    assert {p.name: p.read_bytes() for p in (run_dir / ".hydra").iterdir() if p.is_file()} == hydra_files
    (session,) = (run_dir / ".hydra").glob("resume-*")
    assert OmegaConf.load(session / "overrides.yaml") == [f"resume='{run_dir}'"]
    assert OmegaConf.load(session / "config.yaml").trainer.max_epochs == 3
    log_text = (run_dir / "train.log").read_text()
    assert [log_text.count(f"epoch {n}/3 ") for n in (1, 2, 3)] == [1, 1, 1]
    assert "resuming" in log_text and not list(run_dir.rglob("*.tmp"))


@pytest.mark.slow
@pytest.mark.subprocess
def test_missing_run_dir_is_one_line_and_creates_nothing(tmp_path):
    proc = train_py(["resume=no/such/run"], cwd=tmp_path)
    output = proc.communicate(timeout=600)[0]
    lines = [line for line in output.strip().splitlines() if line.strip()]
    assert proc.returncode == 2
    assert lines[-1] == (
        "error: resume=no/such/run: there is no such run directory; give the folder of an earlier run "
        "(e.g. outputs/<date>/<time>)."
    )
    assert "Traceback" not in output and list(tmp_path.iterdir()) == []  # Hydra created no directory


def test_run_dir_without_last_checkpoint(tmp_path):
    (tmp_path / "no_ckpt" / ".hydra").mkdir(parents=True)
    with pytest.raises(UserError, match=r"no_ckpt/checkpoints/last.ckpt does not exist, so there is nothing"):
        find_run_dir(tmp_path / "no_ckpt")
    (tmp_path / "afile").write_text("x")
    with pytest.raises(UserError, match="there is no such run directory"):
        find_run_dir(tmp_path / "afile")


def saved_run(tmp_path: Path, **changes) -> Path:
    """A run directory with a .hydra/config.yaml (tiny model, 2 epochs) and an empty last.ckpt."""
    run_dir = tmp_path / "saved"
    cfg = compose_cfg(tmp_path, [*TINY, "data.root=/images"])
    for key, value in changes.items():
        OmegaConf.update(cfg, key, value)
    (run_dir / ".hydra").mkdir(parents=True)
    OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml")
    (run_dir / "checkpoints").mkdir()
    (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"")
    return run_dir


@pytest.mark.slow
def test_resume_uses_the_runs_own_config_and_the_allowed_overrides(tmp_path):
    run_dir = saved_run(tmp_path)
    composed = compose_cfg(tmp_path, ["trainer.max_epochs=5", "data.root=/moved/images"])  # default model
    cfg = resumed_config(composed, run_dir, ["resume=x", "trainer.max_epochs=5", "data.root=/moved/images"])
    assert cfg.trainer.max_epochs == 5 and cfg.data.root == "/moved/images"
    assert cfg.model.growth_rate == 4 and list(cfg.model.block_config) == [1, 1] and cfg.data.image_size == 32
    assert cfg.paths.output_dir == str(run_dir) and cfg.resume == str(run_dir)

    # A later resume continues from the newest session's config (e.g. its raised max_epochs).
    ResumeSession(
        run_dir, run_dir / "checkpoints" / "last.ckpt", cfg, ["resume=x"], from_command_line=True
    ).record()
    again = resumed_config(compose_cfg(tmp_path, []), run_dir, ["resume=x"])
    assert (
        again.trainer.max_epochs == 5 and again.data.root == "/moved/images" and again.model.growth_rate == 4
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    "override", ["optim.lr=0.5", "model=densenet121_se", "+trainer.precision=16-mixed", "seed=1"]
)
def test_settings_that_shape_the_run_cannot_change_on_resume(tmp_path, override):
    run_dir = saved_run(tmp_path)
    key = override.split("=")[0].lstrip("+")
    with pytest.raises(UserError) as err:
        resumed_config(compose_cfg(tmp_path, []), run_dir, ["resume=x", override])
    assert str(err.value).startswith(
        f"{key} cannot change when resuming: the run continues with its own config"
    )
    assert "trainer.max_epochs" in str(err.value) and "\n" not in str(err.value)
    assert "trainer.max_epochs" in RESUMABLE_KEYS and key not in RESUMABLE_KEYS


def test_changed_images_refuse_to_resume(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    split = {"class_names": ["a", "b"], "train": [["a/1.png", 0]], "val": [["b/2.png", 1]], "test": []}
    (run_dir / "split.json").write_text(json.dumps(split))
    session = ResumeSession(run_dir, run_dir / "checkpoints" / "last.ckpt", OmegaConf.create({}))
    session.check_split(SimpleNamespace(root="/data", split=dict(split)))  # same files: fine
    moved = dict(split, train=[["a/3.png", 0]])
    with pytest.raises(
        UserError, match=r"data.root=/data no longer holds the images this run started with \(its train"
    ):
        session.check_split(SimpleNamespace(root="/data", split=moved))


def _order(loader, callback: SeedEachEpoch, epoch: int, extra_iters: int) -> list[int]:
    """The labels of one epoch after `extra_iters` earlier iter() calls, seeded for `epoch` before the last."""
    for _ in range(extra_iters):
        iter(loader)  # Lightning calls iter() a different number of times in resumed sessions
    trainer = SimpleNamespace(current_epoch=epoch, train_dataloader=loader)
    callback.on_train_epoch_start(trainer, None)
    iterator = iter(loader)
    return torch.cat([labels for _, labels in iterator]).tolist()


@pytest.mark.parametrize("kind", ["dataloader", "device_batches"])
def test_epoch_order_depends_on_seed_and_epoch_only(kind):
    from torch.utils.data import DataLoader, TensorDataset

    from densenet_se.data.datamodule import DeviceBatches

    def loader():
        images, labels = torch.zeros(40, 1), torch.arange(40)
        if kind == "dataloader":  # seeded from the global RNG, like the data module's
            generator = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,))))
            return DataLoader(TensorDataset(images, labels), batch_size=8, shuffle=True, generator=generator)
        return DeviceBatches(images, labels, range(40), batch_size=8, shuffle=True)

    callback = SeedEachEpoch(seed=3)
    torch.manual_seed(0)
    fresh = _order(loader(), callback, epoch=2, extra_iters=0)
    torch.manual_seed(1)
    used = _order(loader(), callback, epoch=2, extra_iters=3)
    assert fresh == used and sorted(fresh) == list(range(40))
    assert _order(loader(), callback, epoch=3, extra_iters=0) != fresh
    assert _order(loader(), SeedEachEpoch(seed=4), epoch=2, extra_iters=0) != fresh


def test_a_config_that_does_not_fit_the_checkpoint_is_refused_before_any_work(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    hparams = {
        "num_classes": 2,
        "class_names": ["a", "b"],
        "image_size": 32,
        "mean": [0.5] * 3,
        "std": [0.2] * 3,
    }
    torch.save(
        {"state_dict": {}, "hyper_parameters": {**hparams, "growth_rate": 12}, "epoch": 0},
        run_dir / "checkpoints" / "last.ckpt",
    )
    cfg = compose_cfg(tmp_path, [*TINY, "data.root=/no/images", f"resume={run_dir}"])
    with pytest.raises(
        UserError, match=r"^model.growth_rate=4 does not match the checkpoint .*last.ckpt \(12\)"
    ):
        run(cfg)
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoints"]


@pytest.mark.slow
def test_a_run_from_before_model_arch_resumes_as_densenet_se(tmp_path):
    from densenet_se.config import validate
    from densenet_se.resume import prepare_resume
    from helpers.crafted import legacy_checkpoint, resumable_run

    run_dir = resumable_run(tmp_path)
    legacy_checkpoint(run_dir / "checkpoints" / "last.ckpt")  # flat hyper_parameters, no arch
    saved = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    del saved.model["arch"]  # and a config written before the key existed
    OmegaConf.save(saved, run_dir / ".hydra" / "config.yaml")
    cfg = resumed_config(compose_cfg(tmp_path, []), run_dir, ["resume=x"])
    assert cfg.model.arch == "densenet_se" and type(cfg.model).__name__ == "DictConfig"
    assert OmegaConf.get_type(cfg.model).__name__ == "DenseNetSEConfig" and cfg.model.growth_rate == 4
    validate(cfg)
    assert prepare_resume(cfg).epoch == 5  # its layout checked against the converted checkpoint
    saved.model.arch = "resnet"
    OmegaConf.save(saved, run_dir / ".hydra" / "config.yaml")
    with pytest.raises(UserError, match=r"^model.arch='resnet' is not allowed; choose one of: densenet_se, "):
        resumed_config(compose_cfg(tmp_path, []), run_dir, ["resume=x"])
