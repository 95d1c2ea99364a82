"""Export a checkpoint: `python export.py ckpt_path=RUN/checkpoints/best.ckpt format=onnx` (see README.md)."""

from pathlib import Path

from densenet_se.cli import hydra_entry
from densenet_se.config import ExportConfig


def run(cfg):
    # Imported here, not at the top: a config error is then reported before torch and Lightning load.
    from densenet_se.export import run as task

    return task(cfg)


main = hydra_entry(run, config_name="export", config_dir=Path(__file__).parent / "conf", schema=ExportConfig)

if __name__ == "__main__":
    main()
