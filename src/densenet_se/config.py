"""Typed config schemas (registered in Hydra's ConfigStore) and the start-up range checks.

The dataclasses are the single source of defaults for the `data`, `model` and `optim` groups; the YAML files in
`conf/` mirror them with comments, and a test keeps the two (and the constructors) in step. `model` is typed by
its arch's schema (densenet_se.backbones): each conf/model/ file extends `/model_schema/<arch>@_here_` in its defaults list.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from densenet_se import backbones
from densenet_se.backbones import DEFAULT_ARCH, SCHEMA_GROUP, ModelSettings
from densenet_se.checks import Range, Rule, problem
from densenet_se.console import PRINT_CONFIG_RULE
from densenet_se.data.sources.base import DEFAULT_SOURCE
from densenet_se.errors import UserError
from densenet_se.overrides import closest

# OmegaConf evaluates these annotations (PEP 604 unions and builtin generics work on Python >= 3.10).


@dataclass
class DataConfig:
    root: str = "data/monkeypox"
    # Which registered source lists the images under root (densenet_se.data.sources), and the file it reads.
    source: str = DEFAULT_SOURCE
    labels: str | None = None
    image_size: int = 224
    batch_size: int = 32
    val_fraction: float = 0.2
    test_fraction: float = 0.0
    split_seed: int = 428
    num_workers: int = 0
    cache: str = "memory"
    cache_dir: str | None = None
    # Replaced by the augment group: null; false means augment=none; true is refused (use augment=light).
    augment: bool | None = None
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
class OptimConfig:
    optimizer: str = "adam"
    lr: float = 1e-4
    weight_decay: float = 0.0
    momentum: float = 0.9
    scheduler: str = "none"
    warmup_epochs: int = 0
    label_smoothing: float = 0.0
    class_weights: Any | None = None
    # Fine-tuning (densenet_se.finetune): epochs with the backbone frozen, and the backbone's share of optim.lr.
    freeze_epochs: int = 0
    backbone_lr_mult: float = 1.0


@dataclass
class AugmentConfig:
    """augment=none|light|strong|custom (conf/augment/): the training augmentation (densenet_se.data.augment)."""

    policy: str = "none"
    crop_scale_min: float = 1.0
    hflip: float = 0.0
    vflip: float = 0.0
    rotation: float = 0.0
    brightness: float = 0.0
    contrast: float = 0.0
    saturation: float = 0.0
    hue: float = 0.0
    auto: str = "none"
    magnitude: int = 9
    num_ops: int = 2
    magnitude_bins: int = 31
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    mix_prob: float = 1.0


@dataclass
class EmaConfig:
    """The weight average of callbacks=ema (densenet_se.ema)."""

    decay: float = 0.999
    warmup: bool = True


@dataclass
class TuneConfig:
    """tune.lr_find=true: Lightning's learning-rate range test before training (densenet_se.tune)."""

    lr_find: bool = False
    apply: bool = False
    min_lr: float = 1e-6
    max_lr: float = 1.0
    num_training: int = 100


@dataclass
class PathsConfig:
    root_dir: str = MISSING
    data_dir: str = MISSING
    output_dir: str = MISSING
    cache_dir: str = MISSING


