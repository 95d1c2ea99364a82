"""Names the file system allows (not UTF-8, newlines, tabs, "$math$") survive every figure, listing and log."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from densenet_se import plots
from densenet_se.data import ImageFolderDataModule
from densenet_se.names import display_name, file_list_text, parse_file_list, parse_name
from helpers.config import TINY, hydra_cfg
from helpers.images import make_tree
from helpers.runs import run_cli

# A class folder whose name is not UTF-8 (Latin-1 "Othérs" and a stray 0xff byte).
CLASS_BYTES = b"Oth\xe9rs\xff"
HOSTILE = [
    "caf\udce9",
    "$\\frac{$",
    "a$b$c",
    "two\nlines",
    "tab\there",
    "back\\slash",
    "\u202eevil",
    "\x00\x7f",
]

_chars = st.one_of(
    st.characters(),  # any code point but surrogates
    st.integers(0xDC80, 0xDCFF).map(chr),  # bytes that are not UTF-8, as os.fsdecode keeps them
    st.sampled_from("\\\t\n\r\x0b\x85\u2028\u2029"),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_chars, max_size=20).map("".join))
def test_display_name_is_one_printable_utf8_line_that_parses_back(name):
    shown = display_name(name)
    shown.encode("utf-8")  # no lone surrogates left
    assert len(shown.splitlines()) <= 1 and "\t" not in shown
    assert parse_name(shown) == name


def test_display_name_leaves_ordinary_names_alone_and_shows_bytes_as_bytes():
    assert display_name("Monkeypox/café 1.jpg") == "Monkeypox/café 1.jpg"
    assert display_name(os.fsdecode(CLASS_BYTES)) == "Oth\\xe9rs\\xff"
    assert display_name("a\nb\tc\\d") == "a\\nb\\tc\\\\d"


def test_file_listing_is_one_line_per_entry(tmp_path):
    entries = [(f"/data/{name}.jpg", f"reason with {name}") for name in HOSTILE]
    text = file_list_text(entries)
    assert len(text.splitlines()) == len(entries)
    assert parse_file_list(text) == entries


@pytest.mark.parametrize("name", HOSTILE)
def test_figures_draw_any_class_name(name):
    images = np.zeros((2, 3, 8, 8), dtype=np.uint8)
    grid = plots.png_bytes(plots.sample_grid(images, [0, 1], ["plain", name]))
    matrix = plots.png_bytes(plots.confusion_matrix_image([[1, 0], [0, 1]], ["plain", name], name))
    curves = plots.png_bytes(plots.curves_image([{"epoch": 0, "train_loss": 1.0, "val_acc": 0.5}]))
    assert grid.startswith(b"\x89PNG") and matrix.startswith(b"\x89PNG") and curves.startswith(b"\x89PNG")


def test_bad_files_with_newlines_and_tabs_are_listed_once_each(tmp_path):
    root = make_tree(tmp_path / "data", {"a": 6, "b": 6}, size=40)
    names = [
        "new\nline.jpg",
        "tab\tbed.jpg",
        "back\\nslash.jpg",
        "\u2028sep.jpg",
        os.fsdecode(b"caf\xe9.jpg"),
    ]
    for name in names:
        (root / "b" / name).write_bytes(b"")
    out = tmp_path / "run"
    dm = ImageFolderDataModule(
        root=str(root), image_size=32, output_dir=str(out), cache_dir=str(tmp_path / "c")
    )
    dm.setup()
    text = (out / "bad_files.txt").read_text(encoding="utf-8")
    listed = parse_file_list(text)
    assert len(text.splitlines()) == 5 and sorted(listed) == sorted(
        (str(root / "b" / n), "empty file (0 bytes)") for n in names
    )
    assert os.fsencode(listed[[p for p, _ in listed].index(str(root / "b" / names[4]))][0]).endswith(
        b"caf\xe9.jpg"
    )


def test_printed_output_escapes_names_that_are_not_utf8(monkeypatch):
    import io

    from densenet_se import cli

    stdout = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="strict")  # a desktop terminal
    monkeypatch.setattr(sys, "stdout", stdout)
    cli._escape_unprintable_output()
    print("positive class: caf\udce9", flush=True)
    assert stdout.buffer.getvalue() == b"positive class: caf\\udce9\n"


def test_the_log_file_escapes_names_that_are_not_utf8(tmp_path, capsys):
    import logging.config

    from omegaconf import OmegaConf

    cfg = hydra_cfg([])
    handler = OmegaConf.to_container(cfg.hydra.job_logging.handlers.file, resolve=False)
    handler.update(filename=str(tmp_path / "train.log"), formatter=None)
    logger = {"handlers": ["file"], "level": "INFO", "propagate": False}
    config = {"version": 1, "disable_existing_loggers": False, "handlers": {"file": handler}}
    logging.config.dictConfig({**config, "loggers": {"densenet_se.test_names": logger}})
    log = logging.getLogger("densenet_se.test_names")
    try:
        log.warning("ignoring folder %s", "/data/caf\udce9")
    finally:
        for h in list(log.handlers):
            log.removeHandler(h)
            h.close()
    assert (tmp_path / "train.log").read_text(encoding="utf-8") == "ignoring folder /data/caf\\udce9\n"
    assert "Logging error" not in capsys.readouterr().err


@pytest.mark.slow
def test_a_class_folder_that_is_not_utf8_trains_evaluates_and_predicts(tmp_path, monkeypatch):
    data = make_tree(tmp_path / "data", {"Monkeypox": 12, "Others": 12}, size=40)
    os.rename(data / "Others", os.fsdecode(bytes(data) + b"/" + CLASS_BYTES))
    (data / "Monkeypox" / "bad\nname\t.jpg").write_text("not a picture")
    run_dir = tmp_path / "run"
    args = [
        *TINY,
        "trainer.max_epochs=1",
        f"data.root={data}",
        f"hydra.run.dir={run_dir}",
        "print_config=false",
    ]
    assert run_cli("train", args, monkeypatch) == 0
    class_name = os.fsdecode(CLASS_BYTES)
    assert json.loads((run_dir / "metrics.json").read_text())["class_names"] == ["Monkeypox", class_name]
    assert json.loads((run_dir / "split.json").read_text())["class_names"][1] == class_name
    for figure in ("samples.png", "confusion_matrix.png", "curves.png"):
        assert (run_dir / figure).read_bytes().startswith(b"\x89PNG"), figure
    assert parse_file_list((run_dir / "bad_files.txt").read_text(encoding="utf-8")) == [
        (
            str(data / "Monkeypox" / "bad\nname\t.jpg"),
            "not an image PIL can read (unknown format or corrupt header)",
        )
    ]

    ckpt = run_dir / "checkpoints" / "best.ckpt"
    out = tmp_path / "pred" / "predictions.csv"
    assert run_cli("predict", [f"ckpt_path={ckpt}", f"input={data}", f"output={out}"], monkeypatch) == 0
    header, *rows = out.read_bytes().split(b"\n")[:-1]
    assert header == b"path,predicted,Monkeypox," + CLASS_BYTES and len(rows) == 24
    skipped = parse_file_list(out.with_name("predictions_skipped.txt").read_text(encoding="utf-8"))
    assert [Path(p).name for p, _ in skipped] == ["bad\nname\t.jpg"]
    eval_dir = tmp_path / "eval"
    assert run_cli("eval", [f"ckpt_path={ckpt}", f"hydra.run.dir={eval_dir}"], monkeypatch) == 0
    assert json.loads((eval_dir / "eval.json").read_text())["class_names"] == ["Monkeypox", class_name]
