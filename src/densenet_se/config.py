"""Typed config schemas (registered in Hydra's ConfigStore) and the start-up range checks.

The dataclasses are the single source of defaults for the `data`, `model` and `optim` groups; the YAML files in
`conf/` mirror them with comments, and a test keeps the two (and the constructors) in step.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from densenet_se.errors import UserError

# OmegaConf evaluates these annotations (PEP 604 unions and builtin generics work on Python >= 3.10).


@dataclass
class DataConfig:
    root: str = "data/monkeypox"
    image_size: int = 224
    batch_size: int = 32
    val_fraction: float = 0.2
    test_fraction: float = 0.0
    split_seed: int = 428
    num_workers: int = 0
    cache: str = "memory"
    cache_dir: str | None = None
    augment: bool = False
    on_bad_file: str = "skip"
    demo: bool = False
    pin_memory: bool = False
    persistent_workers: bool = True
    max_image_pixels: int = 89_478_485
    extensions: list[str] | None = None
    folds: int = 0
    fold: int = 0
    group_pattern: str | None = None
    groups: str | None = None


@dataclass
class ModelConfig:
    growth_rate: int = 32
    block_config: list[int] = field(default_factory=lambda: [6, 12, 24, 16])
    num_init_features: int = 64
    bn_size: int = 4
    compression_rate: float = 0.5
    drop_rate: float = 0.0
    se_reduction: int = 8
    se_placement: str = "head"
    memory_efficient: bool = False
    pretrained: str | None = None
    channels_last: bool = False
    compile: bool = False


@dataclass
class OptimConfig:
    optimizer: str = "adam"
    lr: float = 1e-4
    weight_decay: float = 0.0
    momentum: float = 0.9
    scheduler: str = "none"
    warmup_epochs: int = 0
    label_smoothing: float = 0.0
    class_weights: Any | None = None


@dataclass
class PathsConfig:
    root_dir: str = MISSING
    data_dir: str = MISSING
    output_dir: str = MISSING
    cache_dir: str = MISSING


@dataclass
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: dict[str, Any] = field(default_factory=dict)
    callbacks: dict[str, Any] = field(default_factory=dict)
    logger: dict[str, Any] = field(default_factory=dict)
    paths: PathsConfig = field(default_factory=PathsConfig)
    task_name: str = "train"
    seed: int = 428
    resume: str | None = None
    test_after_fit: bool = True
    print_config: bool = True
    experiment_name: str | None = None


# The other entry points' schemas live here too, so every entry point can report a config error before torch loads.


@dataclass
class EvalDataConfig:
    # null: the training run's value (its .hydra/config.yaml; the image size from the checkpoint).
    root: str | None = None
    image_size: int | None = None
    batch_size: int | None = None
    max_image_pixels: int | None = None


@dataclass
class EvalConfig:
    ckpt_path: str | None = None
    split: str = "val"
    split_file: str | None = None
    data: EvalDataConfig = field(default_factory=EvalDataConfig)
    on_missing: str = "error"
    positive_class: str | None = None
    device: str = "auto"
    output_dir: str = "${hydra:runtime.output_dir}"
    task_name: str = "eval"


@dataclass
class PredictConfig:
    ckpt_path: str | None = None
    input: str | None = None
    # The run directory of this command (outputs/predict/<date>/<time>) unless given.
    output: str = "${hydra:runtime.output_dir}/predictions.csv"
    batch_size: int = 32
    num_workers: int = 2
    device: str = "auto"
    gradcam: bool = False
    gradcam_dir: str | None = None
    max_image_pixels: int = 89_478_485
    task_name: str = "predict"


@dataclass
class ExportConfig:
    ckpt_path: str | None = None
    format: str = "onnx"
    # null: model.onnx / model.pt in this command's run directory (outputs/export/<date>/<time>).
    output: str | None = None
    exporter: str = "dynamo"
    opset: int | None = None
    check: bool = True
    output_dir: str = "${hydra:runtime.output_dir}"
    task_name: str = "export"


def register_configs() -> None:
    """Register the schemas; `conf/train.yaml` extends `train_schema`."""
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    cs.store(name="eval_schema", node=EvalConfig)
    cs.store(name="predict_schema", node=PredictConfig)
    cs.store(name="export_schema", node=ExportConfig)


register_configs()


def _resume_run_dir(resume: str | None, default: str) -> str:
    if resume in (None, ""):  # a new run: no need to load the resume machinery (torch, Lightning)
        return default
    from densenet_se.resume import hydra_run_dir  # imported late: it needs torch and Lightning

    return hydra_run_dir(resume, default)


def _resume_output_subdir(resume: Any) -> str | None:
    """`.hydra` for a new run; none when resuming (the original is kept) or in a non-zero DDP rank."""
    from densenet_se.distributed import is_rank_zero

    return ".hydra" if resume in (None, "") and is_rank_zero() else None


def register_resolvers() -> None:
    """`${resume_run_dir:...}` and `${resume_output_subdir:...}` for conf/hydra/default.yaml (resume=RUN_DIR)."""
    OmegaConf.register_new_resolver("resume_run_dir", _resume_run_dir, replace=True)
    OmegaConf.register_new_resolver("resume_output_subdir", _resume_output_subdir, replace=True)


register_resolvers()


# ---------------------------------------------------------------------------------------------------------------
# Range checks run at start-up: types and unknown keys are already rejected by the schema at compose time.

_CHOICES: dict[str, tuple[str, ...]] = {
    "data.cache": ("none", "memory", "disk", "device"),
    "data.on_bad_file": ("skip", "error"),
    "model.se_placement": ("head", "blocks", "none"),
    "optim.optimizer": ("adam", "adamw", "sgd"),
    "optim.scheduler": ("none", "cosine", "step", "plateau"),
}


def _batches(open_low: bool = False) -> Any:
    """Lightning's batch-count keys: a float is a fraction of the epoch, an int a number of batches."""

    def ok(v: Any) -> bool:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return True  # e.g. a time interval string for val_check_interval: Lightning checks it
        if isinstance(v, float):
            return (0.0 < v if open_low else 0.0 <= v) and v <= 1.0
        return v >= (1 if open_low else 0)

    return ok


