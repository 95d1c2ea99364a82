"""What `model.compile=true` costs and buys on this machine: cold compile, warm compile, epochs to pay off.

Three runs of `python train.py experiment=demo trainer.max_epochs=N`, each a fresh process with the stamp
callback (benchmarks/stamp.py) marking every epoch's start:

- eager: model.compile=false;
- cold: model.compile=true with an empty inductor cache (TORCHINDUCTOR_CACHE_DIR in a temp dir), so every
  graph is traced, lowered and compiled to C++;
- warm: the same again with the cache the cold run left (inductor's FX graph cache and AOTAutograd's
  cache on disk), as a second run on the same machine would have it.

A warm-up run (not counted) makes the demo set and its decoded-image cache first. Epoch k runs from the
start of epoch k to the start of epoch k+1 (the last one to the end of training); "steady" is the median of
the epochs after the first (for the compiled runs, of both runs' such epochs: the same compiled code runs in
both). The one-time cost of compiling is (time to the end of epoch 1, compiled) minus
(the same, eager), less the difference of one steady epoch; it pays off after cost / (eager steady -
compiled steady) epochs.

    python benchmarks/compile_cost.py --epochs 4
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from startup import ROOT, stamps  # noqa: E402

TARGET_WARM_S = 20.0


def run(work: Path, name: str, epochs: int, compiled: bool, cache: Path, extra: list[str]) -> dict:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache)  # the child inherits it (stamps copies os.environ)
    cmd = [
        sys.executable,
        str(ROOT / "train.py"),
        "experiment=demo",
        f"trainer.max_epochs={epochs}",
        f"model.compile={str(compiled).lower()}",
        f"hydra.run.dir={work / 'outputs' / name}",
        "+callbacks.startup_stamp._target_=stamp.startup_stamp",
        *extra,
    ]
    marks = stamps(cmd, work)
    starts = [marks[f"epoch_start_{k}"] for k in range(epochs)] + [marks["train_end"]]
    seconds = [b - a for a, b in zip(starts, starts[1:], strict=False)]
    return {
        "first_step": marks["first_step"],
        "epochs": seconds,
        "to_epoch_1_end": starts[1],
        "steady": statistics.median(seconds[1:]) if len(seconds) > 1 else seconds[0],
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4, help="epochs of each run (>= 2)")
    parser.add_argument("override", nargs="*", help="extra Hydra overrides for every run")
    args = parser.parse_args(argv)
    if args.epochs < 2:
        parser.error("--epochs must be at least 2 (one to compile, one to time)")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    load_before = os.getloadavg()[0]
    saved = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    try:
        with tempfile.TemporaryDirectory(prefix="compile_cost_") as tmp:
            work = Path(tmp)
            cache = work / "inductor"
            run(work, "warmup", 1, False, cache, args.override)  # demo set + decoded-image cache
            results = {
                "eager": run(work, "eager", args.epochs, False, cache, args.override),
                "cold compile": run(work, "cold", args.epochs, True, cache, args.override),
                "warm compile": run(work, "warm", args.epochs, True, cache, args.override),
            }
    finally:
        if saved is None:
            os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
        else:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = saved

    eager = results["eager"]
    # Both compiled runs run the same compiled code once compiling is done: their steady epochs are pooled
    # (load from other processes on a shared machine then moves one run's figure less).
    pooled = statistics.median(e for n in ("cold compile", "warm compile") for e in results[n]["epochs"][1:])
    for name in ("cold compile", "warm compile"):
        results[name]["steady"] = pooled
    print(
        f"python train.py experiment=demo trainer.max_epochs={args.epochs} {' '.join(args.override)}; "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}; load average {load_before:.2f} "
        f"before, {os.getloadavg()[0]:.2f} after"
    )
    header = (
        f"{'run':14} {'first step s':>12} {'epoch 1 s':>10} {'steady s/epoch':>14} {'one-time cost s':>15} "
        f"{'pays off after':>15}"
    )
    print(header)
    print("-" * len(header))
    for name, r in results.items():
        cost = (r["to_epoch_1_end"] - r["steady"]) - (eager["to_epoch_1_end"] - eager["steady"])
        gain = eager["steady"] - r["steady"]
        if name == "eager":
            cost_text, pays = "", ""
        else:
            cost_text = f"{cost:.1f}"
            pays = f"{cost / gain:.0f} epochs" if gain > 0 else "never"
        print(
            f"{name:14} {r['first_step']:12.2f} {r['epochs'][0]:10.2f} {r['steady']:14.3f} {cost_text:>15} "
            f"{pays:>15}"
        )
        r["cost"] = cost
    warm = results["warm compile"]["cost"]
    verdict = "met" if warm <= TARGET_WARM_S else "NOT met"
    print(f"warm compile one-time cost {warm:.1f} s (target <= {TARGET_WARM_S:g} s: {verdict})")
    for name, r in results.items():
        print(f"epochs (s) {name:13} {' '.join(f'{s:.2f}' for s in r['epochs'])}")


if __name__ == "__main__":
    sys.exit(main())