@dataclass
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    # The arch's schema (a ModelSettings subclass) comes with the conf/model/ file that is chosen.
    model: ModelSettings = MISSING
    optim: OptimConfig = field(default_factory=OptimConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    ema: EmaConfig = field(default_factory=EmaConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    trainer: dict[str, Any] = field(default_factory=dict)
    callbacks: dict[str, Any] = field(default_factory=dict)
    logger: dict[str, Any] = field(default_factory=dict)
    paths: PathsConfig = field(default_factory=PathsConfig)
    task_name: str = "train"
    seed: int = 428
    resume: str | None = None
    test_after_fit: bool = True
    best_report: bool = True
    print_config: Any = "compact"  # compact, full or false (console.PRINT_CONFIG_RULE)
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
class BootstrapConfig:
    # Resamples for the confidence intervals (0: no intervals), their seed, and the interval's coverage.
    n: int = 2000
    seed: int = 0
    level: float = 0.95


@dataclass
class EvalConfig:
    ckpt_path: str | None = None
    split: str = "val"
    split_file: str | None = None
    data: EvalDataConfig = field(default_factory=EvalDataConfig)
    on_missing: str = "error"
    positive_class: str | None = None
    bootstrap: BootstrapConfig = field(default_factory=BootstrapConfig)
    threshold: float | None = None
    target_sensitivity: float | None = None
    target_specificity: float | None = None
    calibrate: str = "none"
    tta: str = "none"
    top_losses: int = 16
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
    tta: str = "none"
    calibration: str | None = None
    operating_point: str | None = None
    threshold: float | None = None
    positive_class: str | None = None
    gradcam: bool = False
    gradcam_dir: str | None = None
    max_image_pixels: int = 89_478_485
    allow_output_in_input: bool = False
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
    calibration: str | None = None
    output_dir: str = "${hydra:runtime.output_dir}"
    task_name: str = "export"


def register_configs() -> None:
    """Register the schemas in Hydra's ConfigStore (`conf/train.yaml` extends `train_schema`); idempotent."""
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    for backbone in backbones.registry().values():
        cs.store(group=SCHEMA_GROUP, name=backbone.arch, node=backbone.schema)
    cs.store(name="eval_schema", node=EvalConfig)
    cs.store(name="predict_schema", node=PredictConfig)
    cs.store(name="export_schema", node=ExportConfig)


# ---------------------------------------------------------------------------------------------------------------
# Range checks run at start-up: types and unknown keys are already rejected by the schema at compose time.


def _batches(open_low: bool = False) -> Range:
    """Lightning's batch-count keys: a float is a fraction of the epoch, an int a number of batches."""

    def ok(v: Any) -> bool:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return True  # e.g. a time interval string for val_check_interval: Lightning checks it
        if isinstance(v, float):
            return (0.0 < v if open_low else 0.0 <= v) and v <= 1.0
        return v >= (1 if open_low else 0)

    if open_low:
        return Range(ok, "a fraction in (0, 1] or a number of batches >= 1")
    return Range(ok, "a fraction in [0, 1] or a number of batches >= 0")


def _integer(ok: Any, words: str) -> Range:
    """An untyped (trainer.*) key that Lightning needs as an int: 1e3 or 10.0 is refused, not passed on."""
    return Range(lambda v: isinstance(v, int) and not isinstance(v, bool) and ok(v), words)


# The run's own keys and Lightning's Trainer arguments -> allowed values; data.*, model.* and optim.* live with
# the code that uses them (see rules()).
_RULES: dict[str, Rule] = {
    "seed": Range(lambda v: 0 <= v < 2**32, "an integer in [0, 2**32)"),
    "print_config": PRINT_CONFIG_RULE,
    # Lightning accepts some of these and fails later (a modulo by zero, a bare AssertionError) or trains nothing.
    "trainer.max_epochs": _integer(lambda v: v == -1 or v >= 1, "an integer >= 1, or -1 for no limit"),
    "trainer.min_epochs": _integer(lambda v: v >= 0, "an integer >= 0"),
    "trainer.max_steps": _integer(lambda v: v == -1 or v >= 1, "an integer >= 1, or -1 for no limit"),
    "trainer.min_steps": _integer(lambda v: v >= 0, "an integer >= 0"),
    "trainer.accumulate_grad_batches": _integer(lambda v: v >= 1, "an integer >= 1"),
    "trainer.check_val_every_n_epoch": _integer(lambda v: v >= 1, "an integer >= 1 (or null)"),
    "trainer.log_every_n_steps": _integer(lambda v: v >= 1, "an integer >= 1"),
    "trainer.num_sanity_val_steps": _integer(lambda v: v >= -1, "an integer >= 0, or -1 for all"),
    "trainer.num_nodes": _integer(lambda v: v >= 1, "an integer >= 1"),
    "trainer.reload_dataloaders_every_n_epochs": _integer(lambda v: v >= 0, "an integer >= 0"),
    "trainer.fast_dev_run": Range(
        lambda v: isinstance(v, bool) or (isinstance(v, int) and v >= 0), "true, false or an integer >= 0"
    ),
    "trainer.gradient_clip_val": Range(lambda v: v >= 0, "a number >= 0 (or null)"),
    "trainer.val_check_interval": _batches(open_low=True),
    "trainer.limit_train_batches": _batches(),
    "trainer.limit_val_batches": _batches(),
    "trainer.limit_test_batches": _batches(),
    "trainer.overfit_batches": _batches(),
}


def rules(arch: str = DEFAULT_ARCH) -> dict[str, Rule]:
    """Every checked key of the train config (`data.image_size`, ...) with model.arch=`arch` and its allowed
    values, each read from the code that uses the value (the data module, the arch, the recipes, ...) except the
    run's own and the trainer's."""
    # Imported here: they need torch and Lightning, and a config error is reported before those load.
    from densenet_se import ema, finetune, tune
    from densenet_se.data import augment, mixing
    from densenet_se.data.datamodule import allowed as data_allowed
    from densenet_se.module import ALLOWED as OPTIM

    owners = [
        ("data", data_allowed()),
        ("model", backbones.get(arch).allowed()),
        ("optim", OPTIM),
        ("optim", finetune.ALLOWED),
        ("augment", augment.ALLOWED),
        ("augment", mixing.ALLOWED),
        ("ema", ema.ALLOWED),
        ("tune", tune.ALLOWED),
    ]
    return {**{f"{group}.{k}": rule for group, table in owners for k, rule in table.items()}, **_RULES}


def _cross_checks() -> list[Any]:
    """The checks across keys that live beside the code using them (data.labels, recipes: augment, tune,
    fine-tuning)."""
    from densenet_se import finetune, tune
    from densenet_se.data import augment, sources

    return [sources.check, augment.check, tune.check, finetune.check]


def arch_of(model: Any) -> backbones.Backbone:
    """The registered arch a config's `model` node names (none: densenet_se, as before model.arch); UserError."""
    named = OmegaConf.is_dict(model) or isinstance(model, dict)
    try:
        return backbones.get(model.get("arch", DEFAULT_ARCH) if named else DEFAULT_ARCH)
    except ValueError as err:
        raise UserError(str(err)) from None


def check_arch(model: Any) -> backbones.Backbone:
    """The arch of a config's `model` node, whose keys must all be that arch's; UserError otherwise."""
    backbone = arch_of(model)
    node_type = OmegaConf.get_type(model) if OmegaConf.is_config(model) else None
    foreign = [str(key) for key in (model or {}) if key not in backbone.defaults()]
    typed = isinstance(node_type, type) and issubclass(node_type, ModelSettings)
    if foreign or (typed and node_type is not backbone.schema):
        files = ", ".join(f"model={b.config}" for b in backbones.registry().values())
        what = f"model.{foreign[0]} is not a setting of" if foreign else "the model settings do not fit"
        raise UserError(
            f"{what} model.arch={backbone.arch}; choose an arch with its file in conf/model/ ({files}) rather "
            "than setting model.arch alone."
        )
    return backbone


def validate(cfg: DictConfig) -> None:
    """Raise UserError naming the first out-of-range key and its allowed values."""
    backbone = check_arch(cfg.get("model"))
    for key, rule in rules(backbone.arch).items():
        value = plain(OmegaConf.select(cfg, key))
        message = None if value is None else problem(key, value, rule)
        if message is not None:
            raise UserError(message)
    # Across keys: the split's own rules (no images left for training, a fold outside data.folds).
    from densenet_se.data.split import check_folds, check_fractions

    check_fractions(cfg.data.val_fraction, cfg.data.test_fraction)
    check_folds(cfg.data.folds, cfg.data.fold)
    for cross_check in _cross_checks():
        cross_check(cfg)
    weights = cfg.optim.class_weights
    if weights is not None and weights != "balanced":
        if not OmegaConf.is_list(weights) or not all(isinstance(w, (int, float)) and w >= 0 for w in weights):
            raise UserError(
                "optim.class_weights must be null, 'balanced', or a list of non-negative numbers, one per class."
            )


def closest_key(full_key: str, schema: Any = TrainConfig) -> str | None:
    """The valid key nearest to a mistyped `full_key` (e.g. `data.rot` -> `data.root`), if any is close."""
    parts = full_key.split(".")
    if len(parts) == 2 and parts[0] == "trainer":
        found = closest(parts[1], trainer_arguments())
        return f"trainer.{found}" if found else None
    if len(parts) == 2 and parts[0] == "model" and schema is TrainConfig:  # typed by the arch's schema
        found = closest(parts[1], backbones.model_keys())
        return f"model.{found}" if found else None
    node = schema
    for part in parts[:-1]:
        match = {f.name: f for f in fields(node)}.get(part) if _is_dataclass(node) else None
        if match is None:
            return None
        node = match.default_factory() if callable(match.default_factory) else match.default  # type: ignore[misc]
        node = type(node) if _is_dataclass(node) else node
    if not _is_dataclass(node):
        return None
    found = closest(parts[-1], [f.name for f in fields(node)])
    return ".".join([*parts[:-1], found]) if found else None


def unknown_model_setting(full_key: str, node_type: Any) -> str | None:
    """The sentence for a model.* key that the arch whose schema is `node_type` lacks, or None for another key."""
    group, _, name = full_key.partition(".")
    chosen = next((b for b in backbones.registry().values() if b.schema is node_type), None)
    if chosen is None or group != "model" or "." in name:
        return None
    owner = next((b for b in backbones.registry().values() if name in b.defaults()), None)
    close = closest(name, list(chosen.defaults()))
    if owner is not None:
        hint = f"it is a setting of model.arch={owner.arch}, chosen with its file (model={owner.config})"
    else:
        hint = f"did you mean model.{close}?" if close else f"its settings are {', '.join(chosen.defaults())}"
    return f"model.{name} is not a setting of model.arch={chosen.arch}; {hint}"


def trainer_arguments() -> list[str]:
    """The keyword arguments of Lightning's Trainer: the keys `trainer.*` may set."""
    import inspect

    import lightning  # imported here: a config error is reported before Lightning loads

    return [n for n in inspect.signature(lightning.Trainer.__init__).parameters if n != "self"]


def _is_dataclass(obj: Any) -> bool:
    return hasattr(obj, "__dataclass_fields__")


def plain(node: Any) -> Any:
    """A config node as plain Python values (resolved), for constructors and checkpoints."""
    if OmegaConf.is_config(node):
        return OmegaConf.to_container(node, resolve=True)
    return node


def train_schema(model: Any = None) -> DictConfig:
    """TrainConfig with `model` typed by the schema of the arch a config's model node names (none: densenet_se),
    to merge a saved config into; UserError for an arch that is not registered."""
    schema = OmegaConf.structured(arch_of(model).schema)
    return OmegaConf.merge(OmegaConf.structured(TrainConfig), {"model": schema})


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
    register_configs()
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose(config_name="train", overrides=list(overrides))
    with open_dict(cfg):
        cfg.paths.root_dir = str(work)
        cfg.paths.data_dir = str(work / "data")
        cfg.paths.output_dir = str(work / "run")
        cfg.paths.cache_dir = str(work / "cache")
    return cfg
