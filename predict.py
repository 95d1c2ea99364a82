"""Predict images: `python predict.py ckpt_path=RUN/checkpoints/best.ckpt input=FILE_OR_DIR` (see README.md)."""

from pathlib import Path

from densenet_se.cli import hydra_entry
from densenet_se.config import PredictConfig


def run(cfg):
    # Imported here, not at the top: a config error is then reported before torch and Lightning load.
    from densenet_se.predict import run as task

    return task(cfg)


main = hydra_entry(
    run, config_name="predict", config_dir=Path(__file__).parent / "conf", schema=PredictConfig
)

if __name__ == "__main__":
    main()
