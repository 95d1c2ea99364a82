"""Sweeps: job directory names, the sweep summary, failing jobs, the shared image cache, Optuna, DDP refusal."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from densenet_se import cli, sweep
from densenet_se.errors import UserError
from densenet_se.run_guard import Refused
from helpers.config import CONF, TINY, hydra_cfg
from helpers.runs import run_train


def _without(keys: tuple[str, ...]) -> list[str]:
    return [o for o in TINY if o.split("=", 1)[0] not in keys]


def _sweep_args(
    tmp_path: Path, image_folder: Path, swept: list[str], tiny: list[str] | None = None
) -> list[str]:
    # The swept keys first: job directories are named by the overrides in the order given.
    return [
        *swept,
        *(TINY if tiny is None else tiny),
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=2",
        f"data.root={image_folder}",
        f"paths.cache_dir={tmp_path}/cache",
        f"hydra.sweep.dir={tmp_path}/sweep",
        "print_config=false",
    ]


def _rows(sweep_dir: Path) -> list[dict[str, str]]:
    with open(sweep_dir / sweep.SUMMARY_CSV, newline="") as f:
        return list(csv.DictReader(f))


def _job_dirs(sweep_dir: Path) -> list[Path]:
    return sorted(
        (p for p in sweep_dir.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: p.name
    )


# ------------------------------------------------------------------------------------------ job directory names
def test_job_dir_names_use_safe_characters_only():
    name = sweep.job_dir_name(
        3,
        [
            "model.block_config=[6,12,24,16]",
            "data.root=/data/skin lesions/",
            "experiment_name='a,b'",
            "hydra.launcher.timeout_min=5",
            "+seed=1",
            "resume=null",
        ],
        exclude=["resume"],
    )
    assert name == "3_model.block_config=6-12-24-16__data.root=data-skin-lesions__experiment_name=a-b__seed=1"
    assert sweep.job_dir_name(0, []) == "0"
    assert sweep.job_dir_name(1, ["optim.lr=1e-05"]) == "1_optim.lr=1e-05"


def test_long_job_dir_names_keep_whole_overrides_and_end_in_a_hash():
    many = [f"model.key_{i}=value_{i}" for i in range(20)]
    a = sweep.job_dir_name(0, many)
    b = sweep.job_dir_name(0, [*many[:-1], "model.key_19=other"])
    assert len(a) <= len("0_") + sweep.MAX_DIRNAME and re.fullmatch(r"[A-Za-z0-9._=-]+", a)
    kept, digest = a[2:].rsplit("-", 1)
    assert kept.split("__") == many[: len(kept.split("__"))] and len(kept.split("__")) >= 4
    assert a != b and b.startswith(f"0_{kept}-") and len(digest) == 8
    # Optuna's long decimals keep 4 significant digits in the name.
    assert sweep.job_dir_name(1, ["optim.lr=0.0028528060291470388", "model.drop_rate=0.25"]) == (
        "1_optim.lr=0.002853__model.drop_rate=0.25"
    )


# ------------------------------------------------------------------------------------------ summary from job dirs
def _fake_job(sweep_dir: Path, name: str, status: dict | None, metrics: dict | None) -> None:
    job = sweep_dir / name
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(["optim.lr=0.1", f"seed={name[0]}"]))
    (job / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump({"hydra": {"job": {"num": int(name[0])}}}))
    if status is not None:
        (job / sweep.STATUS_FILE).write_text(json.dumps(status))
    if metrics is not None:
        (job / "metrics.json").write_text(json.dumps(metrics))


def test_summary_rows_from_metrics_and_status_files(tmp_path):
    root = tmp_path / "sweep"
    _fake_job(
        root,
        "0_a",
        {
            "job": 0,
            "status": "completed",
            "exit_code": 0,
            "seconds": 12.5,
            "overrides": ["optim.lr=0.1", "seed=0"],
        },
        {"best_val_acc": 0.75, "best_epoch": 3, "test": {"acc": 0.7, "f1": 0.6, "auroc": 0.8, "loss": 0.5}},
    )
    _fake_job(
        root,
        "1_b",
        {"job": 1, "status": "failed", "exit_code": 2, "error": "model.x is bad | fix it"},
        None,
    )
    _fake_job(root, "2_c", None, {"best_val_acc": 0.5, "best_epoch": 0})  # killed mid-run
    (root / ".submitit").mkdir()
    rows = sweep.write_summary(root)
    assert [(r["job"], r["status"]) for r in rows] == [(0, "completed"), (1, "failed"), (2, "incomplete")]
    csv_rows = _rows(root)
    assert csv_rows[0]["best_val_acc"] == "0.75" and csv_rows[0]["test_auroc"] == "0.8"
    assert csv_rows[0]["overrides"] == "optim.lr=0.1 seed=0" and csv_rows[0]["run_dir"] == "0_a"
    assert csv_rows[1]["error"] == "model.x is bad | fix it" and csv_rows[1]["best_val_acc"] == ""
    assert csv_rows[2]["overrides"] == "optim.lr=0.1 seed=2" and "killed" in csv_rows[2]["error"]
    md = (root / sweep.SUMMARY_MD).read_text()
    assert "Jobs: 3 (1 completed, 1 failed, 1 incomplete)" in md
    assert "Best: job 0, best val acc 0.7500" in md
    assert "| 0 | completed | `seed=0` | 0.7500 | 3 | 0.7000 | 0.6000 | 0.8000 | 12.5 | `0_a` |  |" in md
    assert "model.x is bad \\| fix it" in md  # a pipe in a message does not break the table
    result = sweep.SweepResult(root, rows)
    assert result.exit_code == 2 and len(result.failed) == 2
    assert result.message().startswith("2 of 3 sweep jobs did not complete (job 1: model.x is bad")


def test_exit_code_is_zero_when_every_job_completed(tmp_path):
    root = tmp_path / "sweep"
    _fake_job(root, "0_a", {"job": 0, "status": "completed", "exit_code": 0}, {"best_val_acc": 1.0})
    assert sweep.SweepResult(root, sweep.write_summary(root)).exit_code == 0
    _fake_job(root, "1_b", {"job": 1, "status": "failed", "exit_code": 1, "error": "RuntimeError: x"}, None)
    assert sweep.SweepResult(root, sweep.write_summary(root)).exit_code == 1


def test_sweep_jobs_share_the_disk_cache_unless_data_cache_is_given():
    cfg = OmegaConf.create({"data": {"cache": "memory"}})
    sweep.share_image_cache(cfg, ["optim.lr=0.1"])
    assert cfg.data.cache == "disk"
    cfg = OmegaConf.create({"data": {"cache": "memory"}})
    sweep.share_image_cache(cfg, ["data.cache=memory"])
    assert cfg.data.cache == "memory"
    cfg = OmegaConf.create({"data": {"cache": "device"}})
    sweep.share_image_cache(cfg, [])
    assert cfg.data.cache == "device"


def test_run_job_records_how_each_job_ended(tmp_path, monkeypatch):
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    cfg = hydra_cfg(["optim.lr=0.5"])
    with open_dict(cfg):
        cfg.hydra.job.num = 4
        cfg.hydra.runtime.output_dir = str(tmp_path)
    monkeypatch.setattr(HydraConfig.instance(), "cfg", None)
    HydraConfig.instance().set_config(cfg)
    task_cfg = OmegaConf.create({"data": {"cache": "memory"}})

    def fails(_cfg):
        raise UserError("data.root=/x does not exist: set data.root.")

    # None, not NaN: hydra-optuna-sweeper then marks the trial failed and goes on.
    assert cli.run_job(fails, task_cfg) is None
    status = json.loads((tmp_path / sweep.STATUS_FILE).read_text())
    assert (status["job"], status["status"], status["exit_code"]) == (4, "failed", 2)
    assert status["error"] == "data.root=/x does not exist: set data.root." and status["overrides"] == [
        "optim.lr=0.5"
    ]

    def crashes(_cfg):
        raise RuntimeError("CUDA error: out of memory\nmore detail")

    assert cli.run_job(crashes, task_cfg) is None
    status = json.loads((tmp_path / sweep.STATUS_FILE).read_text())
    assert status["exit_code"] == 1 and status["error"] == "RuntimeError: CUDA error: out of memory"

    assert cli.run_job(lambda c: 0.75 if c.data.cache == "disk" else -1.0, task_cfg) == 0.75
    status = json.loads((tmp_path / sweep.STATUS_FILE).read_text())
    assert (status["status"], status["value"], status["exit_code"]) == ("completed", 0.75, 0)


# ------------------------------------------------------------------------------------------ multi-process jobs
def test_a_sweep_of_ddp_jobs_is_refused_unless_slurm_starts_the_processes():
    callback = sweep.SweepSummary()
    # A BaseException carrying the UserError: Hydra turns an Exception raised in a callback into a warning.
    with pytest.raises(Refused) as refused:
        callback.on_multirun_start(hydra_cfg(["trainer=ddp_cpu"]))
    assert "cannot start 2 training processes per job" in str(refused.value.error)
    callback.on_multirun_start(hydra_cfg(["trainer=cpu"]))
    callback.on_multirun_start(hydra_cfg(["trainer=ddp_cpu", "hydra/launcher=slurm"]))


def test_a_job_refuses_lightnings_ddp_relaunch_in_a_multirun(monkeypatch):
    import lightning as L

    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", logger=False, enable_checkpointing=False
    )
    cli.check_multirun_launch(trainer)  # a single run: Lightning may re-launch the command
    monkeypatch.setattr(cli, "is_multirun", lambda: True)
    with pytest.raises(UserError, match="hydra/launcher=slurm"):
        cli.check_multirun_launch(trainer)
    one = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False)
    cli.check_multirun_launch(one)


# ------------------------------------------------------------------------------------------ Optuna search space
@pytest.mark.slow
def test_every_optuna_search_combination_builds_a_model():
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from densenet_se.models import DenseNetSE

    params = OmegaConf.load(CONF / "hparams_search" / "optuna.yaml").hydra.sweeper.params
    parser = OverridesParser.create()

    def choices(key: str) -> list:
        return list(parser.parse_override(f"{key}={params[key]}").sweep_iterator())

    growth, reduction = choices("model.growth_rate"), choices("model.se_reduction")
    assert len(growth) > 1 and len(reduction) > 1
    for model in ("densenet121_se", "densenet_tiny_se"):
        node = OmegaConf.load(CONF / "model" / f"{model}.yaml")
        block_config = list(node.get("block_config", [6, 12, 24, 16]))
        init = node.get("num_init_features", 64)
        for g in growth:
            # The largest reduction with SE after every block (the most channel-hungry placement).
            DenseNetSE(
                2,
                growth_rate=g,
                block_config=block_config,
                num_init_features=init,
                se_reduction=max(reduction),
                se_placement="blocks",
            )


def test_optuna_search_composes_as_a_multirun():
    cfg = hydra_cfg(["hparams_search=optuna"])
    assert str(cfg.hydra.mode) == "RunMode.MULTIRUN" and cfg.hydra.sweeper.direction == "maximize"
    assert cfg.data.cache == "disk"
    assert set(cfg.hydra.sweeper.params) == {
        "optim.lr",
        "model.growth_rate",
        "model.se_reduction",
        "model.drop_rate",
    }
    assert cfg.hydra.callbacks.sweep_summary._target_ == "densenet_se.sweep.SweepSummary"


# ------------------------------------------------------------------------------------------ real sweeps
@pytest.mark.slow
@pytest.mark.subprocess
def test_two_job_sweep_of_list_values(tmp_path, image_folder):
    swept = ["model.block_config=[1,1],[1,2]"]
    proc = run_train(
        ["-m", *_sweep_args(tmp_path, image_folder, swept, _without(("model.block_config",)))], tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    root = tmp_path / "sweep"
    jobs = _job_dirs(root)
    assert len(jobs) == 2
    assert jobs[0].name.startswith("0_model.block_config=1-1__model=densenet_tiny_se")
    assert jobs[1].name.startswith("1_model.block_config=1-2__")
    rows = _rows(root)
    assert [(r["job"], r["status"], r["run_dir"]) for r in rows] == [
        ("0", "completed", jobs[0].name),
        ("1", "completed", jobs[1].name),
    ]
    for row, job in zip(rows, jobs, strict=True):
        metrics = json.loads((job / "metrics.json").read_text())
        assert float(row["best_val_acc"]) == pytest.approx(metrics["best_val_acc"])
        assert int(row["best_epoch"]) == metrics["best_epoch"] == 0
        assert json.loads((job / sweep.STATUS_FILE).read_text())["status"] == "completed"
        assert row["error"] == "" and row["test_acc"] == ""  # no test split here
    assert rows[0]["overrides"].startswith("model.block_config=[1,1] model=densenet_tiny_se")
    md = (root / sweep.SUMMARY_MD).read_text()
    assert "| 0 | completed | `model.block_config=[1,1]` |" in md
    assert "| 1 | completed | `model.block_config=[1,2]` |" in md

    # `tensorboard --logdir <sweep>` sees one run per job, each with its HParams session.
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer
    from tensorboard.plugins.hparams import plugin_data_pb2

    mux = EventMultiplexer(size_guidance={"images": 0, "scalars": 0}).AddRunsFromDirectory(str(root))
    mux.Reload()
    runs = sorted(mux.Runs())
    assert runs == [f"{job.name}/tensorboard" for job in jobs]
    block_configs = []
    for run in runs:
        assert "val/acc_best" in mux.GetAccumulator(run).Tags()["scalars"]
        content = mux.PluginRunToTagToContent("hparams")[run]
        start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
        block_configs.append(start.session_start_info.hparams["model.block_config"].string_value)
        experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
        assert [m.name.tag for m in experiment.metric_infos] == ["val/acc_best"]
    assert block_configs == ["[1, 1]", "[1, 2]"]

    # The jobs share one decoded-image cache on disk: written by job 0, only read by job 1.
    caches = list((tmp_path / "cache" / "images").glob("*.u8"))
    assert len(caches) == 1
    job1_started = (jobs[1] / ".hydra" / "overrides.yaml").stat().st_mtime_ns
    assert caches[0].stat().st_mtime_ns < job1_started
    assert "data.cache=disk" in (jobs[1] / "train.log").read_text()


@pytest.mark.slow
@pytest.mark.subprocess
def test_a_failing_job_is_recorded_and_the_sweep_goes_on(tmp_path, image_folder):
    swept = ["model.se_reduction=2,1000"]
    proc = run_train(
        ["-m", *_sweep_args(tmp_path, image_folder, swept, _without(("model.se_reduction",)))], tmp_path
    )
    # Every job ran; the sweep exits as its failed job would have alone (2: a configuration error).
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = [line for line in proc.stderr.splitlines() if line.strip()][-1]
    assert last.startswith(
        "error: 1 of 2 sweep jobs did not complete (job 1: se_reduction must be between 1 and"
    )
    assert last.endswith("sweep_summary.md") and "Traceback" not in proc.stderr
    root = tmp_path / "sweep"
    jobs = _job_dirs(root)
    assert [j.name[:2] for j in jobs] == ["0_", "1_"]
    failed = json.loads((jobs[1] / sweep.STATUS_FILE).read_text())
    assert failed["status"] == "failed" and failed["exit_code"] == 2
    assert failed["error"].startswith("se_reduction must be between 1 and") and "\n" not in failed["error"]
    assert "ValueError" in failed["traceback"]
    assert f"job 1 failed: {failed['error']}" in (jobs[1] / "train.log").read_text()
    rows = _rows(root)
    assert [(r["status"], r["error"]) for r in rows] == [("completed", ""), ("failed", failed["error"])]
    assert float(rows[0]["best_val_acc"]) >= 0.0 and (jobs[0] / "checkpoints" / "best.ckpt").is_file()


@pytest.mark.slow
@pytest.mark.subprocess
def test_optuna_search_of_two_trials(tmp_path, image_folder):
    proc = run_train(
        _sweep_args(
            tmp_path,
            image_folder,
            ["hparams_search=optuna", "hydra.sweeper.n_trials=2"],
            _without(("optim.lr",)),
        ),
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    root = tmp_path / "sweep"
    rows = _rows(root)
    assert [(r["job"], r["status"]) for r in rows] == [("0", "completed"), ("1", "completed")]
    lrs = []
    for row in rows:
        overrides = dict(o.split("=", 1) for o in row["overrides"].split())
        lrs.append(float(overrides["optim.lr"]))
        assert overrides["model.growth_rate"] == "4"  # given on the command line: fixed, not searched
        assert 0.0 <= float(overrides["model.drop_rate"]) <= 0.3
    assert lrs[0] != lrs[1] and all(1e-5 <= lr <= 1e-2 for lr in lrs)
    results = OmegaConf.load(root / "optimization_results.yaml")
    assert results.best_value == pytest.approx(max(float(r["best_val_acc"]) for r in rows))
