"""export: ONNX with a dynamic batch that onnxruntime runs like PyTorch; plain state dicts; JSON sidecars."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import densenet_se.export as export
from densenet_se.checkpoint import build_classifier, load_checkpoint
from densenet_se.data.images import load_image, normalize
from densenet_se.errors import UserError
from densenet_se.models import DenseNetSE
from helpers.config import task_cfg
from helpers.runs import run_cli, tiny_run


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_run(tmp_path_factory)


@pytest.fixture(scope="module")
def ckpt_path(run_dir: Path) -> Path:
    return run_dir / "checkpoints" / "best.ckpt"


def export_cfg(out: Path, overrides: list[str]):
    return task_cfg("export", overrides, output_dir=str(out))


def real_batch(run_dir: Path, n: int, image_size: int) -> torch.Tensor:
    split = json.loads((run_dir / "split.json").read_text())
    files = [Path(split["root"]) / rel for rel, _ in split["val"][:n]]
    return normalize(torch.stack([load_image(f, image_size) for f in files]))


@pytest.mark.parametrize("exporter", [pytest.param("dynamo", marks=pytest.mark.slow), "legacy"])
def test_onnx_round_trip_with_dynamic_batch(run_dir, ckpt_path, tmp_path, exporter):
    result = export.run(export_cfg(tmp_path, [f"ckpt_path={ckpt_path}", f"exporter={exporter}"]))
    path = tmp_path / "model.onnx"
    assert result["output"] == path and path.is_file()
    assert not list(tmp_path.glob("*.data"))  # one self-contained file
    graph = onnx.load(str(path)).graph
    assert [i.name for i in graph.input] == ["images"] and [o.name for o in graph.output] == [
        "logits",
        "probabilities",
    ]
    batch_dim = graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param and not batch_dim.dim_value  # symbolic, not fixed

    ckpt = load_checkpoint(ckpt_path)
    size = ckpt["hyper_parameters"]["image_size"]
    module = build_classifier(ckpt)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for n in (1, 3):
        x = real_batch(run_dir, n, size)
        with torch.inference_mode():
            logits = module(x)
        got_logits, got_probs = session.run(None, {"images": x.numpy()})
        assert got_logits.shape == (n, 2)
        np.testing.assert_allclose(got_logits, logits.numpy(), atol=1e-4, rtol=0)
        np.testing.assert_allclose(got_probs, logits.softmax(dim=1).numpy(), atol=1e-4, rtol=0)
        np.testing.assert_allclose(got_probs.sum(axis=1), 1.0, atol=1e-5)
    side = json.loads((tmp_path / "model.json").read_text())
    assert side["class_names"] == ["Monkeypox", "Others"] and side["image_size"] == size
    assert side["mean"] == pytest.approx([0.485, 0.456, 0.406]) and side["std"] == pytest.approx(
        [0.229, 0.224, 0.225]
    )
    assert side["format"] == "onnx" and side["outputs"] == ["logits", "probabilities"]
    assert side["max_abs_diff_vs_pytorch"] < 1e-4


def test_state_dict_loads_as_pretrained_and_with_weights_only(run_dir, ckpt_path, tmp_path):
    out = tmp_path / "weights" / "tiny.pt"
    export.run(export_cfg(tmp_path, [f"ckpt_path={ckpt_path}", "format=state_dict", f"output={out}"]))
    state = torch.load(out, map_location="cpu", weights_only=True)
    assert "features.conv0.weight" in state and "classifier.weight" in state and "se.fc1.weight" in state
    assert not any(k.startswith("model.") for k in state)
    side = json.loads((tmp_path / "weights" / "tiny.json").read_text())
    assert side["format"] == "state_dict" and side["class_names"] == ["Monkeypox", "Others"]
    assert side["model"]["block_config"] == [1, 1] and side["model"]["growth_rate"] == 4

    # model.pretrained=<file> goes through DenseNetSE(pretrained=...): the same network comes back.
    net = DenseNetSE(side["num_classes"], **side["model"], pretrained=str(out)).eval()
    assert net.pretrained_report.new == () and net.pretrained_report.skipped == ()
    x = real_batch(run_dir, 3, side["image_size"])
    with torch.inference_mode():
        assert torch.equal(net(x), build_classifier(load_checkpoint(ckpt_path))(x))


@pytest.mark.slow
def test_export_py_defaults_to_its_run_dir_and_rejects_bad_values(ckpt_path, tmp_path, monkeypatch, capsys):
    out = tmp_path / "export_run"
    status = run_cli(
        "export", [f"ckpt_path={ckpt_path}", "format=state_dict", f"hydra.run.dir={out}"], monkeypatch
    )
    assert status == 0
    assert (out / "model.pt").is_file() and (out / "model.json").is_file()
    printed = capsys.readouterr().out
    assert printed.count(f"to {out / 'model.pt'}") == 1  # once on the console, and kept in export.log
    assert f"exported {ckpt_path} as state_dict to {out / 'model.pt'}" in (out / "export.log").read_text()
    status = run_cli(
        "export",
        [f"ckpt_path={ckpt_path}", "format=tflite", f"hydra.run.dir={tmp_path / 'bad'}"],
        monkeypatch,
    )
    assert status == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: format='tflite' is not allowed; choose one of: onnx, state_dict."
    )
    # The first export's directory holds its record: a second command there would overwrite it.
    status = run_cli("export", [f"ckpt_path={ckpt_path}", f"hydra.run.dir={out}"], monkeypatch)
    assert status == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: hydra.run.dir={out} already holds a run ({out / '.hydra' / 'config.yaml'} is there), whose "
        "record this command would overwrite; choose another directory (or leave hydra.run.dir unset)."
    )
    with pytest.raises(UserError, match="must not end in .json"):
        export.run(export_cfg(tmp_path, [f"ckpt_path={ckpt_path}", f"output={tmp_path / 'm.json'}"]))
