"""eval.py's trust outputs end to end: eval.json intervals, predictions.csv, calibration.json, an operating point
that predict.py applies, a self-contained report.html, training's end-of-run page, and bad input as one line."""

from __future__ import annotations

import ast
import base64
import csv
import json
import math
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig

import densenet_se.evaluate as evaluate
import densenet_se.export as export
import densenet_se.predict as predict
from densenet_se.checkpoint import build_classifier, load_checkpoint
from densenet_se.config import compose_train_config
from densenet_se.data.images import load_image, normalize
from densenet_se.module import Classifier
from helpers.config import CONF, ROOT, TINY, task_cfg
from helpers.images import make_image_folder, split_files
from helpers.runs import run_cli, tiny_run

FIGURES = ("roc.png", "pr.png", "calibration.png", "confusion_matrix.png", "top_losses.png")
HEADLINE = ("acc", "balanced_acc", "f1", "auroc", "sensitivity", "specificity", "ppv", "npv")


def entry_cfg(name: str, overrides: list[str], output_dir: Path | None = None) -> DictConfig:
    """conf/<name>.yaml composed with `overrides`, its output_dir (eval, export) set to `output_dir`."""
    return task_cfg(name, overrides, **({"output_dir": str(output_dir)} if output_dir is not None else {}))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_run(tmp_path_factory)


@pytest.fixture(scope="module")
def evaluated(run_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One eval of the test split with every option on: TTA, temperature, a target sensitivity."""
    out = tmp_path_factory.mktemp("eval_all_options")
    overrides = [
        f"ckpt_path={run_dir / 'checkpoints' / 'best.ckpt'}",
        "split=test",
        "tta=flip",
        "calibrate=temperature",
        "target_sensitivity=0.8",
        "top_losses=4",
        "bootstrap.n=500",
    ]
    evaluate.run(entry_cfg("eval", overrides, out))
    return out


class Page(HTMLParser):
    """Every <img> src, every external reference, and the visible text of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.images: list[str] = []
        self.external: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if tag == "img":
            self.images.append(values.get("src") or "")
        for key in ("href", "src"):
            if tag in ("link", "script", "iframe") and values.get(key):
                self.external.append(values[key] or "")

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def parse_page(path: Path) -> Page:
    page = Page()
    page.feed(path.read_text(encoding="utf-8"))
    page.close()
    return page


def assert_self_contained(page: Page, count: int) -> None:
    assert len(page.images) == count and not page.external
    for src in page.images:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1]).startswith(b"\x89PNG\r\n\x1a\n")


def assert_interval(m: dict, name: str) -> None:
    """`name`'s interval holds its value, or there is none and ci_method says why (every resample equal)."""
    bounds = m[f"{name}_ci"]
    if bounds is None:
        assert m["ci_method"][name] == "none: every resample gave the same value", name
    else:
        assert bounds[0] <= m[name] <= bounds[1], name


def read_rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


@pytest.mark.slow
def test_eval_json_has_intervals_threshold_and_calibration(evaluated, run_dir):
    m = json.loads((evaluated / "eval.json").read_text())
    assert m["n"] == len(split_files(run_dir / "split.json", "test"))
    for name in HEADLINE:
        assert_interval(m, name)
    for name in ("acc", "sensitivity", "specificity", "ppv", "npv"):  # proportions always get one
        assert m[f"{name}_ci"] is not None, name
    assert m["bootstrap"] == {**m["bootstrap"], "n": 500, "seed": 0, "level": 0.95}
    point = m["operating_point"]
    assert point["chosen_on"] == "val" and point["target"] == {"sensitivity": 0.8}
    assert point["val"]["sensitivity"] >= 0.8 and point["optimistic"] is False
    assert m["threshold"] == point["threshold"] and point["positive_class"] == "Monkeypox"
    cal = m["calibration"]
    assert cal["val_nll_after"] <= cal["val_nll_before"] and cal["n"] > 0
    assert m["ece"] == cal["after"]["ece"] and set(cal["before"]) == {"ece", "nll", "brier"}
    assert set(m["without_tta"]) >= {"acc", "acc_ci", "auroc", "ece", "nll", "brier"}
    assert m["tta"] == "flip" and "not grouped" in m["leakage"]
    saved = json.loads((evaluated / "calibration.json").read_text())
    assert saved["temperature"] == cal["temperature"] and saved["class_names"] == ["Monkeypox", "Others"]
    assert saved["fitted_on"] == {"split": "val", "n": cal["n"], "tta": "flip"}


