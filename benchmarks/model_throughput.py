"""Train-step throughput and peak memory: DenseNetSE vs torchvision's DenseNet, memory_efficient on vs off.

With --interleave steps (default) each of --repeats subprocesses builds every variant and they take turns
step by step, so load from other processes on a shared machine hits all of them alike; with --interleave runs
every (variant, repeat) gets its own fresh subprocess, round robin (then the RSS cross-check is per variant).
A train step is zero_grad + forward + cross-entropy + backward + Adam step on one fixed random batch.

Peak memory is measured on one extra, untimed step after the timed ones, as the peak of tensor bytes
allocated during forward + backward + optimizer step above what was live before it (weights, Adam state):
- cuda: ``torch.cuda.max_memory_allocated()`` minus ``memory_allocated()`` at the step's start.
- cpu: the same quantity from the allocation and free events that ``torch.profiler`` records with
  ``profile_memory=True`` (running sum, in time order, of every CPU allocation and free in the step). Exact
  for tensor memory; allocator slack and non-tensor buffers (oneDNN scratch pads) are not included.

Layouts: ``tiny`` and ``121`` are conf/model/densenet_tiny_se.yaml and densenet121_se.yaml; ``121-narrow``
is DenseNet-121's depth at 3/8 of its width (same per-layer structure and Python overhead, CPU-sized).

    python benchmarks/model_throughput.py --layout tiny --image-size 64 --batch-size 32 --device cpu
    python benchmarks/model_throughput.py --layout 121 --image-size 224 --batch-size 32 \\
        --variants none none_me
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYOUTS = {"tiny": "densenet_tiny_se", "121": "densenet121_se", "121-narrow": "densenet121_se"}
NARROW = {"growth_rate": 12, "num_init_features": 24}
VARIANTS = {
    "torchvision": "torchvision DenseNet",
    "none": "DenseNetSE se=none",
    "none_me": "DenseNetSE se=none memory_efficient",
    "head": "DenseNetSE se=head",
}
# Each variant's speed and memory are compared with this one.
REFERENCES = {"none": "torchvision", "head": "none", "none_me": "none"}


def layout(name: str) -> dict:
    """The network layout of conf/model/<file>.yaml (one source of truth with training), as plain values."""
    from omegaconf import OmegaConf

    from densenet_se.config import compose_train_config
    from densenet_se.models.densenet import DENSENET121_LAYOUT

    cfg = compose_train_config([f"model={LAYOUTS[name]}"], ROOT, ROOT / "conf")
    model = OmegaConf.to_container(cfg.model)
    chosen = {k: model[k] for k in DENSENET121_LAYOUT}  # the layout keys, with this file's values
    if name == "121-narrow":
        chosen.update(NARROW)
    chosen["se_reduction"] = model["se_reduction"]
    return chosen


def build(variant: str, spec: dict, num_classes: int):
    """The model for one variant; torchvision's class has no compression_rate (always 0.5) or SE."""
    if variant == "torchvision":
        from torchvision.models import DenseNet

        if spec["compression_rate"] != 0.5:
            raise ValueError("torchvision's DenseNet always compresses by 0.5")
        keys = ("growth_rate", "block_config", "num_init_features", "bn_size")
        return DenseNet(
            num_classes=num_classes, **{k: tuple(spec[k]) if k == "block_config" else spec[k] for k in keys}
        )
    from densenet_se.models import DenseNetSE

    placement = "head" if variant == "head" else "none"
    return DenseNetSE(num_classes, se_placement=placement, memory_efficient=variant == "none_me", **spec)


