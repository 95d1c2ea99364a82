"""A run directory may come from someone else, be moved, or be resumed twice at once: resume creates only our
own callbacks and loggers, records only sessions that passed every check, keeps the best score of a moved run,
and lets one process write a run directory at a time."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import OmegaConf

from densenet_se.errors import UserError
from densenet_se.resume import resumed_config
from densenet_se.rundir import CheckpointPaths, allowed_targets, check_tracking, hold_run_dir, relocate_state
from densenet_se.train import run
from helpers.config import ROOT, TINY, compose_cfg
from helpers.crafted import resumable_run
from helpers.images import make_image_folder
from helpers.runs import run_cli, subprocess_env


def _edit_config(run_dir: Path, **values: object) -> None:
    """Set keys of the run's .hydra/config.yaml as someone with write access to the folder could."""
    path = run_dir / ".hydra" / "config.yaml"
    cfg = OmegaConf.load(path)
    for key, value in values.items():
        OmegaConf.update(cfg, key, value, merge=False, force_add=True)
    OmegaConf.save(cfg, path)


def _resume(run_dir: Path, monkeypatch, capsys, *extra: str) -> tuple[int, list[str]]:
    status = run_cli("train", [f"resume={run_dir}", *extra], monkeypatch)
    return status, [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def _savetxt(marker: Path) -> dict:
    return {"_target_": "numpy.savetxt", "fname": str(marker), "X": [1.0]}


@pytest.mark.slow
@pytest.mark.parametrize(
    "where", ["callbacks.x", "logger.x", "nested", "trainer.plugins", "decoded", "dirpath_outside"]
)
def test_resume_creates_only_the_targets_our_config_groups_define(tmp_path, monkeypatch, capsys, where):
    run_dir = resumable_run(tmp_path)
    marker = tmp_path / "PWNED"
    payload = _savetxt(marker)
    expected = f"sets {where}._target_='numpy.savetxt'"
    if where in ("callbacks.x", "logger.x", "trainer.plugins"):
        _edit_config(run_dir, **{where: payload})
        if where == "trainer.plugins":
            expected = (
                "sets trainer.plugins._target_='numpy.savetxt', but a resumed run creates only the callbacks"
            )
    elif where == "nested":  # an argument of one of our own callbacks, which instantiate would build first
        _edit_config(run_dir, **{"callbacks.model_checkpoint.filename": payload})
        expected = "sets callbacks.model_checkpoint.filename._target_='numpy.savetxt', but a resumed run"
    elif where == "decoded":  # a node that only exists once the interpolation is resolved
        decoded = "${oc.decode:'{_target_: numpy.savetxt, fname: " + str(marker) + ", X: [1.0]}'}"
        _edit_config(run_dir, **{"callbacks.y": decoded})
        expected = "sets callbacks.y._target_='numpy.savetxt', which is not one of the callbacks that conf/"
    else:
        _edit_config(run_dir, **{"callbacks.model_checkpoint.dirpath": str(tmp_path / "elsewhere")})
        expected = (
            f"sets callbacks.model_checkpoint.dirpath={tmp_path / 'elsewhere'}, outside the run directory"
        )
    status, lines = _resume(run_dir, monkeypatch, capsys)
    assert status == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"error: resume={run_dir}: {run_dir / '.hydra' / 'config.yaml'} "), lines[0]
    assert expected in lines[0], lines[0]
    assert not marker.exists() and not (tmp_path / "elsewhere").exists()
    assert not list((run_dir / ".hydra").glob("resume-*"))


def test_the_allow_list_is_what_conf_ships():
    allowed = allowed_targets(ROOT / "conf")
    assert set(allowed["callbacks"]) == {
        "lightning.pytorch.callbacks.ModelCheckpoint",
        "lightning.pytorch.callbacks.ModelSummary",
        "lightning.pytorch.callbacks.LearningRateMonitor",
        "lightning.pytorch.callbacks.EarlyStopping",
        "densenet_se.ema.EMAWeights",
    }
    assert set(allowed["logger"]) == {
        "lightning.pytorch.loggers.TensorBoardLogger",
        "lightning.pytorch.loggers.CSVLogger",
        "densenet_se.trackers.mlflow_logger",
        "densenet_se.trackers.wandb_logger",
    }
    assert allowed["callbacks"]["lightning.pytorch.callbacks.ModelCheckpoint"] == {"dirpath"}
    assert allowed["logger"]["lightning.pytorch.loggers.CSVLogger"] == {"save_dir"}


