"""Train a DenseNet+SE classifier: `python train.py experiment=demo` (see README.md)."""

from pathlib import Path

from densenet_se.cli import hydra_entry


def run(cfg):
    # Imported here, not at the top: a config error is then reported before torch and Lightning load.
    from densenet_se.train import run as train

    return train(cfg)


main = hydra_entry(run, config_name="train", config_dir=Path(__file__).parent / "conf")

if __name__ == "__main__":
    main()
