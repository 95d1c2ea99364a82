"""SLURM and submitit: the launcher config, the sbatch script, ranks under srun, a submitit_local sweep."""

from __future__ import annotations

import csv
import json
import os
import subprocess
from pathlib import Path

import pytest
import submitit
from hydra.utils import instantiate

from densenet_se import cli, distributed, sweep
from densenet_se.cli import describe
from helpers.config import ROOT, TINY, hydra_cfg
from helpers.runs import run_train

SLURM_ENV = {
    "SLURM_JOB_ID": "4242",
    "SLURM_JOB_NAME": "densenet-se",
    "SLURM_JOB_NUM_NODES": "2",
    "SLURM_NNODES": "2",
    "SLURM_NTASKS": "8",
    "SLURM_NTASKS_PER_NODE": "4",
    "SLURM_NODELIST": "gpu[01-02]",
    "SLURM_PROCID": "5",
    "SLURM_LOCALID": "1",
    "SLURM_NODEID": "1",
}


class _Submitted(Exception):
    """Raised instead of calling sbatch."""


def _sbatch_text(monkeypatch, overrides: list[str], tmp_path: Path) -> str:
    cfg = hydra_cfg(["hydra/launcher=slurm", f"hydra.sweep.dir={tmp_path}/sweep", *overrides])
    launcher = instantiate(cfg.hydra.launcher)
    launcher.config = cfg
    captured: list[str] = []

    def map_array(self, fn, *args):
        captured.append(
            self._executor._make_submission_file_text("python -u -m submitit.core._submit", "uid")
        )
        raise _Submitted

    monkeypatch.setattr(submitit.AutoExecutor, "map_array", map_array)
    # There is no srun here; submitit refuses to build a SLURM executor without one.
    monkeypatch.setattr(submitit.SlurmExecutor, "affinity", classmethod(lambda cls: 2))
    with pytest.raises(_Submitted):
        launcher.launch([["seed=1"]], initial_job_idx=0)
    return captured[0]


def test_slurm_launcher_asks_for_one_task_and_gpu_per_device(monkeypatch, tmp_path):
    monkeypatch.setenv("SLURM_PARTITION", "gpu-long")
    text = _sbatch_text(monkeypatch, ["trainer=ddp", "trainer.devices=4", "trainer.num_nodes=2"], tmp_path)
    for line in (
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=4",
        "#SBATCH --gpus-per-node=4",
        "#SBATCH --partition=gpu-long",
        "#SBATCH --time=240",
        "#SBATCH --cpus-per-task=8",
        "#SBATCH --mem=64GB",
    ):
        assert line in text.splitlines(), line
    assert "srun" in text


def test_slurm_launcher_defaults_for_a_one_device_job(monkeypatch, tmp_path):
    monkeypatch.delenv("SLURM_PARTITION", raising=False)
    text = _sbatch_text(monkeypatch, [], tmp_path).splitlines()
    assert "#SBATCH --ntasks-per-node=1" in text and "#SBATCH --gpus-per-node=1" in text
    assert not any(line.startswith("#SBATCH --partition") for line in text)  # the cluster's default
    cpu = _sbatch_text(monkeypatch, ["trainer=ddp_cpu"], tmp_path).splitlines()
    assert "#SBATCH --ntasks-per-node=2" in cpu and not any("--gpus-per-node" in line for line in cpu)


def test_slurm_launcher_needs_a_number_of_devices():
    cfg = hydra_cfg(["hydra/launcher=slurm", "trainer=ddp"])  # devices: auto
    with pytest.raises(Exception) as info:
        instantiate(cfg.hydra.launcher)
    assert describe(info.value).startswith(
        "trainer.devices=auto cannot size a SLURM job; set trainer.devices"
    )