@pytest.mark.slow
def test_a_failed_resume_records_no_session(tmp_path, monkeypatch, capsys):
    run_dir = resumable_run(tmp_path)
    status, lines = _resume(run_dir, monkeypatch, capsys, "+trainer.max_time=abc")
    assert status == 2 and "trainer settings are invalid" in lines[-1], lines
    assert not list((run_dir / ".hydra").glob("resume-*")) and not list(
        (run_dir / ".hydra").glob(".resume-*")
    )


def _record(run_dir: Path, name: str, **values: object) -> Path:
    cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    for key, value in values.items():
        OmegaConf.update(cfg, key, value, merge=False, force_add=True)
    folder = run_dir / ".hydra" / f"resume-{name}"
    folder.mkdir()
    OmegaConf.save(cfg, folder / "config.yaml")
    return folder


@pytest.mark.slow
def test_a_bad_session_record_never_steers_a_later_resume(tmp_path, caplog):
    run_dir = resumable_run(tmp_path)
    good = _record(run_dir, "2030-01-01", **{"trainer.max_epochs": 7})
    bad = _record(run_dir, "2030-01-02", **{"trainer.max_epochs": 0})  # fails the range check
    (run_dir / ".hydra" / "resume-2030-01-03").mkdir()
    (run_dir / ".hydra" / "resume-2030-01-03" / "config.yaml").write_text("{not: yaml: at all")
    # A record only carries the resumable keys: settings that shape the run, or targets, are not taken.
    hostile = {"optim.lr": 5.0, "callbacks.x": _savetxt(tmp_path / "PWNED")}
    _record(run_dir, "2030-01-00", **hostile)
    cfg = resumed_config(compose_cfg(tmp_path, []), run_dir, ["resume=x"])
    assert cfg.trainer.max_epochs == 7 and cfg.optim.lr == 0.01 and "x" not in cfg.callbacks
    assert f"ignoring the session record {bad}" in caplog.text
    assert "resume-2030-01-03" in caplog.text and str(good) not in caplog.text
    shutil.rmtree(good)
    cfg = resumed_config(compose_cfg(tmp_path, []), run_dir, ["resume=x"])
    assert cfg.trainer.max_epochs == 2 and "x" not in cfg.callbacks and cfg.optim.lr == 0.01


# ---------------------------------------------------------------------------------------------------- lock
def test_a_held_run_directory_names_its_holder(tmp_path):
    with hold_run_dir(tmp_path):
        with pytest.raises(UserError) as info:
            with hold_run_dir(tmp_path):
                pass
        message = str(info.value)
        assert message.startswith(f"run directory {tmp_path} is in use by 'process {os.getpid()} on ")
        assert "record every epoch twice" in message and "\n" not in message
    with hold_run_dir(tmp_path):  # released when the first holder is done
        pass


@pytest.mark.slow
def test_a_resume_while_another_process_holds_the_run_waits_its_turn(tmp_path, monkeypatch, capsys):
    run_dir = resumable_run(tmp_path)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\nfrom densenet_se.rundir import hold_run_dir\n"
            "with hold_run_dir(sys.argv[1]):\n    print('held', flush=True)\n    time.sleep(600)\n",
            str(run_dir),
        ],
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        before = sorted(p.relative_to(run_dir) for p in run_dir.rglob("*") if p.name != "train.log")
        status, lines = _resume(run_dir, monkeypatch, capsys)
        assert status == 2 and len(lines) == 1, lines
        assert lines[0].startswith(f"error: run directory {run_dir} is in use by 'process {holder.pid} on ")
        assert sorted(p.relative_to(run_dir) for p in run_dir.rglob("*") if p.name != "train.log") == before
    finally:
        holder.kill()  # SIGKILL: the lock must not outlive its process
        holder.wait()
    with hold_run_dir(run_dir):
        assert (run_dir / ".lock").read_text().startswith(f"process {os.getpid()} on ")