@pytest.mark.slow
def test_predictions_csv_rows_follow_the_threshold(evaluated, run_dir):
    m = json.loads((evaluated / "eval.json").read_text())
    columns, rows = read_rows(evaluated / "predictions.csv")
    assert columns == ["path", "label", "predicted", "Monkeypox", "Others", "loss", "correct", "uncertainty"]
    expected = sorted(split_files(run_dir / "split.json", "test"))
    assert [[r["path"], r["label"]] for r in rows] == [[p, ["Monkeypox", "Others"][c]] for p, c in expected]
    for row in rows:
        p_pos = float(row["Monkeypox"])
        assert p_pos + float(row["Others"]) == pytest.approx(1.0, abs=1e-6)
        assert row["predicted"] == ("Monkeypox" if p_pos >= m["threshold"] else "Others")
        assert row["correct"] == str(int(row["predicted"] == row["label"]))
        p_true = float(row[row["label"]])
        if p_true > 1e-6:  # -log p of the printed probability (8 digits)
            assert float(row["loss"]) == pytest.approx(-math.log(p_true), rel=1e-4, abs=1e-6)
        assert float(row["uncertainty"]) >= 0.0
    assert sum(int(r["correct"]) for r in rows) == round(m["acc"] * m["n"])


def test_report_html_is_one_self_contained_page(evaluated):
    for name in FIGURES:
        assert (evaluated / name).stat().st_size > 1000, name
    page = parse_page(evaluated / "report.html")
    assert_self_contained(page, len(FIGURES))
    text = " ".join(page.text)
    for words in ("What was evaluated", "95 % interval", "without TTA", "after (T = ", "Decision rule"):
        assert words in text, words
    assert "chosen on the validation split to reach sensitivity >= 0.8" in text


@pytest.mark.slow
def test_threshold_chosen_on_the_reported_split_is_flagged_optimistic(run_dir, tmp_path):
    ckpt = run_dir / "checkpoints" / "best.ckpt"
    m = evaluate.run(
        entry_cfg("eval", [f"ckpt_path={ckpt}", "target_specificity=0.9", "bootstrap.n=0"], tmp_path)
    )
    assert m["operating_point"]["optimistic"] is True and m["operating_point"]["val"]["specificity"] >= 0.9
    assert m["specificity"] >= 0.9  # on val, where it was chosen
    assert "acc_ci" not in m  # bootstrap.n=0: no intervals
    assert "Optimistic: the threshold was chosen on images this split contains" in " ".join(
        parse_page(tmp_path / "report.html").text
    )


def test_predict_applies_the_operating_point_calibration_and_tta(evaluated, run_dir, tmp_path):
    m = json.loads((evaluated / "eval.json").read_text())
    temperature = json.loads((evaluated / "calibration.json").read_text())["temperature"]
    root = Path(json.loads((run_dir / "split.json").read_text())["root"])
    out = tmp_path / "p.csv"
    ckpt_path = run_dir / "checkpoints" / "best.ckpt"
    with_cfg = [f"operating_point={evaluated / 'eval.json'}", f"calibration={evaluated / 'calibration.json'}"]
    args = [f"ckpt_path={ckpt_path}", f"input={root / 'Monkeypox'}", f"output={out}", "tta=flip", *with_cfg]
    predict.run(entry_cfg("predict", args))
    columns, rows = read_rows(out)
    assert columns == ["path", "predicted", "Monkeypox", "Others", "uncertainty"]
    ckpt = load_checkpoint(ckpt_path)
    module = build_classifier(ckpt)
    for row in rows[:5]:
        x = normalize(load_image(row["path"], ckpt["hyper_parameters"]["image_size"])[None])
        with torch.no_grad():  # the two views, each at the temperature, softmax averaged
            views = torch.stack([(module(v) / temperature).softmax(1)[0] for v in (x, x.flip(3))])
        assert float(row["Monkeypox"]) == pytest.approx(float(views[:, 0].mean()), abs=1e-6)
        assert float(row["uncertainty"]) == pytest.approx(float(views[:, 0].std(correction=0)), abs=1e-6)
        assert row["predicted"] == ("Monkeypox" if float(row["Monkeypox"]) >= m["threshold"] else "Others")


def test_export_carries_the_calibration_into_the_sidecar(evaluated, run_dir, tmp_path):
    cfg = [
        f"ckpt_path={run_dir / 'checkpoints' / 'best.ckpt'}",
        "format=state_dict",
        f"calibration={evaluated / 'calibration.json'}",
    ]
    export.run(entry_cfg("export", cfg, tmp_path))
    side = json.loads((tmp_path / "model.json").read_text())
    temperature = json.loads((evaluated / "calibration.json").read_text())["temperature"]
    assert (
        side["calibration"]["temperature"] == temperature and side["calibration"]["method"] == "temperature"
    )


