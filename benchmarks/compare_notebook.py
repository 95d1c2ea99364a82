"""Epoch wall time: a plain-PyTorch loop faithful to the notebook vs the project's pipeline, same data.

Both train the same network (DenseNetSE from the chosen conf/model layout, or torchvision's DenseNet at that
layout with --baseline-model torchvision) on the same generated demo set and the same train/val split, with
Adam, training and then evaluating once per epoch. They run in one process and take turns epoch by epoch
(project epoch, notebook epoch, project epoch, ...), so load from other processes hits both alike.

- notebook: torchvision ImageFolder decoding every JPEG every epoch with Resize((S, S)) + ToTensor +
  Normalize, DataLoader(num_workers=0), fp32, `loss.item()` and `(pred == y).sum().item()` per batch, and
  `torch.save` of the state dict when the validation accuracy improves.
- project: ImageFolderDataModule (decoded once into the uint8 cache: `data.cache=memory`, or `device` with
  trainer=gpu) + DenseNetSEClassifier + lightning Trainer. `--pipeline train` (default) builds the Trainer as
  `python train.py` does (checkpoints, TensorBoard, model summary, LR monitor, run reports, NaN guard), with
  the progress bar off; `--pipeline lean` has no loggers, checkpoints, summary or progress bar.

An epoch is timed from one training-epoch start to the next (training, validation, checkpoints, logging); the
first epoch of each is a warm-up and left out of the medians when there are 3 or more. One-time costs (the
project's decode into the cache, the sanity check, the final reports) are shown separately.

    python benchmarks/compare_notebook.py --image-size 64 --layout tiny --epochs 7 --batch-size 32 \\
        --device cpu
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import LAYOUTS, ROOT, ComputeFloor, describe, interleaver, sync  # noqa: E402


def compose(args: argparse.Namespace, data_root: Path, work: Path):
    """conf/train.yaml composed with the layout, sizes and device asked for (the project side's config)."""
    from densenet_se.config import compose_train_config

    overrides = [
        f"model={LAYOUTS[args.layout]}",
        f"trainer={'gpu' if args.device.startswith('cuda') else 'cpu'}",
        f"data.root={data_root}",
        f"data.image_size={args.image_size}",
        f"data.batch_size={args.batch_size}",
        f"trainer.max_epochs={args.epochs}",
        "trainer.enable_progress_bar=false",
        "optim.lr=1e-4",  # the notebook's
        *args.override,
    ]
    return compose_train_config(overrides, work, ROOT / "conf")


class NotebookLoop:
    """The notebook's loop: decode every epoch, plain PyTorch, host reads of every batch's figures."""

    def __init__(self, args: argparse.Namespace, cfg, split: dict, work: Path) -> None:
        from torch.utils.data import DataLoader, Subset
        from torchvision import datasets, transforms

        from densenet_se.config import plain

        self.device = torch.device(args.device)
        size = args.image_size
        transform = transforms.Compose(
            [
                transforms.Resize((size, size)),
                transforms.ToTensor(),
                transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
            ]
        )
        root = Path(split["root"])
        dataset = datasets.ImageFolder(str(root), transform=transform)
        position = {Path(path).relative_to(root).as_posix(): i for i, (path, _) in enumerate(dataset.samples)}
        train = Subset(dataset, [position[rel] for rel, _ in split["train"]])
        val = Subset(dataset, [position[rel] for rel, _ in split["val"]])
        self.train_loader = DataLoader(train, batch_size=args.batch_size, shuffle=True, num_workers=0)
        self.val_loader = DataLoader(val, batch_size=args.batch_size, shuffle=False, num_workers=0)
        self.images = len(train) + len(val)
        model = plain(cfg.model)
        layout = {k: model[k] for k in ("growth_rate", "block_config", "num_init_features", "bn_size")}
        num_classes = len(dataset.classes)
        if args.baseline_model == "torchvision":
            from torchvision.models import DenseNet

            self.model = DenseNet(num_classes=num_classes, **layout)
        else:
            from densenet_se.models import DenseNetSE

            keys = ("compression_rate", "drop_rate", "se_reduction", "se_placement", "memory_efficient")
            self.model = DenseNetSE(num_classes, **layout, **{k: model[k] for k in keys})
        self.model.to(self.device)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-4)
        self.criterion = torch.nn.CrossEntropyLoss()
        self.best_path = work / "notebook_best.pth"
        self.best_acc = -1.0

    def epoch(self) -> float:
        """One training epoch and one evaluation, as the notebook ran them; returns wall seconds."""
        start = time.perf_counter()
        self.model.train()
        running_loss, correct, seen = 0.0, 0, 0
        for images, labels in self.train_loader:
            images, labels = images.to(self.device), labels.to(self.device)
            self.optimizer.zero_grad()
            outputs = self.model(images)
            loss = self.criterion(outputs, labels)
            loss.backward()
            self.optimizer.step()
            running_loss += loss.item() * images.size(0)
            correct += (outputs.argmax(1) == labels).sum().item()
            seen += images.size(0)
        self.model.eval()
        val_loss, val_correct, val_seen = 0.0, 0, 0
        with torch.no_grad():
            for images, labels in self.val_loader:
                images, labels = images.to(self.device), labels.to(self.device)
                outputs = self.model(images)
                val_loss += self.criterion(outputs, labels).item() * images.size(0)
                val_correct += (outputs.argmax(1) == labels).sum().item()
                val_seen += images.size(0)
        accuracy = val_correct / max(val_seen, 1)
        if accuracy > self.best_acc:
            self.best_acc = accuracy
            torch.save(self.model.state_dict(), self.best_path)
        sync(self.device)
        return time.perf_counter() - start


