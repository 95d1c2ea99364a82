"""Outputs never replace what a command reads (checkpoint, images, split.json) and never land in the data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from densenet_se.errors import UserError
from densenet_se.train import run
from helpers.config import TINY, compose_cfg
from helpers.crafted import checkpoint_run
from helpers.images import make_image_folder
from helpers.runs import run_cli

CLASSES = {"a": 2, "b": 2, "c": 2}  # tiny_checkpoint's classes


@pytest.fixture
def setup(tmp_path: Path) -> dict[str, Path]:
    """A checkpoint in RUN/checkpoints, its split.json (every image in val) and the image folder."""
    made = checkpoint_run(tmp_path, CLASSES)
    return {**made, "image": made["images"] / "a" / "a_000.png"}


@pytest.fixture
def refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture):
    """Run `tool args` (in this process); assert exit 2, one line, and `kept` files unchanged; return the line."""

    def call(tool: str, args: list[str], *kept: Path) -> str:
        before = {p: p.read_bytes() for p in kept}
        status = run_cli(tool, [*args, f"hydra.run.dir={tmp_path / 'cmd'}"], monkeypatch)
        lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert status == 2 and len(lines) == 1 and lines[0].startswith("error: "), lines
        assert {p: p.read_bytes() for p in kept} == before
        return lines[0]

    return call


@pytest.mark.parametrize("single", [False, True])
def test_predict_refuses_to_write_over_an_input_image(setup, refused, single):
    image = setup["image"]
    if single:  # the input is that one file
        line = refused("predict", [f"ckpt_path={setup['ckpt']}", f"input={image}", f"output={image}"], image)
        assert f"output={image} lies inside input={image}" in line
    else:
        args = [f"ckpt_path={setup['ckpt']}", f"input={setup['images']}", f"output={image}"]
        line = refused("predict", [*args, "allow_output_in_input=true"], image)
        assert f"output={image} would overwrite the input file {image}" in line


@pytest.mark.slow
@pytest.mark.parametrize("via_link", [False, True])
def test_predict_and_export_refuse_to_write_over_the_checkpoint(setup, tmp_path, refused, via_link):
    ckpt = target = setup["ckpt"]
    if via_link:  # the same file through a symbolic link to its folder
        (tmp_path / "link").symlink_to(ckpt.parent)
        target = tmp_path / "link" / ckpt.name
    line = refused("predict", [f"ckpt_path={ckpt}", f"input={setup['images']}", f"output={target}"], ckpt)
    assert f"output={target} would overwrite the checkpoint ckpt_path ({ckpt})" in line
    line = refused("export", [f"ckpt_path={ckpt}", "format=state_dict", f"output={target}"], ckpt)
    assert f"output={target} would overwrite the checkpoint ckpt_path" in line


def test_export_refuses_a_sidecar_that_would_replace_the_checkpoint(setup, tmp_path, refused):
    ckpt = tmp_path / "model.json"  # an odd name, but a checkpoint all the same
    ckpt.write_bytes(setup["ckpt"].read_bytes())
    line = refused(
        "export", [f"ckpt_path={ckpt}", "format=state_dict", f"output={tmp_path / 'model.pt'}"], ckpt
    )
    assert f"would write {ckpt}, which would overwrite the checkpoint ckpt_path" in line


@pytest.mark.slow
def test_predict_output_inside_the_input_folder_needs_an_explicit_yes(setup, tmp_path, monkeypatch, refused):
    inside = setup["images"] / "preds.csv"
    args = [f"ckpt_path={setup['ckpt']}", f"input={setup['images']}", f"output={inside}"]
    line = refused("predict", args)
    assert f"output={inside} lies inside input={setup['images']}" in line
    assert "allow_output_in_input=true" in line and not inside.exists()
    assert (
        run_cli(
            "predict", [*args, "allow_output_in_input=true", f"hydra.run.dir={tmp_path / 'ok'}"], monkeypatch
        )
        == 0
    )
    assert len(inside.read_text().splitlines()) == 1 + sum(CLASSES.values())


@pytest.mark.parametrize("where", ["gradcam_dir", "default"])
def test_gradcam_overlays_inside_the_input_folder_are_refused(setup, tmp_path, refused, where):
    args = [f"ckpt_path={setup['ckpt']}", f"input={setup['images']}", "gradcam=true"]
    if where == "gradcam_dir":
        args += [f"output={tmp_path / 'p.csv'}", f"gradcam_dir={setup['images'] / 'cams'}"]
        expected = f"gradcam_dir={setup['images'] / 'cams'} lies inside input={setup['images']}"
    else:  # gradcam/ beside an output that itself lies in the input folder
        args += [f"output={setup['images'] / 'p.csv'}"]
        expected = f"lies inside input={setup['images']}"
    assert expected in refused("predict", args)
    assert not list(setup["images"].rglob("*.png.png")) and not (setup["images"] / "cams").exists()


def test_allowed_overlays_still_never_replace_an_input(setup, tmp_path, refused):
    # An earlier run's overlay of a_000.png is an input now; this run would write a_000.png's overlay over it.
    earlier = setup["images"] / "a" / "a_000.png.png"
    earlier.write_bytes(setup["image"].read_bytes())
    args = [
        f"ckpt_path={setup['ckpt']}",
        f"input={setup['images']}",
        "gradcam=true",
        "allow_output_in_input=true",
    ]
    line = refused(
        "predict", [*args, f"output={tmp_path / 'p.csv'}", f"gradcam_dir={setup['images']}"], earlier
    )
    assert f"would write {earlier}, which would overwrite the input file {earlier}" in line


def test_predict_output_naming_a_folder_is_refused(setup, tmp_path, refused):
    line = refused(
        "predict", [f"ckpt_path={setup['ckpt']}", f"input={setup['images']}", f"output={tmp_path}"]
    )
    assert f"output={tmp_path} names a folder where a file goes" in line


@pytest.mark.slow
def test_eval_output_inside_the_data_or_over_the_runs_files_is_refused(
    setup, tmp_path, monkeypatch, capsys, refused
):
    base = [f"ckpt_path={setup['ckpt']}"]
    inside = setup["images"] / "eval"
    status = run_cli("eval", [*base, f"hydra.run.dir={inside}"], monkeypatch)
    err = capsys.readouterr().err.strip()
    assert status == 2 and f"output_dir={inside} lies inside data.root={setup['images']}" in err, err
    assert not (inside / "eval.json").exists() and not (inside / "confusion_matrix.png").exists()
    # The training run's own reports (confusion matrix, report.html) would be replaced.
    (setup["run"] / "confusion_matrix.png").write_bytes(b"training's figure")
    (setup["run"] / "report.html").write_text("training's page")
    kept = (setup["run"] / "confusion_matrix.png", setup["run"] / "report.html")
    line = refused("eval", [*base, f"output_dir={setup['run']}"], *kept)
    assert "which would overwrite the training run's report.html" in line
    # Evaluating somewhere else works.
    assert run_cli("eval", [*base, f"hydra.run.dir={tmp_path / 'ok'}"], monkeypatch) == 0
    assert json.loads((tmp_path / "ok" / "eval.json").read_text())["n"] == sum(CLASSES.values())


@pytest.mark.parametrize("key", ["paths.output_dir", "data.cache_dir"])
def test_training_refuses_outputs_inside_the_data_root(tmp_path, key):
    images = make_image_folder(tmp_path / "images", {"x": 4, "y": 4})
    before = sorted(images.rglob("*"))
    inside = images / "x" / "out"
    cfg = compose_cfg(tmp_path, [*TINY, f"data.root={images}", "print_config=false"])
    cfg.paths.output_dir = str(inside) if key == "paths.output_dir" else cfg.paths.output_dir
    cfg.data.cache_dir = str(inside) if key == "data.cache_dir" else str(tmp_path / "cache")
    shown_key = "hydra.run.dir" if key == "paths.output_dir" else key
    with pytest.raises(
        UserError, match=f"^{shown_key}={inside} lies inside data.root={images}, where the next run"
    ):
        run(cfg)
    assert sorted(images.rglob("*")) == before


def test_images_straight_in_data_train_with_the_default_cache(tmp_path, monkeypatch, capsys):
    # data.root=data is the natural layout; the default cache (once data/.cache) must not lie inside it.
    make_image_folder(tmp_path / "data", {"x": 6, "y": 6})
    before = sorted((tmp_path / "data").rglob("*"))
    monkeypatch.chdir(tmp_path)
    status = run_cli(
        "train", [*TINY, "data.root=data", "hydra.run.dir=run", "print_config=false"], monkeypatch
    )
    assert status == 0, capsys.readouterr().err
    assert sorted((tmp_path / "data").rglob("*")) == before
    assert (tmp_path / "run" / "checkpoints" / "best.ckpt").is_file()
