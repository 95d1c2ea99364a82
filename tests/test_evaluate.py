"""eval: reproduces training's validation numbers exactly, reports per class, handles removed images."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

import densenet_se.evaluate as evaluate
from densenet_se.errors import UserError
from helpers.config import CONF, task_cfg
from helpers.images import split_files
from helpers.runs import run_cli, tiny_run


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_run(tmp_path_factory)


def eval_cfg(out: Path, overrides: list[str]):
    return task_cfg("eval", overrides, output_dir=str(out))


@pytest.mark.slow
def test_best_checkpoint_on_val_reproduces_training_exactly(run_dir, tmp_path):
    metrics_json = json.loads((run_dir / "metrics.json").read_text())
    best_row = next(r for r in metrics_json["epochs"] if r["epoch"] == metrics_json["best_epoch"])
    ckpt = run_dir / "checkpoints" / "best.ckpt"
    result = evaluate.run(eval_cfg(tmp_path, [f"ckpt_path={ckpt}"]))
    # Exact equality: the same files, decoding, normalisation, batches and metric definitions as training.
    assert result["acc"] == metrics_json["best_val_acc"]
    assert result["f1"] == best_row["val_f1"] and result["auroc"] == best_row["val_auroc"]
    n_val = len(split_files(run_dir / "split.json", "val"))
    assert result["split"] == "val" and result["n"] == n_val
    written = json.loads((tmp_path / "eval.json").read_text())
    assert written["acc"] == result["acc"] and written["split"] == "val"
    matrix = written["confusion_matrix"]
    assert sum(map(sum, matrix)) == n_val
    assert written["acc"] == pytest.approx((matrix[0][0] + matrix[1][1]) / n_val)
    # Monkeypox (the first class) is the positive class: sensitivity is its recall.
    assert written["positive_class"] == "Monkeypox"
    assert written["sensitivity"] == pytest.approx(matrix[0][0] / sum(matrix[0]))
    assert written["specificity"] == pytest.approx(matrix[1][1] / sum(matrix[1]))
    assert written["recall_Others"] == written["specificity"]
    predicted_pox = matrix[0][0] + matrix[1][0]
    expected = matrix[0][0] / predicted_pox if predicted_pox else None
    assert written["precision_Monkeypox"] == (pytest.approx(expected) if expected is not None else None)
    with Image.open(tmp_path / "confusion_matrix.png") as im:
        assert im.size[0] > 100 and im.size[1] > 100


@pytest.mark.slow
def test_test_and_all_splits_use_the_runs_files(run_dir, tmp_path):
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    test = evaluate.run(eval_cfg(tmp_path / "t", [f"ckpt_path={ckpt}", "split=test"]))
    everything = evaluate.run(
        eval_cfg(tmp_path / "a", [f"ckpt_path={ckpt}", "split=all", "positive_class=Others"])
    )
    sizes = {name: len(split_files(run_dir / "split.json", name)) for name in ("train", "val", "test")}
    assert test["n"] == sizes["test"] > 0
    assert everything["n"] == sum(sizes.values())
    assert everything["sensitivity"] == everything["recall_Others"]
    # The metrics agree with a direct computation from the checkpoint's predictions.
    assert 0.0 <= test["acc"] <= 1.0 and 0.0 <= test["auroc"] <= 1.0


@pytest.mark.slow
def test_removed_image_is_one_clear_error_or_skipped_with_on_missing(run_dir, tmp_path):
    copy = shutil.copytree(Path(json.loads((run_dir / "split.json").read_text())["root"]), tmp_path / "imgs")
    gone_rel = split_files(run_dir / "split.json", "val")[0][0]
    (copy / gone_rel).unlink()
    ckpt = run_dir / "checkpoints" / "best.ckpt"
    with pytest.raises(UserError) as info:
        evaluate.run(eval_cfg(tmp_path / "e", [f"ckpt_path={ckpt}", f"data.root={copy}"]))
    message = str(info.value)
    assert f"1 of the {len(split_files(run_dir / 'split.json', 'val'))} val images" in message
    assert str(copy / gone_rel) in message and "on_missing=skip" in message
    assert not (tmp_path / "e" / "eval.json").exists()

    result = evaluate.run(
        eval_cfg(tmp_path / "s", [f"ckpt_path={ckpt}", f"data.root={copy}", "on_missing=skip"])
    )
    assert result["n"] == len(split_files(run_dir / "split.json", "val")) - 1
    assert result["missing"] == [[str(copy / gone_rel), "missing"]]


@pytest.mark.slow
def test_split_file_is_required_and_checked(run_dir, tmp_path):
    lone = tmp_path / "elsewhere" / "best.ckpt"
    lone.parent.mkdir()
    shutil.copy(run_dir / "checkpoints" / "best.ckpt", lone)
    with pytest.raises(UserError, match="no split.json beside checkpoint .*split_file="):
        evaluate.run(eval_cfg(tmp_path / "o", [f"ckpt_path={lone}"]))
    # Given explicitly, the split file makes a moved checkpoint usable (data root from split.json).
    moved = evaluate.run(
        eval_cfg(tmp_path / "o", [f"ckpt_path={lone}", f"split_file={run_dir / 'split.json'}"])
    )
    metrics_json = json.loads((run_dir / "metrics.json").read_text())
    assert moved["acc"] == metrics_json["best_val_acc"]

    split = json.loads((run_dir / "split.json").read_text())
    no_test = tmp_path / "no_test.json"
    no_test.write_text(json.dumps({**split, "test": []}))
    with pytest.raises(UserError, match="the test split in .* is empty"):
        evaluate.run(eval_cfg(tmp_path / "o", [f"ckpt_path={lone}", f"split_file={no_test}", "split=test"]))
    other = tmp_path / "other.json"
    other.write_text(json.dumps({**split, "class_names": ["cat", "dog"]}))
    with pytest.raises(UserError, match=r"lists classes \['cat', 'dog'\] but the checkpoint predicts"):
        evaluate.run(eval_cfg(tmp_path / "o", [f"ckpt_path={lone}", f"split_file={other}"]))
    with pytest.raises(UserError, match="positive_class='Cat' is not a class"):
        evaluate.run(
            eval_cfg(
                tmp_path / "o", [f"ckpt_path={run_dir / 'checkpoints' / 'best.ckpt'}", "positive_class=Cat"]
            )
        )


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.image_size=16", "data.image_size=16 is out of range; it must be an integer in [32, 4096]."),
        ("data.batch_size=0", "data.batch_size=0 is out of range; it must be an integer >= 1."),
    ],
)
def test_eval_data_settings_follow_trainings_rules(tmp_path, override, message):
    cfg = eval_cfg(tmp_path, [override, f"data.root={tmp_path}"])
    with pytest.raises(UserError) as err:
        evaluate.data_settings(cfg, {"image_size": 32}, {}, None)
    assert str(err.value) == message


def test_compute_metrics_per_class_values():
    probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4], [0.2, 0.8]])
    labels = torch.tensor([0, 0, 0, 1, 1])
    m = evaluate.compute_metrics(probs, labels, ["pos", "neg"], None)
    assert m["confusion_matrix"] == [[2, 1], [1, 1]]
    assert m["acc"] == pytest.approx(3 / 5)
    assert m["precision_pos"] == pytest.approx(2 / 3) and m["recall_pos"] == pytest.approx(2 / 3)
    assert m["precision_neg"] == pytest.approx(1 / 2) and m["recall_neg"] == pytest.approx(1 / 2)
    assert m["sensitivity"] == pytest.approx(2 / 3) and m["specificity"] == pytest.approx(1 / 2)
    # Three classes: no sensitivity/specificity, and a class never predicted has no precision.
    three = evaluate.compute_metrics(
        torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.6, 0.3, 0.1]]),
        torch.tensor([0, 1, 2]),
        ["a", "b", "c"],
        None,
    )
    assert "sensitivity" not in three and three["precision_c"] is None and three["recall_c"] == 0.0


@pytest.mark.slow
def test_eval_py_prints_the_table_and_writes_its_run_dir(run_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "eval_run"
    status = run_cli(
        "eval", [f"ckpt_path={run_dir / 'checkpoints' / 'best.ckpt'}", f"hydra.run.dir={out}"], monkeypatch
    )
    printed = capsys.readouterr().out
    assert status == 0, printed
    best = json.loads((run_dir / "metrics.json").read_text())["best_val_acc"]
    # The value, its 95 % interval, and what training logged for this checkpoint, on one line.
    assert re.search(
        rf"accuracy +{best:.4f} +[01]\.\d{{4}} to [01]\.\d{{4}}\*? +\(training logged {best:.4f} for this checkpoint\)",
        printed,
    ), printed
    assert "95 % interval" in printed
    for word in (
        "sensitivity",
        "specificity",
        "precision",
        "recall",
        "confusion matrix",
        "Monkeypox",
        "AUROC",
    ):
        assert word in printed, word
    assert f"written to {out}" in printed
    assert json.loads((out / "eval.json").read_text())["acc"] == best
    assert (out / "confusion_matrix.png").is_file()
    # The printed report is kept in eval.log too, and the console shows it once (not also as a log line).
    accuracy = next(line.strip() for line in printed.splitlines() if "(training logged" in line)
    assert printed.count(accuracy) == 1 and printed.count(f"written to {out}") == 1
    log_text = (out / "eval.log").read_text()
    assert accuracy in log_text and f"written to {out}" in log_text
    assert (out / ".hydra" / "config.yaml").is_file()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ([], "error: ckpt_path is required: python eval.py ckpt_path="),
        (
            ["ckpt_path=CKPT", "split=train"],
            "error: split='train' is not allowed; choose one of: val, test, all.",
        ),
        (["ckpt_path=CKPT", "data.rot=x"], "error: data.rot is not a valid config key"),
    ],
)
def test_eval_py_usage_errors_are_one_line(run_dir, tmp_path, monkeypatch, capsys, args, expected):
    args = [a.replace("CKPT", str(run_dir / "checkpoints" / "best.ckpt")) for a in args]
    status = run_cli("eval", [*args, f"hydra.run.dir={tmp_path / 'r'}"], monkeypatch)
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert status == 2
    assert len(err) == 1 and err[0].startswith(expected), err


@pytest.mark.parametrize("name", ["eval", "predict", "export"])
def test_yaml_defaults_mirror_the_schemas(name):
    from omegaconf import OmegaConf

    import densenet_se.export
    import densenet_se.predict

    schema = {
        "eval": evaluate.EvalConfig,
        "predict": densenet_se.predict.PredictConfig,
        "export": densenet_se.export.ExportConfig,
    }[name]
    node = OmegaConf.to_container(OmegaConf.load(CONF / f"{name}.yaml"))
    node.pop("defaults")
    node.pop("hydra")
    assert node == OmegaConf.to_container(OmegaConf.structured(schema))


@pytest.mark.parametrize("content", ["[]", '{"epochs": [3]}', '{"epochs": {"1": 0.5}}'])
def test_a_broken_metrics_json_gives_no_training_figure(tmp_path, content):
    (tmp_path / "metrics.json").write_text(content)
    assert evaluate.logged_val_acc(tmp_path, {"epoch": 1}) is None


def test_logged_val_acc_reads_the_checkpoints_epoch(tmp_path):
    (tmp_path / "metrics.json").write_text(
        json.dumps({"epochs": [{"epoch": 0, "val_acc": 0.5}, {"epoch": 1}]})
    )
    assert evaluate.logged_val_acc(tmp_path, {"epoch": 0}) == 0.5
    assert evaluate.logged_val_acc(tmp_path, {"epoch": 1}) is None
    assert evaluate.logged_val_acc(tmp_path, {}) is None
