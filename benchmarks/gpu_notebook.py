"""The GPU targets in one command: training images/s at the notebook's layout, whether the GPU ever waits
for data, host syncs per step, the wall time of the whole 20-epoch notebook experiment (`python train.py
experiment=notebook trainer=gpu`), and the notebook's own loop on the same GPU for the ratio.

1. Data: a synthetic demo set of --images JPEGs (half per class) at --source-size px, generated in parallel
   into a temp dir (not timed).
2. Throughput: the project's module (the notebook layout: DenseNet-121 + SE head) in a lightning Trainer
   with the trainer=gpu preset (bf16-mixed, channels_last, cuDNN benchmark, uint8 cache on the GPU) at
   --batch-size (256), no validation; images/s over the timed epochs after --warmup-epochs.
   model.compile=true by default (--no-compile for eager).
3. Data waits: during the timed epochs, the host seconds per step spent getting the next batch (Lightning's
   `train_dataloader_next`, the transfer and normalisation hooks); then one more epoch under
   ``torch.profiler`` for --busy-steps steps: the share of that window in which a CUDA kernel runs (the
   union of the kernel intervals over the window). The GPU never waits for data when that is >= 95 %.
4. Sync audit: two more epochs under ``torch.cuda.set_sync_debug_mode("warn")``; every synchronizing CUDA
   call is counted by its Python call site (per-epoch ones such as the epoch-end metric compute included).
5. Experiment: `python train.py experiment=notebook trainer=gpu data.root=<the set>` as a subprocess with a
   cold image cache; its wall time from start to exit (start-up, decode, 20 epochs, reports, checkpoints).
6. The notebook's loop (benchmarks/compare_notebook.py: ImageFolder decoding every epoch, fp32, batch 32) on
   the same GPU and data for --notebook-epochs epochs; its 20-epoch time (measured, or scaled from the
   epochs measured, as the row says) against the experiment's wall time.

    python benchmarks/gpu_notebook.py                 # on a machine with a CUDA GPU (about 5 minutes)
    python benchmarks/gpu_notebook.py --no-compile    # eager

--device cpu runs the same code at whatever size you give (a smoke test; the targets are GPU ones).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import ROOT, HookProfile, compose, make_data  # noqa: E402

TARGET_IMAGES_PER_S = 4000.0
TARGET_EXPERIMENT_S = 30.0
TARGET_GPU_BUSY = 0.95


def kernel_busy_share(trace: Path) -> float:
    """The share of the window from the first CUDA kernel's start to the last one's end in which a kernel
    runs (a chrome trace of torch.profiler); gaps are the GPU waiting for the host."""
    events = json.loads(trace.read_text()).get("traceEvents", [])
    spans = sorted(
        (float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0)))
        for e in events
        if e.get("cat") == "kernel" and "ts" in e
    )
    if not spans:
        return float("nan")
    busy, end = 0.0, spans[0][0]
    for start, stop in spans:
        if stop > end:
            busy += stop - max(start, end)
            end = stop
    return busy / max(spans[-1][1] - spans[0][0], 1e-9)


def throughput(args: argparse.Namespace, data_root: Path, work: Path) -> dict:
    """Training images/s of the project's module and Trainer, and the synchronizing calls in two epochs."""
    import lightning as L
    import torch

    from densenet_se.train import build_datamodule, build_module, trainer_kwargs

    device = torch.device(args.device)
    timed_epochs = args.warmup_epochs + args.epochs
    audit = device.type == "cuda"
    extra = 3 if audit else 0  # one profiled epoch, two audited ones
    cfg = compose(
        [
            "experiment=notebook",
            f"trainer={'gpu' if audit else 'cpu'}",
            f"data.root={data_root}",
            f"data.image_size={args.image_size}",
            f"data.batch_size={args.batch_size}",
            f"model.compile={str(args.compile).lower()}",
            f"trainer.max_epochs={timed_epochs + extra}",
            "trainer.limit_val_batches=0",
            "trainer.num_sanity_val_steps=0",
            "trainer.enable_progress_bar=false",
            *args.override,
        ],
        work,
    )
    L.seed_everything(cfg.seed, verbose=False)
    datamodule = build_datamodule(cfg, None)
    datamodule.setup("fit")
    module = build_module(cfg, datamodule)

    def sync() -> None:
        if audit:
            torch.cuda.synchronize(device)

    profile = HookProfile()
    trace = work / "busy_trace.json"

    class Timer(L.Callback):
        def __init__(self) -> None:
            self.seconds: list[float] = []
            self.images: list[int] = []
            self.audit_steps = 0
            self._start = 0.0
            self._profiler = None

        def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            self.images.append(0)
            epoch = trainer.current_epoch
            profile.stop(trainer)
            if epoch >= timed_epochs:
                if epoch == timed_epochs + 1:
                    torch.cuda.set_sync_debug_mode("warn")
                return
            if epoch >= args.warmup_epochs:
                profile.start(trainer)
            sync()
            self._start = time.perf_counter()

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if trainer.current_epoch == timed_epochs and audit and batch_idx == 2:
                from torch.profiler import ProfilerActivity
                from torch.profiler import profile as torch_profile

                self._profiler = torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
                self._profiler.__enter__()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.images[-1] += int(batch[1].shape[0])  # a shape, not a value: no device read
            if trainer.current_epoch > timed_epochs:
                self.audit_steps += 1
            if self._profiler is not None and batch_idx == 2 + args.busy_steps:
                self._stop_profiler()

        def _stop_profiler(self) -> None:
            sync()
            self._profiler.__exit__(None, None, None)
            self._profiler.export_chrome_trace(str(trace))
            self._profiler = None

        def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            if self._profiler is not None:  # an epoch shorter than --busy-steps
                self._stop_profiler()
            if trainer.current_epoch < timed_epochs:
                sync()
                self.seconds.append(time.perf_counter() - self._start)

        def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            profile.stop(trainer)
            if audit:
                torch.cuda.set_sync_debug_mode(0)

    timer = Timer()
    kwargs = trainer_kwargs(cfg)
    kwargs.update(logger=False, enable_checkpointing=False, enable_model_summary=False)
    trainer = L.Trainer(callbacks=[timer], **kwargs)
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, datamodule=datamodule)
    fit_seconds = time.perf_counter() - start
    syncs = Counter(
        f"{Path(w.filename).name}:{w.lineno}" for w in caught if "synchroniz" in str(w.message).lower()
    )
    per_epoch = [n / s for n, s in zip(timer.images, timer.seconds, strict=False)][args.warmup_epochs :]
    steps = max(round(len(datamodule.train_dataloader()) * args.epochs), 1)
    fetch = sum(
        sum(seconds)
        for action, seconds in profile.durations.items()
        if "train_dataloader_next" in action or "batch_transfer" in action or "batch_to_device" in action
    )
    return {
        "fetch_ms_per_step": 1000 * fetch / steps,
        "busy": kernel_busy_share(trace) if trace.exists() else None,
        "images_per_s": statistics.median(per_epoch),
        "epoch_images": timer.images[0],
        "epoch_seconds": timer.seconds[args.warmup_epochs :],
        "first_epoch_s": timer.seconds[0],
        "fit_seconds": fit_seconds,
        "syncs": syncs,
        "audit_steps": timer.audit_steps if audit else None,
        "precision": cfg.trainer.precision,
        "cache": cfg.data.cache,
        "channels_last": cfg.model.channels_last,
        "layout": ", ".join(f"{k}={cfg.model[k]}" for k in ("growth_rate", "block_config", "se_placement")),
    }