@pytest.fixture(scope="module")
def bad_files(run_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A three-class checkpoint with its split.json, a run copy without validation images, broken JSON files."""
    base = tmp_path_factory.mktemp("bad_inputs")
    torch.manual_seed(0)
    three = Classifier(
        3, ["a", "b", "c"], 32, model={"growth_rate": 4, "block_config": [1, 1], "num_init_features": 8}
    )
    (base / "three" / "checkpoints").mkdir(parents=True)
    ckpt = {"state_dict": three.state_dict(), "hyper_parameters": dict(three.hparams), "epoch": 0}
    torch.save(ckpt, base / "three" / "checkpoints" / "best.ckpt")
    split = {
        "root": str(base),
        "class_names": ["a", "b", "c"],
        "train": [],
        "val": [],
        "test": [["x.png", 0]],
    }
    (base / "three" / "split.json").write_text(json.dumps(split))
    no_val = json.loads((run_dir / "split.json").read_text())
    (base / "no_val.json").write_text(json.dumps({**no_val, "val": []}))
    (base / "corrupt.json").write_text('{"operating_point": {"thresh')
    other = {
        "class_names": ["cat", "dog"],
        "method": "temperature",
        "temperature": 1.0,
        "operating_point": None,
    }
    (base / "other.json").write_text(json.dumps(other))
    return {"three": base / "three" / "checkpoints" / "best.ckpt", "base": base}


BAD = [
    ("eval", ["threshold=1.5"], "threshold=1.5 is out of range; it must be a probability in [0, 1]."),
    ("eval", ["target_sensitivity=0"], "target_sensitivity=0 is out of range; it must be in (0, 1]"),
    ("eval", ["target_specificity=1.01"], "target_specificity=1.01 is out of range"),
    ("eval", ["threshold=0.4", "target_sensitivity=0.9"], "threshold and target_sensitivity are both set"),
    ("eval", ["tta=rotate"], "tta='rotate' is not allowed; choose one of: none, flip, flip4."),
    ("eval", ["calibrate=platt"], "calibrate='platt' is not allowed; choose one of: none, temperature."),
    ("eval", ["bootstrap.level=95"], "bootstrap.level=95 is out of range; it must be in (0, 1)"),
    (
        "eval",
        ["ckpt_path=THREE", "threshold=0.5"],
        "threshold needs two classes, but the checkpoint predicts 3",
    ),
    ("eval", ["ckpt_path=THREE", "target_sensitivity=0.9"], "target_sensitivity needs two classes"),
    (
        "eval",
        ["split=test", "split_file=BASE/no_val.json", "calibrate=temperature"],
        "calibrate=temperature needs a validation split, and this run has none",
    ),
    (
        "eval",
        ["split=test", "split_file=BASE/no_val.json", "target_sensitivity=0.9"],
        "target_sensitivity needs a validation split, and this run has none",
    ),
    ("predict", ["operating_point=BASE/nowhere.json"], "operating_point=BASE/nowhere.json does not exist"),
    (
        "predict",
        ["operating_point=BASE/corrupt.json"],
        "operating_point=BASE/corrupt.json cannot be read as JSON",
    ),
    ("predict", ["operating_point=BASE/other.json"], "operating_point=BASE/other.json is for classes"),
    (
        "predict",
        ["operating_point=EVAL/eval.json"],
        "was chosen on probabilities with tta=flip and temperature",
    ),
    ("predict", ["calibration=BASE/nowhere.json"], "calibration=BASE/nowhere.json does not exist"),
    ("predict", ["calibration=BASE/corrupt.json"], "calibration=BASE/corrupt.json cannot be read as JSON"),
    ("predict", ["calibration=BASE/other.json"], "calibration=BASE/other.json is for classes"),
    ("export", ["calibration=BASE/other.json"], "calibration=BASE/other.json is for classes"),
    ("predict", ["ckpt_path=THREE", "threshold=0.5"], "threshold needs two classes"),
    ("predict", ["threshold=2"], "threshold=2 is out of range"),
    ("export", ["calibration=EVAL/eval.json"], "calibration=EVAL/eval.json holds no temperature"),
]


@pytest.mark.slow
@pytest.mark.parametrize(("entry", "args", "expected"), BAD, ids=[f"{e}-{'-'.join(a)}" for e, a, _ in BAD])
def test_bad_input_is_one_sentence_and_exit_2(
    entry, args, expected, run_dir, evaluated, bad_files, tmp_path, monkeypatch, capsys
):
    def fill(text: str) -> str:
        return (
            text.replace("THREE", str(bad_files["three"]))
            .replace("BASE", str(bad_files["base"]))
            .replace("EVAL", str(evaluated))
        )

    argv = [f"ckpt_path={run_dir / 'checkpoints' / 'best.ckpt'}", *map(fill, args)]
    if entry == "predict":
        argv.append(f"input={Path(json.loads((run_dir / 'split.json').read_text())['root']) / 'Others'}")
    status = run_cli(entry, [*argv, f"hydra.run.dir={tmp_path / 'r'}"], monkeypatch)
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert status == 2, err
    assert len(err) == 1 and err[0].startswith("error: ") and fill(expected) in err[0], err


def reachable(module: str) -> set[str]:
    """Every densenet_se module `module` imports, directly or through others (any import statement in it)."""
    src = ROOT / "src"

    def source(name: str) -> Path | None:
        path = src / name.replace(".", "/")
        return next((p for p in (path.with_suffix(".py"), path / "__init__.py") if p.is_file()), None)

    seen, todo = set(), [module]
    while todo:
        name = todo.pop()
        path = source(name)
        if name in seen or path is None:
            continue
        seen.add(name)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("densenet_se"):
                # `from densenet_se import bootstrap` imports a module too
                todo += [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
            elif isinstance(node, ast.Import):
                todo += [alias.name for alias in node.names if alias.name.startswith("densenet_se")]
    return seen


@pytest.mark.slow
def test_evaluate_and_the_end_of_run_report_import_no_task():
    assert "densenet_se.predict" not in reachable("densenet_se.evaluate")
    assert not {"densenet_se.evaluate", "densenet_se.predict"} & reachable("densenet_se.best_report")
    # The shared inference module is what eval, predict and the end-of-run report run the model through.
    for user in ("densenet_se.evaluate", "densenet_se.predict", "densenet_se.best_report"):
        assert "densenet_se.inference" in reachable(user), user


@pytest.mark.slow
def test_training_writes_the_report_of_its_best_checkpoint_for_three_classes(tmp_path):
    images = make_image_folder(tmp_path / "images", {"a": 14, "b": 14, "c": 14}, size=40)
    overrides = [*TINY, f"data.root={images}", "data.test_fraction=0.25", "best_report=true"]
    cfg = compose_train_config(overrides, tmp_path, CONF)
    from densenet_se.train import run

    run(cfg)
    out = tmp_path / "run"
    page = parse_page(out / "report.html")
    assert_self_contained(page, 2 * len(FIGURES))  # validation and test, every figure embedded
    text = " ".join(page.text)
    assert "Val split: " in text and "Test split: " in text and "AUROC (vs rest)" in text
    test = json.loads((out / "metrics.json").read_text())["test"]
    for name in ("acc", "f1", "auroc", "balanced_acc"):
        assert_interval(test, name)
    assert test["bootstrap"]["n"] == 2000 and "sensitivity" not in test
    # eval.py on the same run: per-class AUROC with intervals, and TTA on all images.
    args = [f"ckpt_path={out / 'checkpoints' / 'best.ckpt'}", "split=all", "tta=flip4"]
    m = evaluate.run(entry_cfg("eval", args, tmp_path / "e"))
    assert all(f"auroc_{c}_ci" in m for c in "abc") and m["n"] == 42
    _, rows = read_rows(tmp_path / "e" / "predictions.csv")
    assert len(rows) == 42 and {r["label"] for r in rows} == {"a", "b", "c"}


@pytest.mark.parametrize("cache", ["none", "disk"])
def test_split_images_are_the_cached_images_whatever_the_cache(tmp_path, cache):
    from densenet_se.data import ImageFolderDataModule

    images = make_image_folder(tmp_path / "images", {"x": 6, "y": 6}, size=40)
    kwargs = {"root": str(images), "image_size": 32, "test_fraction": 0.25, "cache_dir": str(tmp_path / "c")}
    memory = ImageFolderDataModule(**kwargs, cache="memory")
    other = ImageFolderDataModule(**kwargs, cache=cache)
    memory.setup()
    other.setup()
    for split in ("val", "test"):
        expected_images, expected_labels, expected_paths = memory.split_images(split)
        got_images, got_labels, got_paths = other.split_images(split)
        assert got_paths == expected_paths == [rel for rel, _ in memory.split[split]]
        assert torch.equal(got_labels, expected_labels) and torch.equal(got_images, expected_images)


@pytest.mark.parametrize(
    "value, shown",
    [
        (1.0, "1.000"),
        (0.9999999403953552, "1.000"),
        (1e-7, "0.000"),
        (0.99996, "0.99996"),
        (0.8766, "0.877"),
        (None, "-"),
    ],
)
def test_report_numbers_show_three_decimals_and_more_only_where_three_would_hide_an_error(value, shown):
    from densenet_se.report_html import _num

    assert _num(value) == shown