# ---------------------------------------------------------------------------------------- moved run dirs
def test_a_moved_checkpoint_state_keeps_its_best_score(tmp_path):
    old, new = tmp_path / "old" / "checkpoints", tmp_path / "new" / "checkpoints"
    callback = ModelCheckpoint(dirpath=str(new), monitor="val/acc", mode="max", filename="best")
    state = {
        "dirpath": str(old),
        "best_model_score": torch.tensor(0.9),
        "best_model_path": str(old / "best.ckpt"),
        "kth_best_model_path": str(old / "best.ckpt"),
        "kth_value": torch.tensor(0.9),
        "best_k_models": {str(old / "best.ckpt"): torch.tensor(0.9)},
        "last_model_path": "",
    }
    checkpoint = {"callbacks": {callback.state_key: state}}
    CheckpointPaths().on_load_checkpoint(SimpleNamespace(checkpoint_callbacks=[callback]), None, checkpoint)
    callback.load_state_dict(checkpoint["callbacks"][callback.state_key])
    assert float(callback.best_model_score) == pytest.approx(0.9)
    assert callback.best_model_path == str(new / "best.ckpt")
    assert list(callback.best_k_models) == [str(new / "best.ckpt")]


@pytest.mark.parametrize("name", ["../../victim.txt", "/etc/passwd", "sub/best.ckpt"])
def test_a_checkpoint_naming_files_outside_its_folder_is_refused(tmp_path, name):
    old = tmp_path / "old" / "checkpoints"
    path = name if name.startswith("/") else str(old / name)
    state = {"dirpath": str(old), "best_k_models": {path: torch.tensor(0.1)}, "best_model_path": ""}
    with pytest.raises(UserError, match="which is not a file in its checkpoints folder"):
        relocate_state(state, str(tmp_path / "new" / "checkpoints"))


@pytest.mark.slow
def test_resuming_a_copied_run_directory_keeps_its_best_checkpoint(tmp_path, monkeypatch):
    images = make_image_folder(tmp_path / "images", {"Monkeypox": 12, "Others": 12})
    cfg = compose_cfg(tmp_path / "a", [*TINY, f"data.root={images}", "print_config=false", "optim.lr=0.05"])
    run(cfg)
    original = tmp_path / "a" / "run"
    (original / ".hydra").mkdir()
    OmegaConf.save(cfg, original / ".hydra" / "config.yaml")
    copy = tmp_path / "copied run"
    shutil.copytree(original, copy)
    assert run_cli("train", [f"resume={copy}", "trainer.max_epochs=3"], monkeypatch) == 0

    metrics = json.loads((copy / "metrics.json").read_text())
    scores = [e["val_acc"] for e in metrics["epochs"]]
    assert len(scores) == 3 and scores[2] <= max(scores[:2]), scores  # the resumed epoch is no better
    best = torch.load(copy / "checkpoints" / "best.ckpt", weights_only=True)
    assert best["epoch"] == metrics["best_epoch"] == scores.index(max(scores))
    assert Path(metrics["best_checkpoint"]) == (copy / "checkpoints" / "best.ckpt").resolve()
    last = torch.load(copy / "checkpoints" / "last.ckpt", weights_only=True)
    (state,) = [s for k, s in last["callbacks"].items() if "val/acc" in k]
    assert state["dirpath"] == str(copy / "checkpoints")
    assert float(state["best_model_score"]) == pytest.approx(max(scores))
    assert torch.load(original / "checkpoints" / "best.ckpt", weights_only=True)["epoch"] == best["epoch"]