def experiment(args: argparse.Namespace, data_root: Path, work: Path) -> dict:
    """Wall time of `python train.py experiment=notebook trainer=gpu` on the set, with a cold image cache."""
    run_dir = work / "experiment"
    cmd = [
        sys.executable,
        str(ROOT / "train.py"),
        "experiment=notebook",
        f"trainer={'gpu' if args.device.startswith('cuda') else 'cpu'}",
        f"data.root={data_root}",
        f"data.image_size={args.image_size}",
        f"trainer.max_epochs={args.experiment_epochs}",
        f"model.compile={str(args.compile).lower()}",
        f"paths.cache_dir={work / 'experiment_cache'}",
        f"hydra.run.dir={run_dir}",
        *args.override,
    ]
    env = dict(os.environ, PYTHONUNBUFFERED="1", MPLBACKEND="Agg")
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"error: the experiment failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    epochs = metrics.get("epochs", [])
    return {
        "wall": wall,
        "command": " ".join(cmd[1:]),
        "epochs": len(epochs),
        "epoch_seconds": [row["seconds"] for row in epochs],
        "best_val_acc": metrics.get("best_val_acc"),
        "total_seconds": metrics.get("total_seconds"),
    }


def notebook(args: argparse.Namespace, data_root: Path, work: Path) -> dict | None:
    """Seconds per epoch of the notebook's own loop (compare_notebook.NotebookLoop) on the device and data."""
    if args.notebook_epochs < 1:
        return None
    from compare_notebook import NotebookLoop

    from densenet_se.train import build_datamodule

    overrides = ["experiment=notebook", f"data.root={data_root}", f"data.image_size={args.image_size}"]
    cfg = compose([*overrides, "data.cache=none", *args.override], work / "notebook")
    datamodule = build_datamodule(cfg, None)
    datamodule.setup("fit")  # the same 80/20 split as the experiment
    spec = argparse.Namespace(
        device=args.device, image_size=args.image_size, batch_size=32, baseline_model="densenetse"
    )
    loop = NotebookLoop(spec, cfg, datamodule.split, work)
    seconds = [loop.epoch() for _ in range(args.notebook_epochs)]
    return {"epochs": seconds, "twenty": sum(seconds) * args.experiment_epochs / len(seconds)}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N, or cpu for a smoke test")
    parser.add_argument("--images", type=int, default=2142, help="demo images (the notebook's data: 2,142)")
    parser.add_argument("--source-size", type=int, default=224, help="pixel size of the generated JPEGs")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=256, help="for the throughput part")
    parser.add_argument("--warmup-epochs", type=int, default=2, help="untimed epochs (cuDNN autotuning)")
    parser.add_argument("--epochs", type=int, default=5, help="timed epochs of the throughput part")
    parser.add_argument("--experiment-epochs", type=int, default=20, help="the notebook: 20")
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="model.compile=true in both parts (the target is a compiled one; --no-compile for eager)",
    )
    parser.add_argument("--busy-steps", type=int, default=20, help="steps profiled for the GPU busy share")
    parser.add_argument(
        "--notebook-epochs", type=int, default=3, help="epochs of the notebook's loop (0: skip)"
    )
    parser.add_argument("--skip-experiment", action="store_true")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes making the data")
    parser.add_argument("override", nargs="*", help="extra Hydra overrides for both parts")
    args = parser.parse_args(argv)
    if args.epochs < 1 or args.warmup_epochs < 0 or args.images < 4:
        parser.error("--epochs must be >= 1, --warmup-epochs >= 0 and --images >= 4")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit(
            "error: no CUDA device is visible; run this on a GPU machine, or pass --device cpu for a "
            "smoke test."
        )
    name = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "cpu"
    with tempfile.TemporaryDirectory(prefix="gpu_notebook_") as tmp:
        work = Path(tmp)
        start = time.perf_counter()
        data_root = make_data(work / "data" / "demo", args.images, args.source_size, args.workers)
        data_seconds = time.perf_counter() - start
        result = throughput(args, data_root, work)
        exp = None if args.skip_experiment else experiment(args, data_root, work)
        nb = notebook(args, data_root, work)

    print(
        f"device {name}; torch {torch.__version__}; {args.images} demo images at {args.source_size} px "
        f"(made in {data_seconds:.1f} s, not counted) -> {args.image_size} px; "
        f"experiment=notebook ({result['layout']}); "
        f"precision {result['precision']}, data.cache={result['cache']}"
        f"{', channels_last' if result['channels_last'] else ''}{', compile' if args.compile else ''}"
    )
    header = f"{'measure':58} {'value':>12} {'target':>12}  verdict"
    print(header)
    print("-" * len(header))

    def row(label: str, value: str, target: str, met: bool) -> None:
        print(f"{label:58} {value:>12} {target:>12}  {'met' if met else 'NOT met'}")

    ips = result["images_per_s"]
    label = f"train images/s, batch {args.batch_size} (median of {args.epochs} epochs)"
    row(label, f"{ips:.1f}", f">= {TARGET_IMAGES_PER_S:g}", ips >= TARGET_IMAGES_PER_S)
    if result["busy"] is not None:
        busy = result["busy"]
        label = f"GPU busy share over {args.busy_steps} steps (kernels / window)"
        row(label, f"{busy:.1%}", f">= {TARGET_GPU_BUSY:.0%}", busy >= TARGET_GPU_BUSY)
    print(f"{'host time getting the next batch, ms per step':58} {result['fetch_ms_per_step']:12.3f}")
    if result["audit_steps"] is not None:
        total, steps = sum(result["syncs"].values()), result["audit_steps"]
        row(
            f"synchronizing CUDA calls in 2 epochs ({steps} steps)", str(total), "< 1 per step", total < steps
        )
    if exp is not None:
        label = f"notebook experiment, {exp['epochs']} epochs, wall s (cold cache)"
        row(label, f"{exp['wall']:.1f}", f"<= {TARGET_EXPERIMENT_S:g}", exp["wall"] <= TARGET_EXPERIMENT_S)
    if nb is not None:
        how = (
            "measured" if len(nb["epochs"]) == args.experiment_epochs else f"from {len(nb['epochs'])} epochs"
        )
        label = f"notebook's own loop, {args.experiment_epochs} epochs, s ({how})"
        print(f"{label:58} {nb['twenty']:12.1f}")
        if exp is not None:
            print(
                f"{'ratio notebook loop / project experiment (wall)':58} {nb['twenty'] / exp['wall']:11.2f}x"
            )
    print(
        f"throughput epochs (s, {result['epoch_images']} images each): "
        + " ".join(f"{s:.3f}" for s in result["epoch_seconds"])
        + f"; first epoch {result['first_epoch_s']:.2f} s"
    )
    for site, count in result["syncs"].most_common(8):
        print(f"sync site {site}: {count}")
    if exp is not None:
        print(f"experiment: {exp['command']}")
        print(
            f"experiment epochs (s): {' '.join(f'{s:.2f}' for s in exp['epoch_seconds'])}; sum of epochs "
            f"{exp['total_seconds']} s; best val/acc {exp['best_val_acc']}"
        )
    if nb is not None:
        print(f"notebook loop epochs (s): {' '.join(f'{s:.2f}' for s in nb['epochs'])}")


if __name__ == "__main__":
    main()
