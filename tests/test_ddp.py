"""DDP: unpadded evaluation shards, ranks from the launcher's environment, and a real 2-process CPU run."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from densenet_se import distributed
from densenet_se.data import ImageFolderDataModule
from helpers.config import TINY
from helpers.images import make_image_folder, split_files
from helpers.runs import run_train

RANK_KEYS = ("RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK")


def _trainer(rank: int, world: int) -> SimpleNamespace:
    return SimpleNamespace(
        global_rank=rank,
        world_size=world,
        is_global_zero=rank == 0,
        strategy=SimpleNamespace(root_device=torch.device("cpu")),
    )


def test_eval_sampler_gives_every_sample_to_exactly_one_process():
    dataset = list(range(7))
    shards = [list(distributed.eval_sampler(dataset, _trainer(r, 2))) for r in (0, 1)]
    assert shards == [[0, 2, 4, 6], [1, 3, 5]]
    assert sorted(shards[0] + shards[1]) == dataset  # no padding, no repeats
    assert distributed.eval_sampler(dataset, _trainer(0, 1)) is None
    assert distributed.eval_sampler(dataset, None) is None
    # Fewer samples than processes: a process without a batch would hang at the metric sync, so pad instead.
    assert distributed.eval_sampler([0], _trainer(0, 2)) is None


@pytest.mark.parametrize("cache", ["memory", "device"])
def test_datamodule_evaluation_loaders_are_unpadded_under_ddp(tmp_path, cache):
    root = make_image_folder(tmp_path / "images", classes={"Monkeypox": 9, "Others": 8})
    dm = ImageFolderDataModule(
        root=str(root),
        image_size=32,
        batch_size=2,
        val_fraction=0.3,
        cache_dir=str(tmp_path / "c"),
        cache=cache,
    )
    dm.setup()
    expected = dm._images[dm._indices["val"]].flatten(1)
    seen = []
    for rank in (0, 1):
        dm.trainer = _trainer(rank, 2)
        seen += [images.flatten(1) for images, _ in dm.val_dataloader()]
    seen = torch.cat(seen)
    assert len(expected) % 2 == 1 and len(seen) == len(expected)
    assert sorted(map(tuple, seen.tolist())) == sorted(
        map(tuple, expected.tolist())
    )  # each image exactly once


@pytest.mark.parametrize(
    ("env", "suffix"),
    [
        ({}, ""),
        ({"SLURM_PROCID": "0"}, ""),
        ({"SLURM_PROCID": "3"}, ".rank3"),
        ({"RANK": "2", "LOCAL_RANK": "0"}, ".rank2"),
        ({"LOCAL_RANK": "1"}, ".rank1"),  # a process Lightning started on this node
        ({"NODE_RANK": "1", "LOCAL_RANK": "0"}, ".node1.rank0"),
    ],
)
def test_rank_from_the_launchers_environment(monkeypatch, env, suffix):
    for key in RANK_KEYS:
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert distributed.rank_suffix() == suffix
    assert distributed.is_rank_zero() == (suffix == "")


@pytest.mark.parametrize(
    ("trainer", "processes"),
    [
        ({"accelerator": "cpu", "devices": 2, "num_nodes": 1}, 2),
        ({"accelerator": "gpu", "devices": 4, "num_nodes": 2}, 8),
        ({"accelerator": "gpu", "devices": [0, 1], "num_nodes": 1}, 2),
        ({"accelerator": "gpu", "devices": "0,1,2", "num_nodes": 1}, 3),
        ({"accelerator": "cpu", "devices": "auto", "num_nodes": 1}, 1),
        ({"accelerator": "cpu", "devices": 1}, 1),
    ],
)
def test_expected_processes(trainer, processes):
    assert distributed.expected_processes(OmegaConf.create(trainer)) == processes


@pytest.mark.slow
@pytest.mark.ddp
@pytest.mark.subprocess
def test_two_process_cpu_ddp_run_evaluates_every_image_once_and_writes_reports_once(tmp_path):
    # Odd validation and test splits (7 and 5 images) with batches of 3: the processes get uneven shards.
    images = make_image_folder(tmp_path / "images", classes={"Monkeypox": 17, "Others": 12})
    tiny = [o for o in TINY if o.split("=", 1)[0] not in ("trainer", "data.batch_size")]
    args = [
        *tiny,
        "trainer=ddp_cpu",
        "trainer.max_epochs=1",
        "data.batch_size=3",
        "data.val_fraction=0.25",
        "data.test_fraction=0.2",
        f"data.root={images}",
        f"paths.cache_dir={tmp_path}/cache",
    ]
    # The default, clock-named run directory: Lightning re-runs the command for the second process and passes
    # it this process's directory (hydra.run.dir), so both share one.
    proc = run_train(args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = list((tmp_path / "outputs").glob("*/*"))
    assert len(runs) == 1
    out = runs[0]
    n_val = len(split_files(out / "split.json", "val"))
    n_test = len(split_files(out / "split.json", "test"))
    assert (n_val, n_test) == (7, 5)

    metrics = json.loads((out / "metrics.json").read_text())
    assert sum(map(sum, metrics["test"]["confusion_matrix"])) == n_test
    # Lightning's padded sampler would have shown 8 validation images (one twice) instead of 7.
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    confmat = ckpt["callbacks"]["RunReport"]["confmats"]["0"]
    assert sum(map(sum, confmat)) == n_val
    assert metrics["best_val_acc"] * n_val == pytest.approx(round(metrics["best_val_acc"] * n_val), abs=1e-4)

    # One run directory and one set of reports: the second process logs to its own file and writes nothing else.
    assert sorted(p.name for p in out.glob("*.log")) == ["train.log", "train.rank1.log"]
    assert (out / "train.log").read_text().count("epoch 1/1") == 1
    rank1 = (out / "train.rank1.log").read_text()
    assert "GLOBAL_RANK: 1" in rank1 and "epoch 1/1" not in rank1
    # events.out.tfevents.<time>.<host>.<pid>.<n>: fit and test write a file each, both from rank 0.
    writers = {p.name.split(".")[-2] for p in (out / "tensorboard").rglob("events.out.tfevents.*")}
    assert len(writers) == 1
    assert len(list(out.rglob("config.yaml"))) == 1
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]