def cpu_step_peak(step) -> int:
    """Peak bytes of CPU tensor memory allocated by `step()` above the level at its start (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events = [e for e in events if e.device_type().name == "CPU"]
    level = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        level += event.nbytes()  # negative for frees
        peak = max(peak, level)
    return peak


def current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class Trainee:
    """One variant's model, optimizer and fixed batch, and its train step."""

    def __init__(self, variant: str, args: argparse.Namespace, spec: dict) -> None:
        import torch

        torch.manual_seed(0)
        self.device = torch.device(args.device)
        memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
        model = build(variant, spec, args.num_classes).to(self.device).train().to(memory_format=memory_format)
        self.forward = torch.compile(model) if args.compile else model
        self.optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)  # the project's optimizer
        size = (args.batch_size, 3, args.image_size, args.image_size)
        self.x = torch.randn(size, device=self.device).contiguous(memory_format=memory_format)
        self.y = torch.randint(0, args.num_classes, (args.batch_size,), device=self.device)
        self.dtype = {"fp32": None, "bf16": torch.bfloat16}[args.precision]
        self.times: list[float] = []
        self.first: float | None = None

    def sync(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def forward_backward_step(self) -> None:
        import torch
        import torch.nn.functional as F

        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None):
            logits = self.forward(self.x)
        F.cross_entropy(logits.float(), self.y).backward()
        self.optimizer.step()

    def timed_step(self, record: bool) -> None:
        start = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        self.forward_backward_step()
        self.sync()
        seconds = time.perf_counter() - start
        if self.first is None:
            self.first = seconds
        if record:
            self.times.append(seconds)

    def peak_bytes(self) -> int:
        """Peak tensor bytes of one step above its starting level (grads freed first, as in a loop)."""
        import torch

        self.optimizer.zero_grad(set_to_none=True)
        self.sync()
        if self.device.type != "cuda":
            return cpu_step_peak(self.forward_backward_step)
        torch.cuda.reset_peak_memory_stats(self.device)
        baseline = torch.cuda.memory_allocated(self.device)
        self.forward_backward_step()
        self.sync()
        return torch.cuda.max_memory_allocated(self.device) - baseline


def worker(args: argparse.Namespace) -> None:
    """Warm up, then time train steps of the given variants taking turns step by step; print JSON."""
    import torch

    spec = json.loads(args.spec)
    trainees = {v: Trainee(v, args, spec) for v in args.worker.split(",")}
    rss_before = current_rss()
    for trainee in trainees.values():
        for _ in range(args.warmup):
            trainee.timed_step(record=False)
    for _ in range(args.steps):
        for trainee in trainees.values():
            trainee.timed_step(record=True)
    peaks = {v: t.peak_bytes() for v, t in trainees.items()}
    # Cross-check on CPU: the process's peak resident size over all steps minus its size before them
    # (coarse: allocator slack, freed-but-kept pages and oneDNN buffers are in it; meaningful with one
    # variant per process, --interleave runs).
    rss_growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss_before  # Linux: KiB
    out = {
        v: {"times": t.times, "first": t.first, "peak_bytes": peaks[v], "rss_bytes": rss_growth}
        for v, t in trainees.items()
    }
    print(json.dumps({"variants": out, "threads": torch.get_num_threads()}))