def test_resume_never_reads_the_pretrained_file_its_config_names(tmp_path):
    run_dir = resumable_run(tmp_path)
    planted = run_dir / "weights.pt"  # e.g. a file placed in the run directory by whoever sent it
    _edit_config(run_dir, **{"model.pretrained": str(planted)})
    cfg = resumed_config(compose_cfg(tmp_path, []), run_dir, ["resume=x"])
    assert cfg.model.pretrained is None and cfg.model.growth_rate == 4


def _mlflow(run_dir: Path, **values: object) -> dict:
    return {
        "_target_": "densenet_se.trackers.mlflow_logger",
        "run_dir": str(run_dir),
        "tracking_uri": None,
        **values,
    }


@pytest.mark.slow
def test_resume_refuses_an_mlflow_store_outside_the_run_directory(tmp_path, monkeypatch, capsys):
    run_dir = resumable_run(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    _edit_config(run_dir, logger={"mlflow": _mlflow(run_dir, tracking_uri=elsewhere.as_uri())})
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    source = run_dir / ".hydra" / "config.yaml"
    status, lines = _resume(run_dir, monkeypatch, capsys)
    assert status == 2 and len(lines) == 1, lines
    assert lines[0].startswith(
        f"error: resume={run_dir}: {source} sets logger.mlflow.tracking_uri='{elsewhere.as_uri()}', outside the "
        "run directory, and a run directory may come from someone else"
    )
    assert not elsewhere.exists()
    assert list((run_dir / ".hydra").glob("resume-*")) == []


@pytest.mark.parametrize(
    ("values", "env", "refused"),
    [
        ({"tracking_uri": "{elsewhere}"}, None, "outside the run directory"),
        ({"tracking_uri": "sqlite:///{elsewhere}/mlflow.db"}, None, "outside the run directory"),
        ({"save_dir": "{elsewhere}"}, None, "outside the run directory"),
        ({"tracking_uri": "http://tracker.example:5000"}, None, "a tracking server"),
        ({"tracking_uri": "http://tracker.example:5000"}, "http://tracker.example:5000", None),
        ({"save_dir": "{elsewhere}"}, "http://mine:5000", None),  # your own MLFLOW_TRACKING_URI wins
        ({"tracking_uri": "file://{run}/mlruns"}, None, None),
        ({"save_dir": "{root}/mlruns"}, None, None),
    ],
)
def test_resumed_mlflow_stores_stay_in_the_run_or_your_default_store(
    tmp_path, monkeypatch, values, env, refused
):
    run_dir, root = tmp_path / "run", tmp_path / "cwd"
    places = {"elsewhere": tmp_path / "elsewhere", "run": run_dir, "root": root}
    entry = _mlflow(run_dir, **{k: v.format(**places) for k, v in values.items()})
    cfg = OmegaConf.create({"logger": {"mlflow": entry}})
    if env is None:
        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    else:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", env)
    if refused is None:
        check_tracking(cfg, root, run_dir / "config.yaml", run_dir)
    else:
        with pytest.raises(UserError, match=refused):
            check_tracking(cfg, root, run_dir / "config.yaml", run_dir)


@pytest.mark.slow
@pytest.mark.parametrize("content", ["big", "not_yaml"])
def test_an_oversized_or_broken_run_config_is_one_sentence_before_it_is_parsed(
    tmp_path, monkeypatch, capsys, content
):
    import densenet_se.rundir as rundir

    run_dir = resumable_run(tmp_path)
    source = run_dir / ".hydra" / "config.yaml"
    if content == "big":  # a real file over a lowered limit: refused from its size, before the parser sees it
        monkeypatch.setattr(rundir, "MAX_RUN_YAML_BYTES", 1 << 20)
        source.write_text(source.read_text() + "# padding\n" * 120_000)
        expected = (
            f"error: run file {source} is larger than 1 MiB, too big to be the file train.py wrote there"
        )
    else:
        source.write_bytes(b"model: [unclosed\n\xff")
        expected = f"error: run file {source} is not valid YAML ("
    status, lines = _resume(run_dir, monkeypatch, capsys)
    assert status == 2 and len(lines) == 1 and lines[0].startswith(expected), lines
    assert list((run_dir / ".hydra").glob("resume-*")) == []
