"""The console (docs/console.md): the demo prints only our own lines and, on stderr, nothing outside a short
allow-list; third-party noise is silenced precisely (a warning about the user's setup still shows); the log
file keeps everything; print_config=compact|full|false; the model summary lists the network only."""

from __future__ import annotations

import io
import logging
import logging.config
import re
import warnings

import pytest
import torch
from omegaconf import OmegaConf

from densenet_se import console
from densenet_se.callbacks import NetworkSummary
from densenet_se.metrics import partial_sample
from densenet_se.module import DenseNetSEClassifier
from helpers.config import CONF, ROOT, TINY, compose_cfg
from helpers.runs import run_train

# The only lines a demo run may print on stderr (docs/console.md lists them with their reasons): matplotlib
# building its font cache once in a new environment, and its warning that it has no writable config folder
# (a real, harmless problem of that machine). Each is a regular expression matched against a whole line.
STDERR_ALLOWED = (
    r"warning: \[matplotlib\.font_manager\] Matplotlib is building the font cache; this may take a moment\.",
    r"warning: \[matplotlib\] Matplotlib created a temporary cache directory at .*",
)
# What a one-epoch demo run prints on stdout, in this order (one regular expression per line).
DEMO_STDOUT = (
    r"run directory: (?P<run_dir>/.+)",
    r"config overrides: experiment=demo trainer\.max_epochs=1; the full config is in (?P=run_dir)/\.hydra/"
    r"config\.yaml \(print it with print_config=full\)",
    r"making the synthetic demo data set \(once\): 700 images in /.+/data/demo",
    r"split: not grouped: images are assigned one by one",
    r"data: 700 images of 2 classes in /.+/data/demo \(Monkeypox 350, Others 350\): 560 train, 140 val",
    r"training DenseNetSE \(76\.4 K parameters\) on (cpu|cuda) for 1 epoch",
    r"epoch 1/1  loss \d\.\d{4}  acc \d\.\d{4}  val_loss \d\.\d{4}  val_acc \d\.\d{4}  \d+\.\ds",
    r"report\.html for the best checkpoint written to (?P=run_dir)",
    r"best val/acc \d\.\d{4} at epoch 1; checkpoint (?P=run_dir)/checkpoints/best\.ckpt",
    r"next steps:",
    r"  tensorboard --logdir (?P=run_dir)",
    r"  python eval\.py ckpt_path=(?P=run_dir)/checkpoints/best\.ckpt",
    r"  python predict\.py ckpt_path=(?P=run_dir)/checkpoints/best\.ckpt input=<folder>",
)


@pytest.mark.slow
@pytest.mark.subprocess
def test_the_demo_prints_only_our_own_lines_and_the_log_file_keeps_the_rest(tmp_path):
    proc = run_train(["experiment=demo", "trainer.max_epochs=1"], cwd=tmp_path)  # as on a fresh clone
    assert proc.returncode == 0, proc.stderr[-3000:]
    unexpected = [
        line for line in proc.stderr.splitlines() if not any(re.fullmatch(p, line) for p in STDERR_ALLOWED)
    ]
    assert unexpected == [], "\n".join(unexpected)
    match = re.fullmatch("\n".join(DEMO_STDOUT) + "\n", proc.stdout)
    assert match, proc.stdout
    run_dir = tmp_path / match["run_dir"]
    assert run_dir.parent.parent == tmp_path / "outputs"
    assert (run_dir / "checkpoints" / "best.ckpt").is_file() and list(run_dir.rglob("events.out.tfevents.*"))
    log_text = (run_dir / "train.log").read_text()
    # Lightning's own lines, the full config and the layer table are in the log file, not on the console.
    assert "GPU available" in log_text and "`Trainer.fit` stopped" in log_text
    assert "config:\ndata:\n  root: " in log_text and "growth_rate: 12" in log_text
    table = log_text[log_text.index("| Name") : log_text.index("Trainable params")]
    assert "model.features" in table and "Metric" not in table and "val_metrics" not in table
    # Neither the sanity check's one-class batches nor Lightning's pytree warning reach stderr (checked above);
    # the one-class warnings are not raised at all.
    assert "No positive samples" not in log_text and "No negative samples" not in log_text


@pytest.fixture
def console_logging(tmp_path):
    """conf/hydra/job_logging/console.yaml set up as Hydra does, its streams and log file here; warnings too."""
    spec = OmegaConf.load(CONF / "hydra" / "job_logging" / "console.yaml")
    spec.handlers.file.filename = str(tmp_path / "train.log")
    out, err = io.StringIO(), io.StringIO()
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    logging.config.dictConfig(OmegaConf.to_container(spec))
    root.handlers[0].setStream(out)
    root.handlers[1].setStream(err)
    with console.warnings_logged(), warnings.catch_warnings():
        warnings.simplefilter("always")
        yield out, err, tmp_path / "train.log"
    for handler in root.handlers:
        handler.close()
    root.handlers[:], root.level = saved