def build_trainer(args: argparse.Namespace, cfg, datamodule, callback):
    """The project's Trainer: as train.py builds it (--pipeline train) or stripped of all extras (lean)."""
    import lightning as L

    from densenet_se.callbacks import RunReport
    from densenet_se.train import build_trainer as app_trainer
    from densenet_se.train import hparams_for_logging, trainer_kwargs

    if args.pipeline == "train":
        run_dir = Path(cfg.paths.output_dir)
        trainer = app_trainer(cfg, run_dir, RunReport(run_dir, hparams=hparams_for_logging(cfg)))
        trainer.callbacks.insert(0, callback)  # first: its epoch-start hook runs before the others'
        return trainer
    kwargs = trainer_kwargs(cfg)
    kwargs.update(
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False
    )
    return L.Trainer(callbacks=[callback], **kwargs)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layout", choices=sorted(LAYOUTS), default="tiny", help="conf/model file")
    parser.add_argument("--image-size", type=int, default=64, help="training size S (Resize((S, S)))")
    parser.add_argument("--epochs", type=int, default=7)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--images-per-class", type=int, default=350, help="demo set size (the demo: 350)")
    parser.add_argument("--source-size", type=int, default=96, help="pixel size of the generated JPEGs")
    parser.add_argument("--pipeline", choices=("train", "lean"), default="train")
    parser.add_argument("--baseline-model", choices=("densenetse", "torchvision"), default="densenetse")
    parser.add_argument("--no-floor", action="store_true", help="skip the compute-floor loop")
    parser.add_argument("--data", help="use this ImageFolder tree instead of generating the demo set")
    parser.add_argument("override", nargs="*", help="extra Hydra overrides for the project side")
    args = parser.parse_args(argv)
    if args.epochs < 1:
        parser.error("--epochs must be at least 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import lightning as L

    from densenet_se.train import build_datamodule, build_module

    device = torch.device(args.device)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="compare_notebook_") as tmp:
        work = Path(tmp)
        if args.data:
            data_root = Path(args.data).resolve()
        else:
            from densenet_se.data.demo import make_demo_dataset

            data_root = make_demo_dataset(work / "demo", args.images_per_class, args.source_size, seed=0)
        cfg = compose(args, data_root, work)
        L.seed_everything(cfg.seed, verbose=False)

        start = time.perf_counter()
        datamodule = build_datamodule(cfg, Path(cfg.paths.output_dir))
        datamodule.prepare_data()
        datamodule.setup("fit")
        decode_seconds = time.perf_counter() - start
        module = build_module(cfg, datamodule)

        start = time.perf_counter()
        notebook = NotebookLoop(args, cfg, datamodule.split, work)
        setup_seconds = {"notebook": time.perf_counter() - start}
        loops: dict = {"notebook": notebook}
        if not args.no_floor:
            start = time.perf_counter()
            loops["floor"] = ComputeFloor(
                notebook.model, device, datamodule.train_dataloader(), datamodule.val_dataloader()
            )
            setup_seconds["floor"] = time.perf_counter() - start

        callback = interleaver(loops, device)
        trainer = build_trainer(args, cfg, datamodule, callback)
        callback.fit_start = time.perf_counter()
        trainer.fit(module, datamodule=datamodule)
        fit_end = time.perf_counter()
        images = len(datamodule.split["train"]) + len(datamodule.split["val"])
        counts = len(datamodule.split["train"]), len(datamodule.split["val"])

    before_first = callback.first_epoch_start - callback.fit_start  # sanity check, samples, model summary
    after_last = fit_end - callback.end  # curves.png, confusion matrix, metrics.json
    project_once = decode_seconds + before_first + after_last
    cache = cfg.data.cache
    rows = [
        (
            "notebook (ImageFolder, decode every epoch)",
            callback.others["notebook"],
            setup_seconds["notebook"],
        ),
        (f"project (cache={cache}, Lightning, {args.pipeline})", callback.project, project_once),
    ]
    if "floor" in loops:
        rows.insert(1, ("compute floor (same steps, tensors in memory)", callback.others["floor"], 0.0))

    threads = f" ({torch.get_num_threads()} threads)" if device.type == "cpu" else ""
    keys = ("growth_rate", "block_config", "num_init_features", "se_placement")
    layout = ", ".join(f"{k}={cfg.model[k]}" for k in keys)
    source = args.data or f"demo set {args.images_per_class}/class, {args.source_size} px JPEGs"
    counted = "epochs 2.." if args.epochs >= 3 else "all epochs"
    extras = "".join(
        f", {name}"
        for name, on in (("channels_last", cfg.model.channels_last), ("compile", cfg.model.compile))
        if on
    )
    print(
        f"{source} -> {args.image_size} px; layout {args.layout} ({layout}); batch {args.batch_size}; Adam; "
        f"device {args.device}{threads}; train {counts[0]} + val {counts[1]} images per epoch"
    )
    print(
        f"{args.epochs} epochs each, interleaved epoch by epoch; medians over {counted}; project: "
        f"--pipeline {args.pipeline}, data.cache={cache}, precision {cfg.trainer.precision}{extras}; "
        f"baseline model: {args.baseline_model}; load average {load_before[0]:.2f} before, "
        f"{os.getloadavg()[0]:.2f} after"
    )
    header = (
        f"{'loop':48} {'median s/epoch':>14} {'min s/epoch':>11} {'images/s':>9} {'one-time s':>10} "
        f"{'total s':>8}"
    )
    print(header)
    print("-" * len(header))
    medians = {}
    for name, times, once in rows:
        median, fastest = describe(times)
        medians[name.split()[0]] = median
        total = once + sum(times)
        print(f"{name:48} {median:14.3f} {fastest:11.3f} {images / median:9.1f} {once:10.2f} {total:8.2f}")
    for name, times, _ in rows:
        print(f"epochs (s) {name.split()[0]:9} {' '.join(f'{t:.3f}' for t in times)}")
    print(
        f"project one-time (s): decode into the cache {decode_seconds:.2f}, fit start to first epoch "
        f"{before_first:.2f}, last epoch to fit end {after_last:.2f}"
    )
    notebook_total = setup_seconds["notebook"] + sum(callback.others["notebook"])
    project_total = project_once + sum(callback.project)
    print(
        f"ratio notebook/project median epoch time: {medians['notebook'] / medians['project']:.2f}x "
        f"(whole run incl. one-time costs: {notebook_total / project_total:.2f}x)"
    )
    if "compute" in medians:
        print(
            f"bound notebook/floor: {medians['notebook'] / medians['compute']:.2f}x (no pipeline can beat it "
            f"with this network); project/floor: {medians['project'] / medians['compute']:.2f}x"
        )


if __name__ == "__main__":
    sys.exit(main())