# key -> (predicate, allowed range in words)
_RANGES: dict[str, tuple[Any, str]] = {
    "data.image_size": (lambda v: v >= 32, "an integer >= 32"),
    "data.batch_size": (lambda v: v >= 1, "an integer >= 1"),
    "data.val_fraction": (lambda v: 0.0 < v < 1.0, "a number in (0, 1)"),
    "data.test_fraction": (lambda v: 0.0 <= v < 1.0, "a number in [0, 1)"),
    "data.num_workers": (lambda v: v >= 0, "an integer >= 0"),
    "data.max_image_pixels": (lambda v: v >= 1024, "an integer >= 1024"),
    "data.folds": (lambda v: v == 0 or v >= 2, "0 (no folds) or an integer >= 2"),
    "data.fold": (lambda v: v >= 0, "an integer >= 0"),
    "model.growth_rate": (lambda v: v >= 1, "an integer >= 1"),
    "model.num_init_features": (lambda v: v >= 1, "an integer >= 1"),
    "model.bn_size": (lambda v: v >= 1, "an integer >= 1"),
    "model.compression_rate": (lambda v: 0.0 < v <= 1.0, "a number in (0, 1]"),
    "model.drop_rate": (lambda v: 0.0 <= v < 1.0, "a number in [0, 1)"),
    "model.se_reduction": (lambda v: v >= 1, "an integer >= 1"),
    "model.block_config": (
        lambda v: len(v) >= 1 and all(int(b) >= 1 for b in v),
        "a non-empty list of integers >= 1",
    ),
    "optim.lr": (lambda v: 0.0 < v <= 10.0, "a number in (0, 10]"),
    "optim.weight_decay": (lambda v: v >= 0.0, "a number >= 0"),
    "optim.momentum": (lambda v: 0.0 <= v < 1.0, "a number in [0, 1)"),
    "optim.warmup_epochs": (lambda v: v >= 0, "an integer >= 0"),
    "optim.label_smoothing": (lambda v: 0.0 <= v < 1.0, "a number in [0, 1)"),
    "seed": (lambda v: 0 <= v < 2**32, "an integer in [0, 2**32)"),
    # Lightning accepts some of these and fails later (a modulo by zero) or trains nothing.
    "trainer.max_epochs": (lambda v: v == -1 or v >= 1, "an integer >= 1, or -1 for no limit"),
    "trainer.min_epochs": (lambda v: v >= 0, "an integer >= 0"),
    "trainer.max_steps": (lambda v: v == -1 or v >= 1, "an integer >= 1, or -1 for no limit"),
    "trainer.accumulate_grad_batches": (lambda v: v >= 1, "an integer >= 1"),
    "trainer.check_val_every_n_epoch": (lambda v: v >= 1, "an integer >= 1 (or null)"),
    "trainer.log_every_n_steps": (lambda v: v >= 1, "an integer >= 1"),
    "trainer.num_sanity_val_steps": (lambda v: v >= -1, "an integer >= 0, or -1 for all"),
    "trainer.gradient_clip_val": (lambda v: v >= 0, "a number >= 0 (or null)"),
    "trainer.val_check_interval": (_batches(True), "a fraction in (0, 1] or a number of batches >= 1"),
    "trainer.limit_train_batches": (_batches(), "a fraction in [0, 1] or a number of batches >= 0"),
    "trainer.limit_val_batches": (_batches(), "a fraction in [0, 1] or a number of batches >= 0"),
    "trainer.limit_test_batches": (_batches(), "a fraction in [0, 1] or a number of batches >= 0"),
}


