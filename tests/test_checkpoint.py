"""Checkpoint loading: weights_only only, malicious pickles refused unrun, one sentence for bad files."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from densenet_se.checkpoint import build_classifier, load_checkpoint, run_dir_of
from densenet_se.errors import UserError
from helpers.config import ROOT
from helpers.crafted import checkpoint_run, legacy_checkpoint, tiny_checkpoint
from helpers.runs import run_cli, subprocess_env


class RunsShell:
    """Unpickling this would run a shell command that creates a file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class TouchesFile:
    """Unpickling this would call pathlib.Path.touch."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def test_round_trip_rebuilds_the_same_network_in_eval_mode(tmp_path):
    original = tiny_checkpoint(
        tmp_path / "x.ckpt", model={"pretrained": str(tmp_path / "gone.pt"), "compile": True}
    )
    ckpt = load_checkpoint(tmp_path / "x.ckpt")
    module = build_classifier(ckpt)
    assert not module.training
    # pretrained and compile are ignored: the weights are the checkpoint's and no file is read.
    assert module.hparams.model["pretrained"] is None and module.hparams.model["compile"] is False
    assert module.hparams.class_names == ["a", "b", "c"]
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        assert torch.equal(module(x), original(x))


@pytest.mark.parametrize(("payload", "global_name"), [(RunsShell, "posix.system"), (TouchesFile, "getattr")])
def test_malicious_checkpoint_is_refused_and_never_runs(tmp_path, payload, global_name):
    marker = tmp_path / "PWNED"
    evil = tmp_path / "evil.ckpt"
    torch.save({"hyper_parameters": {}, "state_dict": {}, "x": payload(marker)}, evil)
    with pytest.raises(UserError) as info:
        load_checkpoint(evil)
    message = str(info.value)
    assert message.startswith(f"refusing to load checkpoint {evil}: it needs arbitrary code to unpickle")
    assert global_name in message and "nothing in it was run" in message and "\n" not in message
    assert not marker.exists()


def _bad_file(tmp_path: Path, kind: str) -> Path:
    path = tmp_path / f"{kind}.ckpt"
    if kind == "missing":
        return path
    if kind == "directory":
        path.mkdir()
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("hello, this is not a checkpoint\n")
    elif kind == "truncated":
        tiny_checkpoint(tmp_path / "whole.ckpt")
        data = (tmp_path / "whole.ckpt").read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "cut_early":  # before the zip directory: torch fails differently than for a half file
        tiny_checkpoint(tmp_path / "whole.ckpt")
        path.write_bytes((tmp_path / "whole.ckpt").read_bytes()[:2000])
    elif kind == "tensor":
        torch.save(torch.zeros(3), path)
    elif kind == "no_state_dict":
        torch.save({"weights": torch.zeros(3)}, path)
    elif kind == "no_hparams":
        torch.save({"state_dict": {"w": torch.zeros(3)}}, path)
    elif kind == "partial_hparams":
        torch.save({"state_dict": {}, "hyper_parameters": {"num_classes": 2}}, path)
    return path


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("missing", "checkpoint {path} does not exist; pass the best.ckpt or last.ckpt written by train.py"),
        ("directory", "checkpoint {path} is not a file"),
        ("empty", "checkpoint {path} is empty or truncated"),
        ("text", "checkpoint {path} is not a PyTorch checkpoint"),
        ("truncated", "checkpoint {path} is truncated or corrupt and cannot be loaded"),
        ("cut_early", "checkpoint {path} is truncated or corrupt and cannot be loaded"),
        ("tensor", "{path} holds no Lightning checkpoint (no 'state_dict')"),
        ("no_state_dict", "{path} holds no Lightning checkpoint (no 'state_dict')"),
        (
            "no_hparams",
            "{path} is not a densenet-se checkpoint (its hyper_parameters lack num_classes, class_names",
        ),
        (
            "partial_hparams",
            "{path} is not a densenet-se checkpoint (its hyper_parameters lack class_names, image_size",
        ),
    ],
)
def test_bad_files_give_one_sentence(tmp_path, kind, expected):
    path = _bad_file(tmp_path, kind)
    with pytest.raises(UserError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert message.startswith(expected.format(path=path)), message
    assert "\n" not in message and message.endswith(".")


def test_weights_that_do_not_fit_the_hparams_are_one_sentence(tmp_path):
    tiny_checkpoint(tmp_path / "x.ckpt", model={"growth_rate": 6})
    with pytest.raises(
        UserError, match=r"^checkpoint x's weights do not fit the model its hyper_parameters describe \("
    ):
        build_classifier(load_checkpoint(tmp_path / "x.ckpt"), source="checkpoint x")


def test_run_dir_of_follows_the_run_layout(tmp_path):
    assert run_dir_of(tmp_path / "run" / "checkpoints" / "best.ckpt") == (tmp_path / "run").resolve()
    assert run_dir_of(tmp_path / "best.ckpt") is None


@pytest.mark.slow
@pytest.mark.parametrize("tool", ["eval", "predict", "export"])
@pytest.mark.parametrize("kind", ["truncated", "no_hparams"])
def test_cli_bad_checkpoint_exits_2_with_one_line(tmp_path, monkeypatch, capsys, tool, kind):
    path = _bad_file(tmp_path, kind)
    args = [f"ckpt_path={path}", f"hydra.run.dir={tmp_path / 'out'}"]
    if tool == "predict":
        args.append(f"input={tmp_path}")
    assert run_cli(tool, args, monkeypatch) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(path) in lines[0], err
    assert "Traceback" not in err


@pytest.mark.slow
@pytest.mark.subprocess
def test_predict_py_refuses_a_malicious_checkpoint_in_a_fresh_process(tmp_path):
    marker = tmp_path / "PWNED"
    evil = tmp_path / "evil.ckpt"
    torch.save({"x": RunsShell(marker)}, evil)
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "predict.py"),
            f"ckpt_path={evil}",
            f"input={tmp_path}",
            f"hydra.run.dir={tmp_path}/o",
        ],
        cwd=tmp_path,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"error: refusing to load checkpoint {evil}: it needs arbitrary code"), (
        proc.stderr
    )
    assert not marker.exists()


def test_a_checkpoint_written_before_model_arch_loads_with_its_settings_nested(tmp_path):
    original = legacy_checkpoint(tmp_path / "old.ckpt")
    raw = torch.load(tmp_path / "old.ckpt", weights_only=True)["hyper_parameters"]
    assert "model" not in raw and raw["growth_rate"] == 4 and raw["se_reduction"] == 2  # the old, flat layout
    hparams = load_checkpoint(tmp_path / "old.ckpt")["hyper_parameters"]
    assert hparams["model"] == {**original.hparams.model, "arch": "densenet_se"}
    assert not {"growth_rate", "block_config", "channels_last", "pretrained"} & set(hparams)
    module = build_classifier(load_checkpoint(tmp_path / "old.ckpt"))
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        assert torch.equal(module(x), original(x))
    # Older still: settings that came later take today's defaults.
    later = ("se_placement", "memory_efficient", "channels_last", "compile", "pretrained")
    legacy_checkpoint(tmp_path / "older.ckpt", drop=later)
    rebuilt = build_classifier(load_checkpoint(tmp_path / "older.ckpt"))
    assert rebuilt.hparams.model["se_placement"] == "head" and rebuilt.hparams.model["channels_last"] is False


@pytest.mark.slow
def test_eval_predict_export_and_grad_cam_work_on_a_checkpoint_written_before_model_arch(tmp_path):
    import json

    import densenet_se.evaluate as evaluate
    import densenet_se.export as export
    import densenet_se.predict as predict
    from helpers.config import task_cfg

    paths = checkpoint_run(tmp_path, {"a": 2, "b": 2, "c": 2})
    legacy_checkpoint(paths["ckpt"])  # the same weights, in the old layout
    ckpt = f"ckpt_path={paths['ckpt']}"
    metrics = evaluate.run(task_cfg("eval", [ckpt, "top_losses=2"], output_dir=str(tmp_path / "eval")))
    assert metrics["n"] == 6 and (tmp_path / "eval" / "top_losses.png").is_file()
    out = tmp_path / "p" / "p.csv"
    result = predict.run(
        task_cfg("predict", [ckpt, f"input={paths['images']}", f"output={out}", "gradcam=true"])
    )
    assert len(result["rows"]) == 6 and len(list((tmp_path / "p" / "gradcam").rglob("*.png"))) == 6
    export.run(task_cfg("export", [ckpt, "format=state_dict"], output_dir=str(tmp_path / "x")))
    side = json.loads((tmp_path / "x" / "model.json").read_text())
    assert side["arch"] == "densenet_se" and side["model"]["growth_rate"] == 4
