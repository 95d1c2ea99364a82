"""Crafted checkpoints are refused with one sentence and exit 2, before anything large is allocated."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from densenet_se.archive import MAX_PICKLE_BYTES
from densenet_se.checkpoint import build_classifier, load_checkpoint
from densenet_se.errors import UserError
from densenet_se.models.densenet import DenseNetSE, parameter_count
from helpers.config import ROOT
from helpers.crafted import (
    TINY_TORCHVISION,
    Storage,
    Tensor,
    deflate_bomb,
    shared_list_bomb,
    tiny_checkpoint,
    tiny_hparams,
    torch_zip,
    write_zip,
)
from helpers.runs import run_cli, subprocess_env

# hyper_parameters a hostile tester tried (and variants of them), with what the refusal must name.
CRAFTED_HPARAMS = {
    "layers": (
        {"model": {"block_config": [1_000_000]}},
        "it must be a non-empty list of integers >= 1, at most 1000 layers in all",
    ),
    "many_blocks": (
        {"model": {"block_config": [1] * 5000}},
        "it must be a non-empty list of integers >= 1, at most 1000 layers in all",
    ),
    "parameters": (
        {"model": {"block_config": [900], "growth_rate": 64}},
        "parameters, more than the 2e+08 allowed",
    ),
    "wide_stem": (
        {"model": {"num_init_features": 2000}, "image_size": 4096},
        "GiB of activations per image",
    ),
    "huge_int": ({"model": {"growth_rate": 2**200}}, "parameters, more than the 2e+08 allowed"),
    "image_size": ({"image_size": 20_000}, "its image_size must be an integer in [32, 4096], got 20000"),
    "image_size_str": ({"image_size": "224"}, "its image_size must be an integer in [32, 4096], got '224'"),
    "image_size_bool": ({"image_size": True}, "its image_size must be an integer"),
    "std_zero": ({"std": [0.229, 0.0, 0.225]}, "its std must be 3 numbers in [0.001, 1]"),
    "std_nan": ({"std": [0.229, math.nan, 0.225]}, "its std must be 3 numbers"),
    "mean_inf": ({"mean": [math.inf, 0.4, 0.4]}, "its mean must be 3 numbers in [0, 1]"),
    "mean_short": ({"mean": [0.5]}, "its mean must be 3 numbers"),
    "std_str": ({"std": "0.2"}, "its std must be 3 numbers"),
    "classes_mismatch": ({"num_classes": 5}, "its class_names must be a list of num_classes=5 names"),
    "classes_not_list": ({"class_names": "abc"}, "its class_names must be a list of num_classes=3 names"),
    "classes_duplicate": ({"class_names": ["a", "a", "b"]}, "its class_names must be distinct"),
    "classes_not_str": ({"class_names": [1, 2, 3]}, "its class_names must be distinct non-empty strings"),
    "num_classes_str": ({"num_classes": "3"}, "its num_classes must be an integer >= 2, got '3'"),
    "num_classes_huge": ({"num_classes": 10**9}, "its class_names must be a list of num_classes=1000000000"),
    "se_placement": (
        {"model": {"se_placement": ["head"]}},
        "is not allowed; choose one of: head, blocks, none",
    ),
    "memory_efficient": ({"model": {"memory_efficient": "no"}}, "memory_efficient must be true or false"),
    "channels_last": ({"model": {"channels_last": 1}}, "channels_last must be true or false, got 1"),
    "compression": (
        {"model": {"compression_rate": float("nan")}},
        "compression_rate=nan is out of range; it must be a number in (0, 1]",
    ),
    "model_not_dict": ({"model": "densenet_se"}, "its model settings must be a dict of named values"),
    "arch_unknown": (
        {"model": {"arch": "os.system"}},
        "model.arch='os.system' is not allowed; choose one of: densenet_se, torchvision",
    ),
    # model.arch=torchvision: only a name torchvision lists is ever built, and it is sized on the meta device.
    "tv_name": (
        {"model": {"arch": "torchvision", "name": "builtins.exec"}},
        "name='builtins.exec' is out of range; it must be the name of a torchvision classification model",
    ),
    "tv_classes": (
        {
            "model": {"arch": "torchvision", "name": "vgg11"},
            "num_classes": 20_000,
            "class_names": [f"c{i}" for i in range(20_000)],
        },
        "torchvision's vgg11 with 20000 classes has 2.11e+08 parameters, more than the 2e+08 allowed",
    ),
    "tv_activations": (
        {"model": {"arch": "torchvision", "name": "vgg11"}, "image_size": 4096},
        "image_size=4096 with torchvision's vgg11 needs about 12 GiB of activations per image",
    ),
    "tv_size": (
        {"model": {"arch": "torchvision", "name": "vit_b_16"}},
        "torchvision's vit_b_16 cannot take 32 px images (AssertionError: Wrong image height!",
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CRAFTED_HPARAMS))
def test_crafted_hyper_parameters_are_refused_in_one_sentence(tmp_path, name):
    overrides, expected = CRAFTED_HPARAMS[name]
    path = tmp_path / f"{name}.ckpt"
    tiny_checkpoint(path, **overrides)
    with pytest.raises(UserError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert message.startswith(f"refusing to load checkpoint {path}: its "), message
    assert expected in message and "\n" not in message and message.endswith("."), message
    assert len(message) < 600, message


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("epoch", "7", "its epoch must be a non-negative integer, got '7'"),
        ("global_step", -1, "its global_step must be a non-negative integer, got -1"),
        ("val_acc_best", "0.9", "its val_acc_best must be a number in [0, 1] or null, got '0.9'"),
    ],
)
def test_crafted_progress_values_are_refused(tmp_path, key, value, expected):
    path = tmp_path / "x.ckpt"
    tiny_checkpoint(path)
    ckpt = torch.load(path, weights_only=True)
    torch.save({**ckpt, key: value}, path)
    with pytest.raises(UserError, match=re.escape(f"refusing to load checkpoint {path}: {expected};")):
        load_checkpoint(path)


def _archive(tmp_path: Path, kind: str) -> Path:
    path = tmp_path / f"{kind}.ckpt"
    hparams = tiny_hparams()
    if kind == "deflate_bomb":  # 3 MB on disk, 3 GiB once inflated
        return deflate_bomb(path, gib=3)
    if kind == "declares_more_than_the_file":
        tensor = Tensor(Storage("0", 4), (4,), (1,))
        return torch_zip(
            path, {"state_dict": {"w": tensor}, "hyper_parameters": hparams}, [("0", bytes(16), 0, 2**31)]
        )
    if kind == "stride_zero":  # a 16-byte storage posing as 10**12 floats
        tensor = Tensor(Storage("0", 4), (10**12,), (0,))
        return torch_zip(
            path, {"state_dict": {"w": tensor}, "hyper_parameters": hparams}, [("0", bytes(16), 0, 16)]
        )
    if kind == "shared_list_bomb":  # 2**60 leaves in a few hundred bytes of pickle
        return torch_zip(path, {"state_dict": {}, "hyper_parameters": hparams, "x": shared_list_bomb()})
    if kind == "big_pickle":
        blob = b"x" * (MAX_PICKLE_BYTES + 1)
        return write_zip(path, [("a/data.pkl", blob, 0, len(blob)), ("a/version", b"3\n", 0, 2)])
    if kind == "huge_directory":  # 60k entries with long names: ~10 MB of zip directory
        return write_zip(path, [(f"a/data/{i:0120d}", b"", 0, 0) for i in range(60_000)])
    if kind == "legacy_format":  # torch's pre-1.6 pickle format reads storages of any declared size
        torch.save({"state_dict": {}}, path, _use_new_zipfile_serialization=False)
        return path
    if kind == "deflated_by_zipfile":  # an honest checkpoint re-packed with compression
        tiny_checkpoint(tmp_path / "honest.ckpt")
        with (
            zipfile.ZipFile(tmp_path / "honest.ckpt") as src,
            zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as dst,
        ):
            for info in src.infolist():
                dst.writestr(info.filename, src.read(info))
        return path
    raise AssertionError(kind)


ARCHIVES = {
    "deflate_bomb": "refusing to load checkpoint {path}: its entry a/data/0 is compressed (3.0 GiB once inflated)",
    "declares_more_than_the_file": "refusing to load checkpoint {path}: its entry a/data/0 declares 2.0 GiB, more",
    "stride_zero": "refusing to load checkpoint {path}: a tensor of shape (1000000000000,) claims more elements",
    "shared_list_bomb": "refusing to load checkpoint {path}: it holds more than 50000000 values or nests them",
    "big_pickle": "refusing to load checkpoint {path}: its entry a/data.pkl is 16.0 MiB (at most 16.0 MiB",
    "huge_directory": "refusing to load checkpoint {path}: its zip directory is 9.9 MiB (at most 8.0 MiB is read)",
    "legacy_format": "checkpoint {path} is not a PyTorch checkpoint (it is not the zip archive torch.save writes)",
    "deflated_by_zipfile": "refusing to load checkpoint {path}: its entry ",
}


@pytest.mark.parametrize("kind", sorted(ARCHIVES))
def test_crafted_archives_are_refused_before_they_are_read(tmp_path, kind):
    path = _archive(tmp_path, kind)
    with pytest.raises(UserError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert message.startswith(ARCHIVES[kind].format(path=path)), message
    assert "\n" not in message and message.endswith("."), message


@pytest.mark.slow
def test_parameter_count_matches_the_built_network():
    # The bound is computed without building the network; the network itself is the reference.
    layouts = [
        {"growth_rate": 32, "block_config": (6, 12, 24, 16), "num_init_features": 64, "bn_size": 4},
        {"growth_rate": 5, "block_config": (3, 2, 4), "num_init_features": 7, "bn_size": 3},
    ]
    for layout in layouts:
        for placement in ("none", "head", "blocks"):
            for rate in (0.5, 0.7):
                kwargs = {**layout, "compression_rate": rate, "se_reduction": 2, "se_placement": placement}
                built = sum(p.numel() for p in DenseNetSE(3, **kwargs).parameters())
                assert parameter_count(3, **kwargs) == built, kwargs


def test_honest_checkpoints_still_load(tmp_path):
    original = tiny_checkpoint(tmp_path / "x.ckpt", lr="not used for inference", optimizer=None)
    ckpt = load_checkpoint(tmp_path / "x.ckpt")
    assert torch.equal(
        ckpt["state_dict"]["model.classifier.weight"], original.state_dict()["model.classifier.weight"]
    )


@pytest.mark.slow
@pytest.mark.parametrize("tool", ["eval", "predict", "export"])
@pytest.mark.parametrize("name", ["image_size_str", "std_zero", "layers"])
def test_entry_points_refuse_crafted_checkpoints_with_exit_2(tmp_path, monkeypatch, capsys, tool, name):
    overrides, expected = CRAFTED_HPARAMS[name]
    path = tiny_checkpoint(tmp_path / "x.ckpt", **overrides) and tmp_path / "x.ckpt"
    args = [f"ckpt_path={path}", f"hydra.run.dir={tmp_path / 'out'}"]
    if tool == "predict":
        args.append(f"input={tmp_path}")
    assert run_cli(tool, args, monkeypatch) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: refusing to load checkpoint {path}: its "), lines
    assert expected in lines[0]


@pytest.mark.slow
def test_refusals_stay_within_bounded_memory_through_the_entry_points(tmp_path):
    """Each crafted file would need 2 GiB or more; under a 768 MiB allowance each is refused with exit 2."""
    images = tmp_path / "images"
    images.mkdir()
    files = {
        "bomb": deflate_bomb(tmp_path / "bomb.ckpt", gib=3),
        "layers": tmp_path / "layers.ckpt",
        "image_size": tmp_path / "image_size.ckpt",
        "wide_stem": tmp_path / "wide_stem.ckpt",
        "tv_head": tmp_path / "tv_head.ckpt",
    }
    for name in ("layers", "image_size", "wide_stem"):
        tiny_checkpoint(files[name], **CRAFTED_HPARAMS[name][0])
    # torchvision's ResNet-18 for a million classes: a 2 GB classifier layer, were it ever allocated.
    names = [str(i) for i in range(10**6)]
    tiny_checkpoint(files["tv_head"], model=TINY_TORCHVISION, num_classes=len(names), class_names=names)
    runs: list[str] = []
    for tool, name in [
        ("predict", "bomb"),
        ("eval", "bomb"),
        ("export", "bomb"),
        ("predict", "layers"),
        ("predict", "image_size"),
        ("predict", "wide_stem"),
        ("predict", "tv_head"),
    ]:
        runs += ["--", tool, f"ckpt_path={files[name]}", f"hydra.run.dir={tmp_path / 'out' / name}"]
        runs += [f"input={images}"] if tool == "predict" else []
    env = {**subprocess_env(), "MALLOC_ARENA_MAX": "1", "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "tests"), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "helpers" / "memory_limit.py"), "768", *runs[1:]],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(results) == 7, proc.stdout + proc.stderr
    for result in results:
        lines = [line for line in result["stderr"].splitlines() if line.strip()]
        assert result["code"] == 2 and len(lines) == 1, result
        assert lines[0].startswith("error: refusing to load checkpoint "), result


def test_weights_that_do_not_fit_are_one_short_sentence(tmp_path):
    path = tmp_path / "x.ckpt"
    tiny_checkpoint(path)
    ckpt = torch.load(path, weights_only=True)
    extra = {f"model.extra{i}.weight": torch.zeros(1) for i in range(2_000)}
    torch.save({**ckpt, "state_dict": {**ckpt["state_dict"], **extra}}, path)
    with pytest.raises(UserError) as info:
        build_classifier(load_checkpoint(path), source="checkpoint x")
    message = str(info.value)
    assert message.startswith("checkpoint x's weights do not fit the model its hyper_parameters describe (")
    assert "model.extra0.weight" in message and len(message) < 400 and "\n" not in message
