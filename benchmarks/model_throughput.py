"""Train-step throughput and peak memory: DenseNetSE vs torchvision's DenseNet, memory_efficient on vs off.

Every (variant, repeat) runs in a fresh subprocess so memory peaks do not leak between variants, and the
variants take turns (round robin) so load from other processes on a shared machine hits all of them alike.

Peak memory:
- cuda: ``torch.cuda.max_memory_allocated()`` minus what was allocated before the first step (model,
  optimizer, batch): the tensors a training step needs on top of the weights, exactly.
- cpu: peak resident set size (``ru_maxrss``) minus the RSS before the first step. Honest but coarse: it
  includes allocator slack and freed-but-not-returned pages, so compare variants only with each other.

    python benchmarks/model_throughput.py --layout tiny --image-size 64 --batch-size 32 --device cpu
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

LAYOUTS = {
    # DenseNet-121's depth at 3/8 of its width: same per-layer structure and Python overhead, CPU-sized.
    "tiny": {"growth_rate": 12, "block_config": (6, 12, 24, 16), "num_init_features": 24, "bn_size": 4},
    "121": {"growth_rate": 32, "block_config": (6, 12, 24, 16), "num_init_features": 64, "bn_size": 4},
}
VARIANTS = {
    "torchvision": "torchvision DenseNet",
    "none": "DenseNetSE se=none",
    "none_me": "DenseNetSE se=none memory_efficient",
    "head": "DenseNetSE se=head",
}


def build(variant: str, layout: dict, num_classes: int):
    """The model for one variant; torchvision's class has no compression_rate (always 0.5, our default)."""
    if variant == "torchvision":
        from torchvision.models import DenseNet

        return DenseNet(num_classes=num_classes, **layout)
    from densenet_se.models import DenseNetSE

    placement = "head" if variant == "head" else "none"
    return DenseNetSE(num_classes, se_placement=placement, memory_efficient=variant == "none_me", **layout)


def current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker(args: argparse.Namespace) -> None:
    """Time ``args.steps`` train steps of one variant after ``args.warmup`` untimed ones; print JSON."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    device = torch.device(args.device)
    model = build(args.worker, LAYOUTS[args.layout], args.num_classes).to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)  # the project's optimizer
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
    y = torch.randint(0, args.num_classes, (args.batch_size,), device=device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device)
    else:
        baseline = current_rss()
    times = []
    for step in range(args.warmup + args.steps):
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        sync()
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) - baseline
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline  # Linux: KiB
    print(json.dumps({"times": times, "peak_bytes": peak, "threads": torch.get_num_threads()}))


def run_worker(variant: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--worker", variant]
    for key in ("layout", "image_size", "batch_size", "steps", "warmup", "device", "num_classes"):
        cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.exit(f"error: worker {variant} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layout", choices=sorted(LAYOUTS), default="tiny")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before timing")
    parser.add_argument("--repeats", type=int, default=3, help="runs per variant, round robin")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--num-classes", type=int, default=2)
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--worker", choices=list(VARIANTS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return

    results: dict[str, dict] = {v: {"times": [], "peaks": []} for v in args.variants}
    threads = None
    for repeat in range(1, args.repeats + 1):
        for variant in args.variants:
            out = run_worker(variant, args)
            results[variant]["times"] += out["times"]
            results[variant]["peaks"].append(out["peak_bytes"])
            threads = out["threads"]
            print(  # progress on stderr, so a run cut short still leaves figures
                f"run {repeat}/{args.repeats} {VARIANTS[variant]}: median {statistics.median(out['times']):.4f} "
                f"s/step, min {min(out['times']):.4f}, peak {out['peak_bytes'] / 2**20:.1f} MiB",
                file=sys.stderr,
                flush=True,
            )

    rows = {}
    for variant, r in results.items():
        step = statistics.median(r["times"])
        rows[variant] = (step, min(r["times"]), args.batch_size / step, statistics.median(r["peaks"]) / 2**20)
    memory_kind = "peak allocated growth" if args.device.startswith("cuda") else "peak RSS growth"
    layout = LAYOUTS[args.layout]
    print(
        f"layout {args.layout} ({', '.join(f'{k}={v}' for k, v in layout.items())}), "
        f"{args.image_size}x{args.image_size} px, batch {args.batch_size}, device {args.device}"
        f"{f' ({threads} threads)' if args.device == 'cpu' else ''}, Adam; median of "
        f"{args.steps} steps x {args.repeats} runs after {args.warmup} warmup steps each; memory: {memory_kind}"
    )
    # min s/step is shown because on a shared machine it is the step least disturbed by other processes.
    header = (
        f"{'variant':38} {'s/step':>8} {'min s':>8} {'images/s':>9} {'MiB':>9} {'speed ratio':>24} "
        f"{'memory ratio':>12}"
    )
    print(header)
    print("-" * len(header))
    references = {"none": "torchvision", "head": "none", "none_me": "none"}
    for variant, (step, fastest, ips, mib) in rows.items():
        ref = references.get(variant)
        if ref in rows:
            ratio = f"{ips / rows[ref][2]:.3f} vs {ref}"
            mem_ratio = f"{mib / rows[ref][3]:.3f}" if rows[ref][3] > 0 else "n/a"
        else:
            ratio, mem_ratio = "", ""
        print(
            f"{VARIANTS[variant]:38} {step:8.4f} {fastest:8.4f} {ips:9.1f} {mib:9.1f} {ratio:>24} {mem_ratio:>12}"
        )


if __name__ == "__main__":
    main()
