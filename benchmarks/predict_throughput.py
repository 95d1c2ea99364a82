"""predict.py's images/s on a folder of JPEGs against the model-only eval floor, side by side in one run.

- floor: the same model's eval forward + softmax on the same images, already decoded into uint8 tensors in
  memory, batch by batch as predict does (densenet_se.inference.probabilities): what prediction costs at the
  least for this network.
- predict: `densenet_se.predict.run` on the folder (listing, decoding with `num_workers` processes ahead of
  the model, the model, the CSV), once per --workers value.

The runs take turns (floor, predict with each --workers value, floor, ...) --repeats times; medians. The
model is the tiny layout (conf/model/densenet_tiny_se.yaml) with random weights at --image-size, saved as a
checkpoint; the folder holds --images synthetic demo JPEGs at --source-size px (made in parallel, not timed).

    python benchmarks/predict_throughput.py --images 2000 --image-size 224 --workers 0 2
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import LAYOUTS, compose, load_average, make_data  # noqa: E402

TARGET_RATIO = 0.9


def make_checkpoint(path: Path, layout: str, image_size: int, work: Path) -> Path:
    """A densenet-se checkpoint of the layout with random weights (what predict needs: weights + hparams)."""
    from densenet_se.config import plain
    from densenet_se.module import DenseNetSEClassifier

    model = plain(compose([f"model={LAYOUTS[layout]}"], work).model)
    module = DenseNetSEClassifier(2, ["Monkeypox", "Others"], image_size=image_size, **model)
    torch.save(
        {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams), "epoch": 0}, path
    )
    return path


def predict_config(ckpt: Path, folder: Path, output: Path, batch_size: int, workers: int):
    from omegaconf import OmegaConf

    from densenet_se.config import PredictConfig

    cfg = OmegaConf.structured(PredictConfig)
    cfg.merge_with(
        {
            "ckpt_path": str(ckpt),
            "input": str(folder),
            "output": str(output),
            "batch_size": batch_size,
            "num_workers": workers,
            "device": "cpu",
        }
    )
    return cfg


class Floor:
    """The model's eval on the images decoded once into memory, as `inference.probabilities` runs it (the eval floor)."""

    def __init__(self, ckpt: Path, folder: Path, batch_size: int) -> None:
        from densenet_se.checkpoint import build_classifier, load_checkpoint
        from densenet_se.data.filebatches import decoded_batches
        from densenet_se.predict import list_images

        checkpoint = load_checkpoint(ckpt)
        self.hparams = checkpoint["hyper_parameters"]
        self.module = build_classifier(checkpoint)
        files = list_images(folder)
        batches = decoded_batches(files, self.hparams["image_size"], 10**9, batch_size, num_workers=0)
        self.images = torch.cat([b.images for b in batches if b.images is not None])
        self.batch_size = batch_size

    def run(self) -> float:
        from densenet_se.inference import probabilities

        start = time.perf_counter()
        probabilities(self.module, self.images, self.hparams, self.batch_size, torch.device("cpu"))
        return time.perf_counter() - start


def measure(args: argparse.Namespace, predict) -> tuple[int, dict[str, list[float]]]:
    """Make the data and the checkpoint; time the floor and predict with each --workers value, taking turns."""
    with tempfile.TemporaryDirectory(prefix="predict_throughput_") as tmp:
        work = Path(tmp)
        folder = make_data(work / "images", args.images, args.source_size, args.make_workers)
        ckpt = make_checkpoint(work / "model.ckpt", args.layout, args.image_size, work)
        floor = Floor(ckpt, folder, args.batch_size)
        count = len(floor.images)
        floor.run()  # warm-up: allocator, oneDNN primitives
        times: dict[str, list[float]] = {"floor": []}
        for _ in range(args.repeats):
            times["floor"].append(floor.run())
            for workers in args.workers:
                cfg = predict_config(ckpt, folder, work / f"p{workers}.csv", args.batch_size, workers)
                start = time.perf_counter()
                rows = predict(cfg)["rows"]
                times.setdefault(f"predict num_workers={workers}", []).append(time.perf_counter() - start)
                assert len(rows) == count
    return count, times


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--source-size", type=int, default=224, help="pixel size of the generated JPEGs")
    parser.add_argument("--image-size", type=int, default=224, help="the model's input size")
    parser.add_argument("--layout", choices=sorted(LAYOUTS), default="tiny")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="num_workers values to run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--make-workers", type=int, default=2, help="processes making the JPEGs")
    args = parser.parse_args(argv)
    if args.images < 2 or args.repeats < 1:
        parser.error("--images must be >= 2 and --repeats >= 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import logging

    from densenet_se.predict import run as predict

    load_before = load_average()
    logger = logging.getLogger("densenet_se")
    level = logger.level
    logger.setLevel(logging.WARNING)  # no per-run "wrote N predictions" lines
    try:
        count, times = measure(args, predict)
    finally:
        logger.setLevel(level)  # callers in the same process (tests) get their logging back
    load_after = load_average()

    print(
        f"{count} demo JPEGs at {args.source_size} px -> {args.image_size} px; layout {args.layout}; batch "
        f"{args.batch_size}; CPU, {torch.get_num_threads()} threads for the model; {args.repeats} rounds, "
        f"taking turns; medians; load average {load_before:.2f} before, {load_after:.2f} after"
    )
    header = (
        f"{'run':34} {'median s':>9} {'min s':>7} {'images/s':>9} {'vs floor':>9}  target >= {TARGET_RATIO}x"
    )
    print(header)
    print("-" * len(header))
    floor_rate = count / statistics.median(times["floor"])
    for name, seconds in times.items():
        median = statistics.median(seconds)
        rate = count / median
        ratio = rate / floor_rate
        verdict = "" if name == "floor" else ("met" if ratio >= TARGET_RATIO else "NOT met")
        label = "floor (model only, decoded in memory)" if name == "floor" else name
        print(f"{label:34} {median:9.3f} {min(seconds):7.3f} {rate:9.1f} {ratio:8.3f}x  {verdict}")


if __name__ == "__main__":
    sys.exit(main())
