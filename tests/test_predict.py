"""predict: CSV of probabilities with the checkpoint's preprocessing, bad files skipped, Grad-CAM overlays."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import densenet_se.predict as predict
from densenet_se.checkpoint import build_classifier, load_checkpoint
from densenet_se.data.images import load_image, normalize
from densenet_se.errors import UserError
from densenet_se.explain import GradCAM
from helpers.config import task_cfg
from helpers.runs import run_cli, tiny_run


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_run(tmp_path_factory)


@pytest.fixture(scope="module")
def ckpt_path(run_dir: Path) -> Path:
    return run_dir / "checkpoints" / "best.ckpt"


@pytest.fixture
def mixed_folder(tmp_path: Path) -> Path:
    """Good images (one nested, one not square), a corrupt .jpg, a truncated .png and a non-image file."""
    folder = tmp_path / "inbox"
    (folder / "nested" / "deeper").mkdir(parents=True)
    rng = np.random.default_rng(1)
    for name, size in (("a.png", (40, 40)), ("b.jpg", (52, 37)), ("nested/deeper/c.png", (33, 45))):
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(folder / name)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    whole = (folder / "a.png").read_bytes()
    (folder / "nested" / "truncated.png").write_bytes(whole[: len(whole) // 2])
    (folder / "notes.txt").write_text("not an image")
    (folder / ".hidden.png").write_bytes(whole)
    return folder


def predict_cfg(overrides: list[str]):
    return task_cfg("predict", overrides)


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_folder_with_bad_files_gives_csv_and_skipped_list(ckpt_path, mixed_folder, tmp_path, capsys):
    out = tmp_path / "preds.csv"
    result = predict.run(
        predict_cfg([f"ckpt_path={ckpt_path}", f"input={mixed_folder}", f"output={out}", "batch_size=2"])
    )
    with open(out, newline="") as f:
        header = next(csv.reader(f))
    assert header == ["path", "predicted", "Monkeypox", "Others"]
    rows = read_csv(out)
    assert [Path(r["path"]).relative_to(mixed_folder).as_posix() for r in rows] == [
        "a.png",
        "b.jpg",
        "nested/deeper/c.png",
    ]
    for row in rows:
        probs = [float(row["Monkeypox"]), float(row["Others"])]
        assert sum(probs) == pytest.approx(1.0, abs=1e-6)
        assert all(0.0 <= p <= 1.0 for p in probs)
        assert row["predicted"] == ("Monkeypox" if probs[0] >= probs[1] else "Others")
    skipped = (tmp_path / "preds_skipped.txt").read_text().splitlines()
    assert sorted(line.split("\t")[0] for line in skipped) == sorted(
        [str(mixed_folder / "broken.jpg"), str(mixed_folder / "nested" / "truncated.png")]
    )
    assert any("truncated" in line for line in skipped)
    err = capsys.readouterr().err
    assert f"skipped {mixed_folder / 'broken.jpg'}: " in err and "truncated.png" in err
    assert len(result["skipped"]) == 2


def test_probabilities_match_training_preprocessing(ckpt_path, mixed_folder, tmp_path):
    out = tmp_path / "p.csv"
    predict.run(predict_cfg([f"ckpt_path={ckpt_path}", f"input={mixed_folder / 'b.jpg'}", f"output={out}"]))
    (row,) = read_csv(out)
    ckpt = load_checkpoint(ckpt_path)
    module = build_classifier(ckpt)
    image = load_image(mixed_folder / "b.jpg", ckpt["hyper_parameters"]["image_size"])
    with torch.inference_mode():
        expected = module(normalize(image[None])).softmax(dim=1)[0].tolist()
    assert [float(row["Monkeypox"]), float(row["Others"])] == pytest.approx(expected, abs=1e-7)
    assert (tmp_path / "p_skipped.txt").read_text() == ""


def test_gradcam_overlays_have_the_image_size_and_show_a_heat_map(ckpt_path, mixed_folder, tmp_path):
    out = tmp_path / "g" / "preds.csv"
    plain = tmp_path / "plain.csv"
    predict.run(predict_cfg([f"ckpt_path={ckpt_path}", f"input={mixed_folder}", f"output={plain}"]))
    predict.run(
        predict_cfg([f"ckpt_path={ckpt_path}", f"input={mixed_folder}", f"output={out}", "gradcam=true"])
    )
    # Grad-CAM's grad-enabled forward gives the same probabilities as plain inference.
    for a, b in zip(read_csv(plain), read_csv(out), strict=True):
        assert a["predicted"] == b["predicted"] and float(a["Others"]) == pytest.approx(
            float(b["Others"]), abs=1e-6
        )
    for rel, size in (("a.png", (40, 40)), ("b.jpg", (52, 37)), ("nested/deeper/c.png", (33, 45))):
        overlay_file = tmp_path / "g" / "gradcam" / f"{rel}.png"
        assert overlay_file.is_file(), rel
        with Image.open(overlay_file) as im, Image.open(mixed_folder / rel) as original:
            assert im.size == size == original.size
            pixels = np.asarray(im.convert("RGB"), dtype=np.float64)
            assert pixels.std() > 5.0  # not blank
            assert np.abs(pixels - np.asarray(original.convert("RGB"), dtype=np.float64)).mean() > 5.0
    assert not list((tmp_path / "g" / "gradcam").rglob("broken*"))


def test_gradcam_equals_the_class_activation_map_of_the_head(ckpt_path):
    module = build_classifier(load_checkpoint(ckpt_path))
    x = torch.randn(3, 3, 32, 32)
    cam = GradCAM(module)
    probs, maps = cam(x, target=torch.tensor([0, 1, 1]))
    cam.close()
    net = module.model
    with torch.no_grad():
        features = net.se(torch.relu(net.features(x)))
        expected_probs = net.classifier(features.mean((2, 3))).softmax(dim=1)
    assert torch.allclose(probs, expected_probs, atol=1e-6)
    for i, c in enumerate([0, 1, 1]):
        raw = torch.relu(torch.einsum("k,khw->hw", net.classifier.weight[c], features[i]))
        assert maps[i].shape == features.shape[2:]
        assert torch.allclose(maps[i], raw / raw.max().clamp_min(1e-12), atol=1e-5)
        assert maps[i].max() == pytest.approx(1.0) or raw.max() == 0


def test_missing_input_and_empty_folder_are_clear_errors(ckpt_path, tmp_path):
    with pytest.raises(UserError, match=r"input=.*nowhere does not exist"):
        predict.run(
            predict_cfg(
                [f"ckpt_path={ckpt_path}", f"input={tmp_path / 'nowhere'}", f"output={tmp_path}/x.csv"]
            )
        )
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    with pytest.raises(UserError, match="holds no image files"):
        predict.run(
            predict_cfg([f"ckpt_path={ckpt_path}", f"input={tmp_path / 'empty'}", f"output={tmp_path}/x.csv"])
        )
    with pytest.raises(UserError, match="input is required"):
        predict.run(predict_cfg([f"ckpt_path={ckpt_path}"]))


def test_predict_py_writes_into_its_run_dir(ckpt_path, mixed_folder, tmp_path, monkeypatch):
    out = tmp_path / "predict_run"
    status = run_cli(
        "predict", [f"ckpt_path={ckpt_path}", f"input={mixed_folder}", f"hydra.run.dir={out}"], monkeypatch
    )
    assert status == 0
    assert len(read_csv(out / "predictions.csv")) == 3
    assert len((out / "predictions_skipped.txt").read_text().splitlines()) == 2
    log_text = (out / "predict.log").read_text()
    assert "wrote 3 prediction(s)" in log_text
    assert f"[WARNING] - skipped {mixed_folder / 'broken.jpg'}: " in log_text  # printed on stderr, kept here
    assert (out / ".hydra" / "config.yaml").is_file()
