"""The fast paths, checked for correctness on CPU (never timed): the GPU preset, device cache +
channels_last + compile, no host reads per training step, and the benchmark scripts end to end.

That the cached path decodes nothing per epoch is test_data_module.py::test_no_decoding_in_a_cached_epoch.
"""

from __future__ import annotations

import importlib.util
import math
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from densenet_se.data import augment_ops
from densenet_se.data.loaders import DeviceBatches
from densenet_se.train import build_datamodule, build_module
from helpers.config import ROOT, TINY, compose_cfg
from helpers.runs import subprocess_env


def test_gpu_preset_sets_the_fast_path(tmp_path):
    cfg = compose_cfg(tmp_path, ["trainer=gpu"])
    assert cfg.trainer.accelerator == "gpu" and cfg.trainer.devices == 1
    assert cfg.trainer.precision == "bf16-mixed" and cfg.trainer.benchmark is True
    assert cfg.model.channels_last is True and cfg.data.cache == "device"
    assert cfg.model.compile is False  # opt-in: it costs a compile at start
    assert cfg.trainer.max_epochs == 20 and cfg.trainer.log_every_n_steps == 10  # the rest from default.yaml
    notebook = compose_cfg(tmp_path, ["trainer=gpu", "experiment=notebook"])
    assert (
        notebook.data.image_size == 224 and notebook.data.cache == "device" and notebook.model.channels_last
    )


@pytest.mark.slow
def test_gpu_preset_yields_to_the_command_line_and_is_shared_by_ddp(tmp_path):
    cfg = compose_cfg(tmp_path, ["trainer=gpu", "data.cache=memory", "model.channels_last=false"])
    assert cfg.data.cache == "memory" and cfg.model.channels_last is False
    assert cfg.trainer.precision == "bf16-mixed"
    ddp = compose_cfg(tmp_path, ["trainer=ddp"])
    assert ddp.trainer.strategy == "ddp" and ddp.trainer.precision == "bf16-mixed"
    assert ddp.data.cache == "device" and ddp.model.channels_last is True
    for overrides in ([], ["trainer=cpu"], ["trainer=ddp_cpu"]):
        cfg = compose_cfg(tmp_path, overrides)
        assert cfg.data.cache == "memory" and cfg.model.channels_last is False, overrides


def _tiny_parts(tmp_path: Path, image_folder: Path, overrides: list[str]):
    cfg = compose_cfg(tmp_path, [*TINY, f"data.root={image_folder}", *overrides])
    datamodule = build_datamodule(cfg, tmp_path / "run")
    datamodule.setup("fit")
    return cfg, datamodule, build_module(cfg, datamodule)


def _trainer(tmp_path: Path, **kwargs) -> L.Trainer:
    args = dict(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        num_sanity_val_steps=0,
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
        enable_checkpointing=False,
        default_root_dir=str(tmp_path),
    )
    args.update(kwargs)
    return L.Trainer(**args)


@pytest.mark.slow
def test_device_cache_channels_last_and_compile_train_on_cpu(tmp_path, image_folder, monkeypatch):
    # Correctness only: inductor's C++ code generation takes minutes on a cold cache, so the graphs that
    # dynamo captures run through AOTAutograd's eager backend (the same tracing and autograd, no codegen).
    from torch._dynamo import lookup_backend

    graphs = []
    aot_eager = lookup_backend("aot_eager")

    def recording_backend(gm, example_inputs):
        graphs.append([tuple(t.shape) for t in example_inputs if isinstance(t, torch.Tensor)])
        return aot_eager(gm, example_inputs)

    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: real_compile(model, backend=recording_backend))
    torch._dynamo.reset()
    overrides = ["data.cache=device", "model.channels_last=true", "model.compile=true"]
    _, datamodule, module = _tiny_parts(tmp_path, image_folder, overrides)
    trainer = _trainer(tmp_path, limit_train_batches=1, limit_val_batches=1)
    before = {k: v.clone() for k, v in module.model.state_dict().items()}
    trainer.fit(module, datamodule=datamodule)
    torch._dynamo.reset()

    assert isinstance(trainer.train_dataloader, DeviceBatches)  # batches indexed out of the resident cache
    assert module.model.features.conv0.weight.is_contiguous(memory_format=torch.channels_last)
    assert graphs, "the compiled forward never ran"
    loss = float(trainer.callback_metrics["train/loss"])
    assert math.isfinite(loss) and 0.0 < loss < 5.0
    assert math.isfinite(float(trainer.callback_metrics["val/loss"]))
    changed = [
        k for k, v in module.model.state_dict().items() if v.is_floating_point() and not v.equal(before[k])
    ]
    assert any(
        k.endswith("conv0.weight") for k in changed
    )  # one optimizer step went through the compiled net
    assert set(module.state_dict()) >= {f"model.{k}" for k in before}  # keys unchanged by compile


