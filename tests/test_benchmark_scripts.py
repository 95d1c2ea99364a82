"""The round-2 benchmark scripts run end to end at tiny sizes and print their tables (never timed)."""

from __future__ import annotations

import importlib.util
import re
import sys

import lightning as L
import pytest

from helpers.config import ROOT, TINY


def _script(name: str):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TINY_MODEL = ["model.growth_rate=4", "model.block_config=[1,1]", "model.num_init_features=8"]


@pytest.mark.slow
def test_epoch_floor_prints_the_ratio_and_names_the_overhead(capsys):
    floor = _script("epoch_floor")
    args = ["--epochs", "2", "--profile-epochs", "1", "--images-per-class", "10", "--image-size", "32"]
    floor.main([*args, "--batch-size", "8", *TINY_MODEL])
    lines = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line for line in lines if line.startswith(("floor (", "project ("))}
    assert set(rows) == {"floor", "project"}, lines
    assert all(float(row.split()[-4]) > 0 for row in rows.values())  # median wall s
    ratio = next(line for line in lines if line.startswith("ratio project/floor:"))
    assert re.match(
        r"ratio project/floor: [\d.]+x wall \(target <= 1.03x: (met|NOT met)\); [\d.]+x CPU", ratio
    )
    # 16 training images per epoch (80 % of 20): 2 full batches, and checkpoints written in the background.
    assert any("train 16 + val 4 images per epoch" in line for line in lines)
    assert any(
        line.startswith("checkpoint writes per epoch (in a background thread): 2 files") for line in lines
    )
    hooks = [line for line in lines if line.startswith("  [Callback]")]
    assert any("RunReport.on_validation_end" in line for line in hooks), lines
    assert any(line.startswith("  all callback hooks together:") for line in lines)


@pytest.mark.slow
def test_predict_throughput_compares_each_worker_count_with_the_floor(capsys):
    bench = _script("predict_throughput")
    bench.main(
        ["--images", "12", "--source-size", "40", "--image-size", "32", "--batch-size", "4", "--repeats", "1"]
    )
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("12 demo JPEGs at 40 px -> 32 px; layout tiny; batch 4")
    for name in ("floor (model only", "predict num_workers=0", "predict num_workers=2"):
        row = next(line for line in lines if line.startswith(name))
        rate, ratio = re.search(r"\s([\d.]+)\s+([\d.]+)x", row).groups()
        assert float(rate) > 0 and float(ratio) > 0, row
    assert next(line for line in lines if line.startswith("floor")).split()[-1] == "1.000x"


def test_stamp_callback_marks_the_run_in_order(capsys, tmp_path, image_folder):
    from densenet_se.config import compose_train_config
    from densenet_se.train import build_datamodule, build_module

    stamp = _script("stamp")
    cfg = compose_train_config([*TINY, f"data.root={image_folder}"], tmp_path, ROOT / "conf")
    datamodule = build_datamodule(cfg, None)
    datamodule.setup("fit")
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[stamp.startup_stamp()],
        default_root_dir=str(tmp_path),
    )
    trainer.fit(build_module(cfg, datamodule), datamodule=datamodule)
    stamps = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("STAMP ")]
    names = [s[1] for s in stamps]
    expected = ["fit_start", "sanity_done", "epoch_start_0", "first_step", "epoch_start_1", "train_end"]
    assert names == [*expected, "fit_end"]
    walls = [float(s[2]) for s in stamps]
    assert walls == sorted(walls)  # wall-clock times, in the order they happened


def test_startup_reads_the_timeline_and_gives_verdicts(capsys, monkeypatch):
    startup = _script("startup")
    floor = {"imported": 1.0, "imported cpu": 0.9, "exit": 1.5, "exit cpu": 1.3}
    run = {
        "fit_start": 2.3,
        "fit_start cpu": 2.0,
        "first_step": 2.5,
        "first_step cpu": 2.3,
        "train_end": 4.0,
        "train_end cpu": 3.8,
        "fit_end": 4.2,
        "fit_end cpu": 3.9,
        "exit": 4.5,
        "exit cpu": 4.2,
    }
    monkeypatch.setattr(startup, "stamps", lambda cmd, cwd: dict(floor if "-c" in cmd else run))
    startup.main(["--repeats", "1"])
    out = capsys.readouterr().out
    assert re.search(r"above the import floor\s+1\.50\s+1\.40\s+<= 2\s+met", out), out
    assert re.search(r"end-of-run reports \(train end -> fit end\)\s+0\.20\s+0\.10\s+<= 0\.5\s+met", out), out
    assert re.search(r"end of fit -> process exit\s+0\.30\s+0\.30", out), out


def test_compile_cost_works_out_when_compiling_pays_off(capsys, monkeypatch):
    bench = _script("compile_cost")
    # eager: 2 s to the first step, 10 s epochs; compiled: epochs of 8 s after a long first one.
    runs = {
        "eager": [10.0, 10.0, 10.0],
        "cold": [130.0, 8.0, 8.0],  # 120 s more than eager in epoch 1 and 2 s less per epoch afterwards
        "warm": [25.0, 8.0, 8.0],
    }

    def fake_run(work, name, epochs, compiled, cache, extra):
        seconds = runs.get(name, [1.0])
        return {
            "first_step": 2.0,
            "epochs": seconds,
            "to_epoch_1_end": 2.0 + seconds[0],
            "steady": sorted(seconds[1:])[len(seconds[1:]) // 2] if len(seconds) > 1 else seconds[0],
        }

    monkeypatch.setattr(bench, "run", fake_run)
    bench.main(["--epochs", "3"])
    out = capsys.readouterr().out
    # one-time cost: (130 - 8) - (10 - 10) = 122 s, paid back at 2 s per epoch: 61 epochs
    assert re.search(r"cold compile\s+2\.00\s+130\.00\s+8\.000\s+122\.0\s+61 epochs", out), out
    assert re.search(r"warm compile\s+2\.00\s+25\.00\s+8\.000\s+17\.0\s+8 epochs", out), out
    assert "warm compile one-time cost 17.0 s (target <= 20 s: met)" in out
