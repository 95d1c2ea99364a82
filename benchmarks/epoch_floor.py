"""A training epoch with train.py's defaults against the network's compute floor, side by side in one run.

- floor: the same network's train and eval steps on batches already normalised in memory, nothing else
  (no Lightning, no data loading, no metrics, no logging, no checkpoints).
- project: a real `lightning.Trainer` built by `densenet_se.train.build_trainer` from conf/train.yaml with
  `experiment=demo`, i.e. every default: checkpoints (best + last), TensorBoard, the run reports, the LR
  monitor, the model summary, the NaN guard and per-epoch seeding. Progress bar off (the default when the
  output is not a terminal).

The two take turns epoch by epoch (floor epoch, project epoch, ...). A project epoch runs from the end of a
floor epoch to the start of the next one: training, validation, checkpoints, reports, logging. Checkpoint
writes that run in a background thread are waited for (untimed) before the next floor epoch, so they never
slow the floor down, and the CPU time they used is added to the project epoch that wrote them. The first
epoch of each is a warm-up and left out of the medians when there are 3 or more.

After the timed epochs, --profile-epochs more project epochs run with Lightning's SimpleProfiler swapped
in: seconds per epoch of every hook and loop action, which names where the project's time beyond the floor
goes.

    python benchmarks/epoch_floor.py --layout tiny --image-size 64 --epochs 7
    python benchmarks/epoch_floor.py --layout 121 --image-size 224 --images-per-class 20 --batch-size 16 \\
        --epochs 4 --profile-epochs 1
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import (  # noqa: E402
    LAYOUTS,
    ComputeFloor,
    HookProfile,
    compose,
    describe,
    interleaver,
    load_average,
)

TARGET_RATIO = 1.03


class CheckpointWrites:
    """Records every checkpoint file write (thread, wall s, thread CPU s) and waits for background ones."""

    def __init__(self, trainer) -> None:
        self.io = trainer.strategy.checkpoint_io
        self.writes: list[tuple[bool, float, float]] = []  # (in the background, wall s, CPU s)
        self.per_epoch: list[list[tuple[bool, float, float]]] = []
        base = getattr(self.io, "checkpoint_io", None) or self.io  # the writer inside an async wrapper
        real_save = base.save_checkpoint
        main = threading.main_thread()

        def timed_save(*args, **kwargs):
            wall, cpu = time.perf_counter(), time.thread_time()
            try:
                return real_save(*args, **kwargs)
            finally:
                background = threading.current_thread() is not main
                self.writes.append((background, time.perf_counter() - wall, time.thread_time() - cpu))

        base.save_checkpoint = timed_save

    def settle(self) -> float:
        """Wait for background writes (untimed); return the CPU seconds they used since the last call."""
        wait = getattr(self.io, "wait", None)
        if wait is not None:
            wait()
        done, self.writes = self.writes, []
        self.per_epoch.append(done)
        return sum(cpu for background, _, cpu in done if background)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layout", choices=sorted(LAYOUTS), default="tiny", help="conf/model file")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=7, help="timed epochs of each loop")
    parser.add_argument("--profile-epochs", type=int, default=2, help="profiled project epochs afterwards")
    parser.add_argument("--images-per-class", type=int, default=350, help="demo set size (the demo: 350)")
    parser.add_argument("--source-size", type=int, default=96, help="pixel size of the generated JPEGs")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("override", nargs="*", help="extra Hydra overrides for the project side")
    args = parser.parse_args(argv)
    if args.epochs < 1 or args.profile_epochs < 0:
        parser.error("--epochs must be at least 1 and --profile-epochs at least 0")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import lightning as L

    from densenet_se.callbacks import RunReport
    from densenet_se.data.demo import make_demo_dataset
    from densenet_se.train import build_datamodule, build_module, build_trainer, hparams_for_logging

    device = torch.device(args.device)
    load_before = load_average()
    with tempfile.TemporaryDirectory(prefix="epoch_floor_") as tmp:
        work = Path(tmp)
        data_root = make_demo_dataset(work / "demo", args.images_per_class, args.source_size, seed=0)
        cfg = compose(
            [
                "experiment=demo",
                f"model={LAYOUTS[args.layout]}",
                f"trainer.accelerator={'gpu' if device.type == 'cuda' else 'cpu'}",
                f"data.root={data_root}",
                "data.demo=false",
                f"data.image_size={args.image_size}",
                f"data.batch_size={args.batch_size}",
                f"trainer.max_epochs={args.epochs + args.profile_epochs}",
                "trainer.enable_progress_bar=false",
                "print_config=false",
                *args.override,
            ],
            work,
        )
        L.seed_everything(cfg.seed, verbose=False)
        run_dir = Path(cfg.paths.output_dir)
        datamodule = build_datamodule(cfg, run_dir)
        datamodule.prepare_data()
        datamodule.setup("fit")
        module = build_module(cfg, datamodule)
        floor = ComputeFloor(module.model, device, datamodule.train_dataloader(), datamodule.val_dataloader())
        report = RunReport(run_dir, hparams=hparams_for_logging(cfg), extra=datamodule.split_report)
        trainer = build_trainer(cfg, run_dir, report)
        writes = CheckpointWrites(trainer)
        charged: list[float] = []
        callback = interleaver({"floor": floor}, device, between=lambda: charged.append(writes.settle()))
        callback.stop_after = args.epochs
        profile = HookProfile()

        class Profiled(L.Callback):
            def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
                if trainer.current_epoch >= args.epochs:
                    profile.stop(trainer)
                    profile.start(trainer)

            def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
                profile.stop(trainer)

        # First, so the epoch is timed from before every other callback's epoch-start hook.
        trainer.callbacks[0:0] = [callback, Profiled()]
        trainer.fit(module, datamodule=datamodule)
        counts = len(datamodule.split["train"]), len(datamodule.split["val"])

    # charged[k] belongs to the project epoch that ended just before it was taken (charged[0]: the sanity
    # check and fit start, before any project epoch).
    background = charged[1:][: len(callback.project)]
    project = [t + cpu for t, cpu in zip(callback.project, background, strict=True)]
    floor_times = callback.others["floor"]
    threads = f" ({torch.get_num_threads()} threads)" if device.type == "cpu" else ""
    keys = ("growth_rate", "block_config", "num_init_features", "se_placement")
    layout = ", ".join(f"{k}={cfg.model[k]}" for k in keys)
    print(
        f"demo set {args.images_per_class}/class at {args.source_size} px -> {args.image_size} px; layout "
        f"{args.layout} ({layout}); batch {args.batch_size}; device {args.device}{threads}; train {counts[0]}"
        f" + val {counts[1]} images per epoch; load average {load_before:.2f} before, "
        f"{load_average():.2f} after"
    )
    counted = "epochs 2.." if args.epochs >= 3 else "all epochs"
    print(
        f"{args.epochs} epochs each, interleaved epoch by epoch; medians over {counted}; wall s (the target) "
        "and the process's CPU s (all threads; robust to other load on the machine)"
    )
    header = f"{'loop':46} {'wall s':>7} {'min s':>7} {'CPU s':>7} {'images/s':>9}"
    print(header)
    print("-" * len(header))
    images = sum(counts)
    medians, cpus = {}, {}
    for name, times, cpu in (
        ("floor (same steps, tensors in memory)", floor_times, callback.others_cpu["floor"]),
        ("project (train.py defaults, experiment=demo)", project, callback.project_cpu),
    ):
        median, fastest = describe(times)
        key = name.split()[0]
        medians[key], cpus[key] = median, describe(cpu)[0]
        print(f"{name:46} {median:7.3f} {fastest:7.3f} {cpus[key]:7.3f} {images / median:9.1f}")
    ratio = medians["project"] / medians["floor"]
    verdict = "met" if ratio <= TARGET_RATIO else "NOT met"
    print(
        f"ratio project/floor: {ratio:.3f}x wall (target <= {TARGET_RATIO}x: {verdict}); "
        f"{cpus['project'] / cpus['floor']:.3f}x CPU"
    )
    print(
        f"overhead per epoch: {medians['project'] - medians['floor']:+.3f} s wall, "
        f"{cpus['project'] - cpus['floor']:+.3f} s CPU"
    )
    print(f"epochs (s) floor   {' '.join(f'{t:.3f}' for t in floor_times)}")
    print(f"epochs (s) project {' '.join(f'{t:.3f}' for t in project)}")
    print(f"epochs (CPU s) floor   {' '.join(f'{t:.3f}' for t in callback.others_cpu['floor'])}")
    print(f"epochs (CPU s) project {' '.join(f'{t:.3f}' for t in callback.project_cpu)}")
    timed = writes.per_epoch[1 : args.epochs + 1]
    if any(timed):
        per = [(len(w), sum(x[1] for x in w), sum(x[2] for x in w), any(x[0] for x in w)) for w in timed]
        where = "a background thread" if any(p[3] for p in per) else "the training thread"
        print(
            f"checkpoint writes per epoch (in {where}): "
            + ", ".join(f"{n} files {wall:.3f} s wall {cpu:.3f} s CPU" for n, wall, cpu, _ in per)
        )
    if profile.epochs:
        print(
            f"profile of {profile.epochs} more project epoch(s), seconds per epoch (Lightning's action names; "
            "the step actions hold the network's compute, which the floor has too):"
        )
        for action, seconds, calls in profile.rows():
            print(f"  {action:92} {seconds:8.4f} s {calls:5d} calls")
        callbacks = [r for r in profile.rows(top=10_000) if r[0].startswith("[Callback]")]
        print(f"  all callback hooks together: {sum(r[1] for r in callbacks):.4f} s per epoch")


if __name__ == "__main__":
    sys.exit(main())