SYNC_POINTS = {
    # Host reads of a tensor's value: each one waits for the device queue to drain on a GPU.
    torch.Tensor: ("item", "tolist", "numpy", "__bool__", "__float__", "__int__", "nonzero", "unique"),
    # Ops whose output size depends on the values: they read the device too (torchmetrics' argument
    # checks call torch.unique; bincount reads the maximum).
    torch: ("unique", "nonzero", "bincount", "masked_select"),
}


# torch.optim reads its step counters with .item(): they are host tensors (capturable=False), on GPUs too.
HOST_ONLY_CALLERS = (str(Path(torch.optim.__file__).parent),)


@pytest.fixture
def host_reads(monkeypatch) -> Counter:
    """Counts calls of the Python-level host-sync points above, by name (not those of torch.optim)."""
    counts: Counter = Counter()

    def counting(owner, name):
        original = getattr(owner, name)

        def wrapper(*args, **kwargs):
            if not sys._getframe(1).f_code.co_filename.startswith(HOST_ONLY_CALLERS):
                counts[name] += 1
            return original(*args, **kwargs)

        return wrapper

    for owner, names in SYNC_POINTS.items():
        for name in names:
            monkeypatch.setattr(owner, name, counting(owner, name))
    return counts


@pytest.mark.slow
def test_training_steps_add_no_host_reads(tmp_path, image_folder, host_reads, monkeypatch):
    # Same run with 2 and with 6 training steps: every host read must be per epoch, none per step. Logged
    # every step, with a logger, checkpoints and an LR monitor, as in real runs (the NaN guard reads each
    # CPU step by design and batches its reads on GPUs, see densenet_se.safety). Every augmentation stage on,
    # taking its GPU path (on the CPU it reads the draws, which live there): each image draws its own
    # parameters on the device, none read back.
    monkeypatch.setattr(augment_ops, "reads_are_free", lambda device: False)
    augment = [
        "augment=strong",
        "augment.vflip=0.5",
        "augment.rotation=10",
        "augment.brightness=0.1",
        "augment.hue=0.1",
    ]
    counts = []
    for steps in (2, 6):
        L.seed_everything(0, verbose=False)
        _, datamodule, module = _tiny_parts(
            tmp_path,
            image_folder,
            ["data.cache=device", "data.batch_size=2", "trainer.max_epochs=1", *augment],
        )
        trainer = _trainer(
            tmp_path / str(steps),
            limit_train_batches=steps,
            log_every_n_steps=1,
            logger=CSVLogger(str(tmp_path / str(steps))),
            enable_checkpointing=True,
            callbacks=[
                ModelCheckpoint(dirpath=str(tmp_path / str(steps) / "ckpt"), monitor="val/acc", mode="max"),
                LearningRateMonitor(logging_interval="epoch"),
            ],
        )
        host_reads.clear()
        trainer.fit(module, datamodule=datamodule)
        assert trainer.global_step == steps
        counts.append(dict(host_reads))
    per_step = {
        k: (counts[1].get(k, 0) - counts[0].get(k, 0)) / 4 for k in counts[0].keys() | counts[1].keys()
    }
    assert all(v == 0 for v in per_step.values()), f"host reads per training step: {per_step}"


def test_tf32_matmuls_only_on_cuda(monkeypatch, tmp_path, image_folder):
    _, _, module = _tiny_parts(tmp_path, image_folder, [])
    calls = []
    monkeypatch.setattr(torch, "set_float32_matmul_precision", calls.append)
    for device, expected in (("cpu", []), ("cuda", ["high"])):
        fake = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device(device)))
        monkeypatch.setattr(type(module), "trainer", property(lambda self, t=fake: t))
        monkeypatch.setattr(module, "_trainer", fake, raising=False)
        calls.clear()
        module.setup("fit")
        assert calls == expected, device