def test_known_noise_is_silenced_precisely_and_a_real_problem_still_shows(console_logging):
    out, err, log_file = console_logging
    lightning_file = "/site-packages/lightning/pytorch/utilities/_pytree.py"
    noise = "`isinstance(treespec, LeafSpec)` is deprecated, use `isinstance(treespec, TreeSpec)` instead."
    warnings.warn_explicit(noise, FutureWarning, lightning_file, 21)
    small = "The number of training batches (1) is smaller than the logging interval Trainer(log_every_n_steps=10)."
    warnings.warn_explicit(small, UserWarning, "/site-packages/lightning/pytorch/loops/fit_loop.py", 321)
    # The same file with another message, and a warning about the user's setup from Lightning, still show.
    warnings.warn_explicit("Some other deprecation.", FutureWarning, lightning_file, 30)
    problem = "The 'train_dataloader' does not have many workers which may be a bottleneck."
    connector = "/site-packages/lightning/pytorch/trainer/data_connector.py"
    warnings.warn_explicit(problem, UserWarning, connector, 4)
    logging.getLogger("lightning.pytorch.utilities.rank_zero").info("💡 Tip: try installing [litlogger]")
    logging.getLogger("densenet_se").info("epoch 1/2  loss 0.5")
    logging.getLogger("densenet_se").info("the full config", extra=console.FILE_ONLY)
    logging.getLogger("densenet_se.data").warning("the val split has no images of class b")
    assert out.getvalue() == "epoch 1/2  loss 0.5\n"
    # (Lightning formats warnings from its own files without their category, once it is imported.)
    assert err.getvalue().splitlines() == [
        "warning: "
        + warnings.formatwarning("Some other deprecation.", FutureWarning, lightning_file, 30).strip(),
        "warning: " + warnings.formatwarning(problem, UserWarning, connector, 4).strip(),
        "warning: the val split has no images of class b",
    ]
    logged = log_file.read_text()
    for text in (
        noise,
        small,
        "Some other deprecation.",
        problem,
        "💡 Tip",
        "epoch 1/2",
        "the full config",
        "class b",
    ):
        assert text in logged, text


def test_one_class_warnings_are_hidden_only_for_the_sanity_checks_partial_sample():
    from torchmetrics.classification import MulticlassAUROC

    def auroc_warnings(partial: bool) -> list[str]:
        metric = MulticlassAUROC(2)
        metric.update(torch.tensor([[0.8, 0.2], [0.6, 0.4]]), torch.tensor([0, 0]))  # class 1 absent
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with partial_sample(partial):
                metric.compute()
        return [str(w.message) for w in caught]

    assert auroc_warnings(partial=True) == []
    assert any("No positive samples in targets" in m for m in auroc_warnings(partial=False))


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["compact", "full", False])
def test_print_config_compact_full_or_false(tmp_path, caplog, mode):
    cfg = compose_cfg(tmp_path, [*TINY, "data.root=/images", f"print_config={mode}"])
    with caplog.at_level(logging.INFO, logger="densenet_se"):
        console.show_config(cfg)
    shown = [r.getMessage() for r in caplog.records if getattr(r, "console", True)]
    file_only = [r.getMessage() for r in caplog.records if not getattr(r, "console", True)]
    full = f"config:\n{OmegaConf.to_yaml(cfg, resolve=True)}"
    if mode == "full":
        assert shown == [full] and file_only == []
        return
    assert file_only == [full]  # the log file always has it
    # In-process there is no Hydra command line: no overrides, and no .hydra/ record.
    compact = (
        "config overrides: none (the defaults of conf/train.yaml); the full config is in the log file "
        "(print it with print_config=full)"
    )
    assert shown == ([compact] if mode == "compact" else [])


def test_the_model_summary_lists_the_network_not_the_metric_objects():
    module = DenseNetSEClassifier(
        num_classes=2,
        class_names=["a", "b"],
        image_size=32,
        growth_rate=4,
        block_config=(1, 1),
        num_init_features=8,
        se_reduction=2,
    )
    names = NetworkSummary(max_depth=2)._summary(None, module).layer_names
    assert names and all(n == "model" or n.startswith("model.") for n in names), names
    assert {"model.features", "model.classifier"} <= set(names)


def test_the_allow_list_is_documented():
    page = (ROOT / "docs" / "console.md").read_text()
    for pattern in STDERR_ALLOWED:
        assert pattern in page, pattern


@pytest.mark.slow
def test_a_run_with_a_test_split_ends_with_its_test_result_and_intervals(tmp_path, caplog):
    import json

    from densenet_se.train import run
    from helpers.images import make_image_folder

    images = make_image_folder(tmp_path / "images", {"a": 10, "b": 10})
    cfg = compose_cfg(tmp_path, [*TINY, f"data.root={images}", "data.test_fraction=0.25", "best_report=true"])
    with caplog.at_level(logging.INFO, logger="densenet_se"):
        run(cfg)
    test = json.loads((tmp_path / "run" / "metrics.json").read_text())["test"]
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("test split")]

    def part(
        name: str, key: str
    ) -> str:  # an interval where the bootstrap gave one ("no interval" otherwise)
        ci = test[f"{key}_ci"]
        return f"{name} {test[key]:.4f}" + (f" ({ci[0]:.4f} to {ci[1]:.4f})" if ci else "")

    assert test["acc_ci"] is not None  # a proportion always has one (Wilson when every resample agrees)
    assert lines == [
        "test split, best checkpoint with 95 % intervals: "
        + ", ".join([part("acc", "acc"), part("balanced acc", "balanced_acc"), part("AUROC", "auroc")])
    ]
