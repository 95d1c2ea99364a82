"""Evaluate a checkpoint on its run's split: `python eval.py ckpt_path=RUN/checkpoints/best.ckpt` (see README.md)."""

from pathlib import Path

from densenet_se.cli import hydra_entry
from densenet_se.config import EvalConfig


def run(cfg):
    # Imported here, not at the top: a config error is then reported before torch and Lightning load.
    from densenet_se.evaluate import run as task

    return task(cfg)


main = hydra_entry(run, config_name="eval", config_dir=Path(__file__).parent / "conf", schema=EvalConfig)

if __name__ == "__main__":
    main()
