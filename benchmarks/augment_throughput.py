"""Training augmentation speed: the batched policies (densenet_se.data.augment) vs a per-image v2 loop.

The loop is what the project ran before: one torchvision.transforms.v2 Compose per image (RandomResizedCrop,
flips, reflection pad + RandomRotation + CenterCrop, ColorJitter, RandAugment/TrivialAugmentWide), called
image by image so that each image gets its own draw. Both sides get the same float batch in 0..1 and the
same augment.* keys, read from conf/augment/<policy>.yaml. In each repeat the two take turns (the order
alternates), after one untimed warm-up each; the table gives medians and minima in ms per batch, and the
ratio of the medians (loop / batched: above 1, the batched policy is faster).

    OMP_NUM_THREADS=1 python benchmarks/augment_throughput.py --sizes 64 224 --batches 32 256 --repeats 7
    python benchmarks/augment_throughput.py --device cuda --sizes 224 --batches 256
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from densenet_se.data.augment import IMAGE_KEYS, image_augment  # noqa: E402


def policy_settings(name: str) -> dict:
    """The image keys of conf/augment/<name>.yaml (on top of none.yaml, as Hydra composes them)."""
    conf = ROOT / "conf" / "augment"
    merged = OmegaConf.merge(OmegaConf.load(conf / "none.yaml"), OmegaConf.load(conf / f"{name}.yaml"))
    return {k: merged[k] for k in IMAGE_KEYS}


def per_image_transform(size: int, settings: dict) -> Callable[[torch.Tensor], torch.Tensor]:
    """The per-image v2 pipeline the project used before, for the same keys (one image [3,S,S] per call)."""
    from torchvision.transforms import v2

    s = settings
    bilinear = v2.InterpolationMode.BILINEAR
    ops: list[Callable] = []
    if s["crop_scale_min"] < 1.0:
        ops.append(v2.RandomResizedCrop(size, scale=(s["crop_scale_min"], 1.0), antialias=True))
    if s["hflip"] > 0:
        ops.append(v2.RandomHorizontalFlip(s["hflip"]))
    if s["vflip"] > 0:
        ops.append(v2.RandomVerticalFlip(s["vflip"]))
    if s["rotation"] > 0:
        worst = math.radians(min(s["rotation"], 45.0))
        pad = math.ceil(size * (math.cos(worst) + math.sin(worst) - 1.0) / 2.0) + 1
        ops += [
            v2.Pad(pad, padding_mode="reflect"),
            v2.RandomRotation(s["rotation"], interpolation=bilinear),
            v2.CenterCrop(size),
        ]
    if s["brightness"] or s["contrast"] or s["saturation"] or s["hue"]:
        ops.append(v2.ColorJitter(s["brightness"], s["contrast"], s["saturation"], s["hue"]))
    if s["auto"] == "randaugment":
        ops.append(v2.RandAugment(s["num_ops"], s["magnitude"], s["magnitude_bins"], interpolation=bilinear))
    elif s["auto"] == "trivialaugment":
        ops.append(v2.TrivialAugmentWide(s["magnitude_bins"], interpolation=bilinear))
    return v2.Compose(ops)


def timings(
    variants: dict[str, Callable[[], object]], repeats: int, device: torch.device
) -> dict[str, list[float]]:
    """Seconds per call of each variant, `repeats` times, taking turns (order alternating), after a warm-up."""

    def timed(fn: Callable[[], object]) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    for fn in variants.values():
        timed(fn)
    out: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            out[name].append(timed(variants[name]))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 224], help="image sides in pixels")
    parser.add_argument("--batches", type=int, nargs="+", default=[32, 256], help="batch sizes")
    parser.add_argument("--policies", nargs="+", default=["light", "strong"], help="conf/augment/ presets")
    parser.add_argument("--repeats", type=int, default=7, help="timed calls per variant and row")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    threads = os.environ.get("OMP_NUM_THREADS", "unset")
    print(
        f"device {device}, torch threads {torch.get_num_threads()} (OMP_NUM_THREADS={threads}), "
        f"{args.repeats} repeats, load average {os.getloadavg()[0]:.2f} before"
    )
    header = (
        f"{'policy':<8} {'size':>5} {'batch':>6} {'batched ms':>11} {'(min)':>9} "
        f"{'loop ms':>10} {'(min)':>9} {'loop/batched':>13}"
    )
    print(header)
    print("-" * len(header))
    for size in args.sizes:
        for batch in args.batches:
            generator = torch.Generator().manual_seed(args.seed)
            images = torch.rand(batch, 3, size, size, generator=generator).to(device)
            for name in args.policies:
                settings = policy_settings(name)
                batched = image_augment(**settings)
                one = per_image_transform(size, settings)
                variants = {
                    "batched": lambda b=batched, x=images: b(x.clone()),
                    "loop": lambda t=one, x=images: torch.stack([t(image) for image in x]).clamp_(0.0, 1.0),
                }
                times = timings(variants, args.repeats, device)
                med = {k: statistics.median(v) for k, v in times.items()}
                print(
                    f"{name:<8} {size:>5} {batch:>6} {med['batched'] * 1e3:>11.2f} "
                    f"{min(times['batched']) * 1e3:>9.2f} {med['loop'] * 1e3:>10.2f} "
                    f"{min(times['loop']) * 1e3:>9.2f} {med['loop'] / med['batched']:>12.2f}x",
                    flush=True,
                )
    print(f"load average {os.getloadavg()[0]:.2f} after")


if __name__ == "__main__":
    main()