def run_worker(variants: list[str], args: argparse.Namespace, spec: dict) -> dict:
    cmd = [sys.executable, __file__, "--worker", ",".join(variants), "--spec", json.dumps(spec)]
    for key in ("image_size", "batch_size", "steps", "warmup", "device", "num_classes", "precision"):
        cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    cmd += ["--channels-last"] * args.channels_last + ["--compile"] * args.compile
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.exit(f"error: worker {','.join(variants)} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layout", choices=list(LAYOUTS), default="tiny")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before timing")
    parser.add_argument("--repeats", type=int, default=3, help="worker processes per variant")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--num-classes", type=int, default=2)
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="bf16: autocast")
    parser.add_argument("--channels-last", action="store_true", help="NHWC weights and input")
    parser.add_argument(
        "--compile", action="store_true", help="torch.compile the model (first step compiles)"
    )
    parser.add_argument(
        "--interleave",
        choices=("steps", "runs"),
        default="steps",
        help="steps: all variants in each process, taking turns step by step (least noise); runs: one "
        "process per variant and run, round robin (clean RSS figures)",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.repeats < 1:
        parser.error("--steps and --repeats must be at least 1 and --warmup at least 0")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return

    spec = layout(args.layout)
    results: dict[str, dict] = {v: {"times": [], "peaks": [], "first": [], "rss": []} for v in args.variants}
    threads = None
    groups = [args.variants] if args.interleave == "steps" else [[v] for v in args.variants]
    for repeat in range(1, args.repeats + 1):
        for group in groups:
            done = run_worker(group, args, spec)
            threads = done["threads"]
            for variant, out in done["variants"].items():
                results[variant]["times"] += out["times"]
                results[variant]["peaks"].append(out["peak_bytes"])
                results[variant]["first"].append(out["first"])
                results[variant]["rss"].append(out["rss_bytes"])
                print(  # progress on stderr, so a run cut short still leaves figures
                    f"run {repeat}/{args.repeats} {VARIANTS[variant]}: median "
                    f"{statistics.median(out['times']):.4f} s/step, min {min(out['times']):.4f}, "
                    f"peak {out['peak_bytes'] / 2**20:.1f} MiB",
                    file=sys.stderr,
                    flush=True,
                )

    rows = {}
    for variant, r in results.items():
        step = statistics.median(r["times"])
        peak, rss = statistics.median(r["peaks"]) / 2**20, statistics.median(r["rss"]) / 2**20
        rows[variant] = (step, min(r["times"]), args.batch_size / step, peak, rss)
    memory_kind = (
        "peak allocated in one step (cuda)"
        if args.device.startswith("cuda")
        else ("peak tensor bytes in one step (torch.profiler)")
    )
    extras = "".join(
        f", {flag}" for flag, on in (("channels_last", args.channels_last), ("compile", args.compile)) if on
    )
    print(
        f"layout {args.layout} ({', '.join(f'{k}={v}' for k, v in spec.items() if k != 'se_reduction')}), "
        f"{args.image_size}x{args.image_size} px, batch {args.batch_size}, device {args.device}"
        f"{f' ({threads} threads)' if args.device == 'cpu' else ''}, {args.precision}{extras}, Adam; "
        f"median of {args.steps} steps x {args.repeats} runs (interleaved by {args.interleave[:-1]}) after "
        f"{args.warmup} warmup steps each; memory: {memory_kind}"
    )
    on_cpu = not args.device.startswith("cuda") and args.interleave == "runs"
    # min s/step is shown because on a shared machine it is the step least disturbed by other processes.
    header = (
        f"{'variant':38} {'s/step':>8} {'min s':>8} {'images/s':>9} {'MiB':>9} {'speed ratio':>24} "
        f"{'memory ratio':>12} {'time ratio':>10}" + (f" {'RSS MiB':>9}" if on_cpu else "")
    )
    print(header)
    print("-" * len(header))
    for variant, (step, fastest, ips, mib, rss) in rows.items():
        ref = REFERENCES.get(variant)
        if ref in rows:
            ratio = f"{ips / rows[ref][2]:.3f} vs {ref}"
            mem_ratio = f"{mib / rows[ref][3]:.3f}" if rows[ref][3] > 0 else "n/a"
            time_ratio = f"{step / rows[ref][0]:.3f}"
        else:
            ratio, mem_ratio, time_ratio = "", "", ""
        print(
            f"{VARIANTS[variant]:38} {step:8.4f} {fastest:8.4f} {ips:9.1f} {mib:9.1f} {ratio:>24} "
            f"{mem_ratio:>12} {time_ratio:>10}" + (f" {rss:9.1f}" if on_cpu else "")
        )
    if args.compile:
        first = {v: statistics.median(r["first"]) for v, r in results.items()}
        print(
            "first step incl. compile (s): " + ", ".join(f"{VARIANTS[v]} {t:.1f}" for v, t in first.items())
        )


if __name__ == "__main__":
    main()
