"""The training app end to end: the run-directory contract, metrics, TensorBoard, checkpoints, config errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from densenet_se.train import run
from helpers.config import CONF, ROOT, TINY, compose_cfg
from helpers.images import split_files
from helpers.runs import run_cli, run_train, subprocess_env


@pytest.mark.slow
def test_in_process_run_writes_metrics_and_checkpoints(tmp_path, image_folder):
    cfg = compose_cfg(tmp_path, [*TINY, f"data.root={image_folder}", "data.test_fraction=0.2"])
    best = run(cfg)
    out = tmp_path / "run"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["best_val_acc"] == pytest.approx(best)
    assert 0.0 <= best <= 1.0
    assert metrics["class_names"] == ["Monkeypox", "Others"]
    # The leakage statement is part of every metrics.json write.
    assert metrics["grouped_split"] is False and metrics["folds"] == 0
    assert [e["epoch"] for e in metrics["epochs"]] == [0, 1]
    for row in metrics["epochs"]:
        for key in ("train_loss", "train_acc", "val_loss", "val_acc", "val_auroc", "val_f1", "seconds"):
            assert row[key] is not None, key
        assert 0 <= row["val_acc"] <= 1 and 0 <= row["val_auroc"] <= 1 and row["train_loss"] > 0
        assert row["seconds"] > 0
    assert metrics["best_epoch"] in (0, 1)
    assert metrics["best_val_acc"] == max(r["val_acc"] for r in metrics["epochs"])
    assert Path(metrics["best_checkpoint"]).name == "best.ckpt"
    # A true test split exists: the best checkpoint was evaluated on it.
    assert set(metrics["test"]) >= {"acc", "loss", "f1", "auroc", "confusion_matrix"}
    n_test = sum(1 for _ in split_files(out / "split.json", "test"))
    assert n_test > 0 and sum(map(sum, metrics["test"]["confusion_matrix"])) == n_test
    for name in ("best.ckpt", "last.ckpt"):
        ckpt = torch.load(out / "checkpoints" / name, map_location="cpu", weights_only=True)
        hp = ckpt["hyper_parameters"]
        assert hp["class_names"] == ["Monkeypox", "Others"] and hp["image_size"] == 32
        model = hp["model"]
        assert model["arch"] == "densenet_se" and model["block_config"] == [1, 1]
        assert isinstance(model["block_config"], list)
    assert metrics["total_seconds"] >= sum(r["seconds"] for r in metrics["epochs"]) - 1e-6


@pytest.mark.slow
def test_best_checkpoint_holds_the_best_epoch(tmp_path, image_folder):
    cfg = compose_cfg(tmp_path, [*TINY, f"data.root={image_folder}", "trainer.max_epochs=3"])
    run(cfg)
    out = tmp_path / "run"
    metrics = json.loads((out / "metrics.json").read_text())
    best = torch.load(out / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=True)
    last = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert best["epoch"] == metrics["best_epoch"]
    assert last["epoch"] == 2


@pytest.mark.slow
@pytest.mark.subprocess
def test_train_py_subprocess_leaves_the_run_directory_contract(tmp_path, image_folder):
    out = tmp_path / "run"
    proc = run_train(
        [*TINY, f"data.root={image_folder}", f"hydra.run.dir={out}", f"paths.cache_dir={tmp_path}/c"]
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in (
        "train.log",
        "metrics.json",
        "curves.png",
        "samples.png",
        "confusion_matrix.png",
        "split.json",
        "checkpoints/best.ckpt",
        "checkpoints/last.ckpt",
        ".hydra/config.yaml",
        ".hydra/overrides.yaml",
    ):
        assert (out / name).is_file(), name
    assert not (out / "bad_files.txt").exists()
    log_text = (out / "train.log").read_text()
    assert "best val/acc" in log_text
    # Lightning's own messages reach the run's log file too.
    assert "Trainable params" in log_text or "GPU available" in log_text
    # One plain line per epoch when output is not a terminal.
    assert proc.stdout.count("epoch 1/2") == 1 and proc.stdout.count("epoch 2/2") == 1
    event_dirs = {p.parent for p in (out / "tensorboard").rglob("events.out.tfevents.*")}
    assert event_dirs == {out / "tensorboard"}

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    scalars = set(acc.Tags()["scalars"])
    assert {
        "train/loss",
        "train/acc",
        "val/loss",
        "val/acc",
        "val/acc_best",
        "val/auroc",
        "val/f1",
    } <= scalars
    assert "hp_metric" not in scalars
    images = set(acc.Tags()["images"])
    assert {"samples", "val/confusion_matrix"} <= images
    assert len(acc.Images("val/confusion_matrix")) == 2
    best_series = [e.value for e in acc.Scalars("val/acc_best")]
    metrics = json.loads((out / "metrics.json").read_text())
    assert best_series[-1] == pytest.approx(metrics["best_val_acc"], abs=1e-6)

    from tensorboard.plugins.hparams import plugin_data_pb2

    data = acc.PluginTagToContent("hparams")
    assert "_hparams_/session_start_info" in data
    start = plugin_data_pb2.HParamsPluginData.FromString(
        data["_hparams_/session_start_info"]
    ).session_start_info
    assert start.hparams["model.se_reduction"].number_value == 2
    experiment = plugin_data_pb2.HParamsPluginData.FromString(data["_hparams_/experiment"]).experiment
    assert [m.name.tag for m in experiment.metric_infos] == ["val/acc_best"]


@pytest.mark.slow
@pytest.mark.subprocess
def test_two_runs_started_together_get_different_directories(tmp_path, image_folder):
    args = [
        *TINY,
        f"data.root={image_folder}",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=1",
        "trainer.limit_val_batches=1",
        "print_config=false",
    ]
    procs = [
        subprocess.Popen(
            [sys.executable, str(ROOT / "train.py"), *args],
            cwd=tmp_path,
            env=subprocess_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-2000:]
    runs = sorted(p.parent for p in (tmp_path / "outputs").rglob("metrics.json"))
    assert len(runs) == 2 and runs[0] != runs[1]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("data.val_fraction=1.5", "data.val_fraction=1.5 is out of range; it must be a number in (0, 1)."),
        ("data.image_size=abc", "data.image_size"),
        ("data.rot=x", "data.rot is not a valid config key; did you mean data.root?"),
        ("model=densenet_tiny", "model=densenet_tiny is not a known option"),
        (
            "model.se_placement=everywhere",
            "model.se_placement='everywhere' is not allowed; choose one of: head",
        ),
        (
            "trainer.max_epoch=3",
            "trainer.max_epoch is not a valid config key; did you mean trainer.max_epochs?",
        ),
        ("data.root=/no/such/folder", "/no/such/folder"),
    ],
)
def test_bad_config_values_exit_non_zero_with_one_line(tmp_path, monkeypatch, capsys, override, expected):
    # In-process through the real entry point (same code path as `python train.py`, without a new interpreter).
    monkeypatch.chdir(tmp_path)
    assert run_cli("train", [override, f"hydra.run.dir={tmp_path}/run"], monkeypatch) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], err
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow
@pytest.mark.subprocess
def test_bad_config_as_a_subprocess_prints_one_line_and_exits_2(tmp_path):
    proc = run_train(["data.val_fraction=0", f"hydra.run.dir={tmp_path}/run"], cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert lines == ["error: data.val_fraction=0.0 is out of range; it must be a number in (0, 1)."], (
        proc.stderr
    )


def test_yaml_defaults_mirror_schema_and_constructors():
    import inspect
    from dataclasses import fields

    from densenet_se import backbones
    from densenet_se.backbones import COMMON_KEYS, schema_name
    from densenet_se.config import AugmentConfig, DataConfig, OptimConfig
    from densenet_se.data import ImageFolderDataModule
    from densenet_se.models import DenseNetSE
    from densenet_se.models.densenet import MODEL_KEYS
    from densenet_se.module import Classifier

    arch_files = [(f"model/{b.config}", b.schema) for b in backbones.registry().values()]
    for yaml_name, schema in (
        ("data/imagefolder", DataConfig),
        ("optim/adam", OptimConfig),
        ("augment/none", AugmentConfig),
        *arch_files,
    ):
        node = OmegaConf.load(CONF / f"{yaml_name}.yaml")
        default = OmegaConf.structured(schema)
        for key in default:
            if key == "cache_dir":
                continue  # interpolated to the project's cache dir
            assert node[key] == default[key], f"{yaml_name}.{key}"
        assert set(node) - {"defaults"} == set(default), yaml_name
    for backbone in backbones.registry().values():  # each arch's file extends its schema
        node = OmegaConf.load(CONF / "model" / f"{backbone.config}.yaml")
        assert list(node.defaults) == [schema_name(backbone.arch), "_self_"], backbone.arch
    for schema, ctor in (
        (DataConfig, ImageFolderDataModule.__init__),
        (OptimConfig, Classifier.__init__),
    ):
        params = inspect.signature(ctor).parameters
        for key, value in OmegaConf.to_container(OmegaConf.structured(schema)).items():
            assert key in params, f"{schema.__name__}.{key} is not a constructor argument"
            default = params[key].default
            default = list(default) if isinstance(default, tuple) else default
            assert default == value, f"{schema.__name__}.{key}: {default!r} != {value!r}"
    # densenet_se's model.* is the network's arguments (MODEL_KEYS, from its signature) plus what every arch has,
    # with DenseNetSE's defaults; the Lightning module repeats none of them (it takes them as one `model` dict).
    schema = backbones.get("densenet_se").schema
    assert [f.name for f in fields(schema)] == [*COMMON_KEYS, *(k for k in MODEL_KEYS if k != "pretrained")]
    model_params = inspect.signature(DenseNetSE.__init__).parameters
    for key in MODEL_KEYS:
        default = model_params[key].default
        assert (list(default) if isinstance(default, tuple) else default) == OmegaConf.structured(schema)[key]
    assert not set(inspect.signature(Classifier.__init__).parameters) & set(backbones.model_keys())


def test_experiment_configs_compose(tmp_path):
    notebook = compose_cfg(tmp_path, ["experiment=notebook"])
    assert notebook.data.image_size == 224 and notebook.data.batch_size == 32 and notebook.seed == 428
    assert list(notebook.model.block_config) == [6, 12, 24, 16] and notebook.model.growth_rate == 32
    assert (
        notebook.model.se_reduction == 8 and notebook.optim.lr == 1e-4 and notebook.trainer.max_epochs == 20
    )
    assert notebook.data.val_fraction == 0.2 and notebook.data.root == "data/monkeypox"
    demo = compose_cfg(tmp_path, ["experiment=demo"])
    assert demo.data.demo is True and demo.data.image_size == 64


def test_gpu_trainer_without_a_gpu_is_one_line(tmp_path, monkeypatch, capsys, image_folder):
    from densenet_se.cli import hydra_entry

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(
        sys, "argv", ["train.py", "trainer=gpu", f"data.root={image_folder}", f"hydra.run.dir={tmp_path}/run"]
    )
    with pytest.raises(SystemExit) as exit_info:
        hydra_entry(run, config_name="train", config_dir=CONF)()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "error: trainer.accelerator=gpu needs a CUDA GPU and none is visible; "
        "use trainer=cpu (or trainer.accelerator=auto)."
    ]
    assert not (tmp_path / "run" / "split.json").exists()  # stopped before any data work


def test_full_error_asked_for_by_the_person_gives_the_traceback(tmp_path, monkeypatch):
    from densenet_se.cli import hydra_entry
    from densenet_se.errors import UserError

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    monkeypatch.setattr(sys, "argv", ["train.py", "data.val_fraction=1.5", f"hydra.run.dir={tmp_path}/run"])
    with pytest.raises(UserError, match="data.val_fraction=1.5 is out of range"):
        hydra_entry(run, config_name="train", config_dir=CONF)()
    import os

    assert os.environ["HYDRA_FULL_ERROR"] == "1" and "DENSENET_SE_SET_HYDRA_FULL_ERROR" not in os.environ