def _script(name: str, *args: str) -> subprocess.CompletedProcess:
    env = subprocess_env() | {"OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / name), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _benchmark_module(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_compare_notebook_prints_its_table(capsys):
    # In-process (its own entry point, argv and all): a subprocess would spend most of the time importing.
    compare = _benchmark_module("compare_notebook")
    args = ["--epochs", "1", "--images-per-class", "8", "--image-size", "32", "--batch-size", "8"]
    compare.main([*args, "trainer.log_every_n_steps=1"])
    lines = capsys.readouterr().out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("loop") and "median s/epoch" in line)
    rows = lines[header + 2 : header + 5]
    assert [r.split()[0] for r in rows] == ["notebook", "compute", "project"], lines
    for row in rows:
        assert float(row.split()[-1]) > 0  # total seconds
    ratio = next(line for line in lines if line.startswith("ratio notebook/project median epoch time:"))
    assert float(ratio.split(":")[1].split("x")[0]) > 0
    assert any("train 12 + val 4 images per epoch" in line for line in lines)  # 2 x 8 images, 80/20 split


def test_integrity_cost_prints_its_tables(capsys, tmp_path):
    integrity = _benchmark_module("integrity_cost")
    integrity.main(
        ["--images-per-class", "4", "--image-size", "32", "--repeats", "1", "--work-dir", str(tmp_path)]
    )
    out = capsys.readouterr().out
    assert out.startswith("8 files") and "cache of 8 images at 32 px" in out
    for row in (
        "file_digests: sha256-128 (used)",
        "read once, hash + decode (now)",
        "verified load",
        "check the digest",
    ):
        line = next(line for line in out.splitlines() if row in line)
        assert float(line.split()[-2]) > 0 and float(line.split()[-1]) > 0, line


@pytest.mark.slow
@pytest.mark.subprocess
def test_model_throughput_prints_its_table():
    args = ["--steps", "1", "--warmup", "0", "--repeats", "1", "--image-size", "32", "--batch-size", "4"]
    proc = _script("model_throughput.py", *args, "--variants", "none", "none_me")
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert any(line.startswith("variant") and "memory ratio" in line for line in lines), proc.stdout
    me = next(line for line in lines if line.startswith("DenseNetSE se=none memory_efficient"))
    speed, _vs, ref, memory, time_ratio = me.split()[-5:]
    assert ref == "none" and float(speed) > 0 and float(time_ratio) > 0
    assert 0 < float(memory) < 1.0  # recomputing the bottlenecks keeps fewer tensors alive


@pytest.mark.slow
def test_gpu_notebook_runs_its_throughput_part_on_cpu(capsys):
    gpu = _benchmark_module("gpu_notebook")
    args = [
        "--device",
        "cpu",
        "--skip-experiment",
        "--images",
        "16",
        "--source-size",
        "40",
        "--image-size",
        "32",
    ]
    args += ["--batch-size", "8", "--warmup-epochs", "1", "--epochs", "1", "--workers", "2", "--no-compile"]
    args += ["--notebook-epochs", "1"]
    gpu.main([*args, "model=densenet_tiny_se", "model.growth_rate=4", "model.block_config=[1,1]"])
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("measure") and "verdict" in line for line in lines), lines
    row = next(line for line in lines if line.startswith("train images/s, batch 8"))
    match = re.search(r"\s([\d.]+)\s+>= 4000\s+(met|NOT met)$", row)
    assert match and float(match.group(1)) > 0, row  # "NOT met" on a CPU, of course
    fetch = next(line for line in lines if line.startswith("host time getting the next batch"))
    assert float(fetch.split()[-1]) > 0
    loop = next(
        line for line in lines if line.startswith("notebook's own loop, 20 epochs, s (from 1 epochs)")
    )
    assert float(loop.split()[-1]) > 0 and any(
        line.startswith("notebook loop epochs (s): ") for line in lines
    )
    assert "experiment=notebook (growth_rate=4, block_config=[1, 1]" in lines[0]


def test_gpu_notebook_needs_a_gpu_unless_told_cpu(monkeypatch):
    gpu = _benchmark_module("gpu_notebook")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="no CUDA device is visible.*--device cpu"):
        gpu.main([])