def validate(cfg: DictConfig) -> None:
    """Raise UserError naming the first out-of-range key and its allowed values."""
    for key, allowed in _CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value is not None and value not in allowed:
            raise UserError(f"{key}={value!r} is not allowed; choose one of: {', '.join(allowed)}.")
    for key, (ok, words) in _RANGES.items():
        value = OmegaConf.select(cfg, key)
        if value is None:
            continue
        try:
            good = ok(value)
        except TypeError:  # trainer.* values are untyped: a string where a number belongs
            good = False
        if not good:
            raise UserError(f"{key}={_show(value)} is out of range; it must be {words}.")
    data = cfg.data
    if data.val_fraction + data.test_fraction >= 1.0:
        raise UserError(
            f"data.val_fraction + data.test_fraction = {data.val_fraction + data.test_fraction:g} leaves no "
            "training images; keep the sum below 1."
        )
    if data.folds and data.fold >= data.folds:
        raise UserError(
            f"data.fold={data.fold} is out of range; it must be in 0..{data.folds - 1} (data.folds)."
        )
    if data.fold and not data.folds:
        raise UserError(f"data.fold={data.fold} needs data.folds, e.g. data.folds=5 data.fold={data.fold}.")
    weights = cfg.optim.class_weights
    if weights is not None and weights != "balanced":
        if not OmegaConf.is_list(weights) or not all(isinstance(w, (int, float)) and w >= 0 for w in weights):
            raise UserError(
                "optim.class_weights must be null, 'balanced', or a list of non-negative numbers, one per class."
            )


def _show(value: Any) -> str:
    if OmegaConf.is_config(value):
        value = OmegaConf.to_container(value)
    return repr(value) if isinstance(value, str) else str(value)


def closest_key(full_key: str, schema: Any = TrainConfig) -> str | None:
    """The valid key nearest to a mistyped `full_key` (e.g. `data.rot` -> `data.root`), if any is close."""
    parts = full_key.split(".")
    if len(parts) == 2 and parts[0] == "trainer":
        import inspect

        import lightning

        names = [n for n in inspect.signature(lightning.Trainer.__init__).parameters if n != "self"]
        found = difflib.get_close_matches(parts[1], names, n=1, cutoff=0.5)
        return f"trainer.{found[0]}" if found else None
    node = schema
    for part in parts[:-1]:
        match = {f.name: f for f in fields(node)}.get(part) if _is_dataclass(node) else None
        if match is None:
            return None
        node = match.default_factory() if callable(match.default_factory) else match.default  # type: ignore[misc]
        node = type(node) if _is_dataclass(node) else node
    if not _is_dataclass(node):
        return None
    names = [f.name for f in fields(node)]
    found = difflib.get_close_matches(parts[-1], names, n=1, cutoff=0.5)
    return ".".join([*parts[:-1], found[0]]) if found else None


def _is_dataclass(obj: Any) -> bool:
    return hasattr(obj, "__dataclass_fields__")


def plain(node: Any) -> Any:
    """A config node as plain Python values (resolved), for constructors and checkpoints."""
    if OmegaConf.is_config(node):
        return OmegaConf.to_container(node, resolve=True)
    return node


def compose_train_config(
    overrides: list[str], work_dir: str | Path, config_dir: str | Path | None = None
) -> DictConfig:
    """conf/train.yaml composed outside a Hydra app (tests, benchmarks, notebooks), with paths under `work_dir`.

    Hydra's `${hydra:...}` paths only resolve inside `python train.py`; here they point into `work_dir`
    (`run/` for the run directory, `data/`, `cache/`).
    """
    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict

    work = Path(work_dir)
    conf = Path(config_dir) if config_dir else Path(__file__).resolve().parents[2] / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose(config_name="train", overrides=list(overrides))
    with open_dict(cfg):
        cfg.paths.root_dir = str(work)
        cfg.paths.data_dir = str(work / "data")
        cfg.paths.output_dir = str(work / "run")
        cfg.paths.cache_dir = str(work / "cache")
    return cfg