@pytest.mark.subprocess
def test_sbatch_script_runs_train_py_with_ddp_under_srun(tmp_path):
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    record = tmp_path / "srun_args.txt"
    (fake_bin / "srun").write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {record}\n')
    (fake_bin / "srun").chmod(0o755)
    env = {
        **os.environ,
        **SLURM_ENV,
        "PATH": f"{fake_bin}:{os.environ['PATH']}",
        "SLURM_SUBMIT_DIR": str(tmp_path),
    }
    script = ROOT / "scripts" / "slurm_multinode.sbatch"
    proc = subprocess.run(
        ["bash", str(script), "data.root=/data/monkeypox"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    args = record.read_text().splitlines()
    assert args[:2] == ["python", "train.py"]
    cfg = hydra_cfg(args[2:])
    assert cfg.trainer.strategy == "ddp" and cfg.trainer.accelerator == "gpu"
    assert (cfg.trainer.num_nodes, cfg.trainer.devices) == (2, 4)
    assert cfg.hydra.run.dir == "outputs/slurm/4242" and cfg.data.root == "/data/monkeypox"
    header = [line for line in script.read_text().splitlines() if line.startswith("#SBATCH")]
    assert "#SBATCH --nodes=2" in header and "#SBATCH --ntasks-per-node=4" in header


def test_under_srun_lightning_takes_ranks_from_slurm_and_does_not_relaunch(monkeypatch):
    import lightning as L
    from lightning.pytorch.plugins.environments import SLURMEnvironment
    from lightning.pytorch.utilities import rank_zero
    from lightning_utilities.core import rank_zero as utils_rank_zero

    for key, value in SLURM_ENV.items():
        monkeypatch.setenv(key, value)
    for key in ("RANK", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    # The DDP strategy sets this process's global rank (5) in Lightning's module-level rank_zero_only; put it
    # back afterwards, or every later in-process run would take itself for rank 5 and skip rank zero's work.
    for module in (rank_zero, utils_rank_zero):
        monkeypatch.setattr(module.rank_zero_only, "rank", module.rank_zero_only.rank)
    assert distributed.rank_suffix() == ".rank5" and not distributed.is_rank_zero()
    trainer = L.Trainer(
        accelerator="cpu", devices=4, num_nodes=2, strategy="ddp", logger=False, enable_checkpointing=False
    )
    assert isinstance(trainer.strategy.cluster_environment, SLURMEnvironment)
    assert trainer.strategy.cluster_environment.creates_processes_externally  # srun started them
    assert trainer.global_rank == 5 and trainer.world_size == 8
    monkeypatch.setattr(cli, "is_multirun", lambda: True)
    cli.check_multirun_launch(trainer)  # so a SLURM sweep job may use DDP


def test_a_job_unpickled_in_a_fresh_process_registers_what_conf_needs():
    import json
    import pickle

    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    from densenet_se.resolvers import RESOLVERS

    payload = pickle.dumps(cli.HydraJob(json.dumps))  # what submitit ships to the job
    for name in RESOLVERS:
        OmegaConf.clear_resolver(name)
    ConfigStore.instance().repo.pop("train_schema.yaml", None)
    job = pickle.loads(payload)
    assert job.task is json.dumps
    assert all(OmegaConf.has_resolver(name) for name in RESOLVERS)
    assert "train_schema.yaml" in ConfigStore.instance().repo


@pytest.mark.slow
@pytest.mark.subprocess
def test_submitit_local_launcher_runs_a_two_job_sweep(tmp_path, image_folder):
    tiny = [o for o in TINY if not o.startswith("model.se_reduction=")]
    args = [
        "-m",
        "hydra/launcher=submitit_local",
        "hydra.launcher.timeout_min=10",
        "model.se_reduction=2,3",
        *tiny,
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=2",
        f"data.root={image_folder}",
        f"paths.cache_dir={tmp_path}/cache",
        f"hydra.sweep.dir={tmp_path}/sweep",
        "print_config=false",
    ]
    proc = run_train(args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    root = tmp_path / "sweep"
    with open(root / sweep.SUMMARY_CSV, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["job"], r["status"]) for r in rows] == [("0", "completed"), ("1", "completed")]
    for row, reduction in zip(rows, (2, 3), strict=True):
        job = root / row["run_dir"]
        assert row["run_dir"].startswith(f"{row['job']}_model.se_reduction={reduction}__")
        metrics = json.loads((job / "metrics.json").read_text())
        assert metrics["hparams"]["model"]["se_reduction"] == reduction
        assert float(row["best_val_acc"]) == pytest.approx(metrics["best_val_acc"])
        assert json.loads((job / sweep.STATUS_FILE).read_text())["status"] == "completed"
        assert (job / "train.log").is_file() and (job / "checkpoints" / "best.ckpt").is_file()
    assert (root / ".submitit").is_dir()  # submitit's own job logs and pickles
