"""Configs for tests: the repository paths, the TINY overrides, and conf/train.yaml composed in-process."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

ROOT = Path(__file__).resolve().parents[2]
CONF = ROOT / "conf"

# Tiny, fast, deterministic runs for every test that trains.
TINY = [
    "model=densenet_tiny_se",
    "model.growth_rate=4",
    "model.block_config=[1,1]",
    "model.num_init_features=8",
    "model.se_reduction=2",
    "data.image_size=32",
    "data.batch_size=8",
    "trainer=cpu",
    "trainer.max_epochs=2",
    "trainer.num_sanity_val_steps=0",
    "trainer.log_every_n_steps=1",
    "optim.lr=0.01",
    # The end-of-run report.html costs about a second of figures; the tests of the report turn it on.
    "best_report=false",
]
# TINY with a torchvision backbone (model.arch=torchvision) instead of the tiny DenseNet: MobileNetV3-Small,
# 1.5 M parameters, runs 32 px images in milliseconds.
TINY_TV = [
    *(o for o in TINY if not o.startswith("model")),
    "model=torchvision",
    "model.name=mobilenet_v3_small",
]


def compose_cfg(tmp_path: Path, overrides: list[str]) -> DictConfig:
    """conf/train.yaml with `overrides`, its paths under `tmp_path` (the run directory is tmp_path/run)."""
    from densenet_se.config import compose_train_config

    return compose_train_config(overrides, tmp_path, CONF)


def hydra_cfg(overrides: list[str], config_name: str = "train") -> DictConfig:
    """A config composed with its `hydra` node, as a Hydra app sees it (launcher, sweeper, callbacks)."""
    return _compose(config_name, overrides, with_hydra=True)


def task_cfg(config_name: str, overrides: list[str], **values: object) -> DictConfig:
    """conf/<config_name>.yaml (eval, predict, export) as its task gets it, with `values` set (e.g. output_dir)."""
    from omegaconf import open_dict

    cfg = _compose(config_name, overrides, with_hydra=False)
    with open_dict(cfg):
        for key, value in values.items():
            cfg[key] = value
    return cfg


def _compose(config_name: str, overrides: list[str], with_hydra: bool) -> DictConfig:
    from hydra import compose, initialize_config_dir

    from densenet_se.cli import register

    register()  # the schemas and the resolvers conf/hydra/ uses, as `python train.py` registers them
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name=config_name, overrides=overrides, return_hydra_config=with_hydra)
