"""Start-up and wind-down of `python train.py experiment=demo`, against the time to `import torch, lightning`.

Each measured run is a fresh process. Its timeline comes from a stamp callback (benchmarks/stamp.py, added
with `+callbacks.startup_stamp._target_=...`) that prints wall-clock stamps at fit start, at the first
training step, at the end of training and at the end of fit; the process start is the moment this script
launched it. The import floor is a process that imports torch and lightning and exits, measured the same way.
Floor and train runs take turns (--repeats of each).

The first train run (not counted) generates the demo set and decodes it into the on-disk image cache, so
the measured runs leave out the first-ever decode, as the target asks. The children run with bytecode
caching on, as a normal install has it.

- start -> first step: from process start to the first training step (imports, config, data from the cache,
  model, Trainer, sample grid, model summary, sanity check).
- end-of-run reports: from the end of training to the end of fit (RunReport.on_fit_end: metrics.json,
  curves.png, confusion_matrix.png).
- end of fit -> exit: train.py's last writes, Lightning's teardown and the interpreter's exit.

--cprofile FILE profiles one more run from process start to its first step and prints where the seconds
go (cumulative time of the top functions; FILE keeps the stats for snakeviz or pstats).

    python benchmarks/startup.py --repeats 3
    python benchmarks/startup.py --repeats 1 --cprofile /tmp/startup.prof
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent  # the checkout measured (--project changes it)
sys.path.insert(0, str(HERE))  # stamp.py; not harness.py, which imports torch before a profile could start

TARGET_ABOVE_FLOOR_S = 2.0
TARGET_REPORTS_S = 0.5
FLOOR_CODE = (
    "import time, torch, lightning; print('STAMP imported', time.time(), time.process_time(), flush=True)"
)


def child_env() -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # a normal install has its .pyc files
    paths = [str(HERE), str(ROOT / "src"), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    return env


def stamps(cmd: list[str], cwd: Path) -> dict[str, float]:
    """Run `cmd`; {name: wall seconds since the launch, "name cpu": the process's CPU seconds then} from its
    `STAMP name time cpu` lines, plus "exit" and "exit cpu" (all of the child's CPU time)."""
    start = time.time()
    before = os.times()
    done = subprocess.run(cmd, cwd=cwd, env=child_env(), capture_output=True, text=True, check=False)
    end, after = time.time(), os.times()
    if done.returncode != 0:
        sys.exit(f"error: {' '.join(cmd)} failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    cpu = after.children_user - before.children_user + after.children_system - before.children_system
    out = {"exit": end - start, "exit cpu": cpu}
    for line in done.stdout.splitlines():
        if line.startswith("STAMP "):
            _, name, when, used = line.split()
            out[name], out[f"{name} cpu"] = float(when) - start, float(used)
    return out


def train_cmd(work: Path, run: str, extra: list[str], profile: Path | None = None) -> list[str]:
    cmd = [sys.executable]
    if profile is not None:  # this script as the child's wrapper: profile from start to the first step
        cmd += [str(Path(__file__).resolve()), "--child-profile", str(profile), "--"]
    return [
        *cmd,
        str(ROOT / "train.py"),
        "experiment=demo",
        "trainer.max_epochs=1",
        f"hydra.run.dir={work / 'outputs' / run}",
        "+callbacks.startup_stamp._target_=stamp.startup_stamp",
        *extra,
    ]


def child_profile(out: Path, argv: list[str]) -> None:
    """Run train.py (argv) in this process under cProfile until its first training step."""
    import cProfile
    import runpy

    import stamp

    stamp.PROFILER, stamp.PROFILE_PATH = cProfile.Profile(), str(out)
    sys.argv = argv
    sys.path.insert(0, str(Path(argv[0]).parent))  # as `python train.py` would have it
    stamp.PROFILER.enable()
    runpy.run_path(argv[0], run_name="__main__")


def print_profile(path: Path, top: int) -> None:
    """Where the seconds before the first step go: imports by package, then the functions that run."""
    import pstats

    stats = pstats.Stats(str(path)).stats
    total = max(ct for (_, _, _), (_, _, _, ct, _) in stats.items())
    print(f"cProfile, process start -> first training step ({path}; {total:.2f} s under the profiler,")
    print("which slows Python-heavy code such as imports about 2x; read the shares, not the seconds):")
    packages: dict[str, float] = {}
    calls = []
    for (file, line, name), (_, _, _, cumulative, _) in stats.items():
        parts = Path(file).parts
        if name == "<module>" and "site-packages" in parts:
            rel = parts[parts.index("site-packages") + 1 :]
            if len(rel) == 2 and rel[1] == "__init__.py":  # a top-level package's own import
                packages[rel[0]] = cumulative
        elif "densenet_se" in parts or ("lightning" in parts and "trainer" in parts) or name == "compose":
            calls.append((cumulative, f"{'/'.join(parts[-2:])}:{line}({name})"))
    print("  imports by top-level package (cumulative: lightning's includes torchmetrics, torchvision, ...):")
    for name, seconds in sorted(packages.items(), key=lambda kv: -kv[1])[:12]:
        print(f"    {seconds:7.3f} s {seconds / total:6.1%}  {name}")
    print("  functions of densenet_se, Hydra's compose and Lightning's Trainer (cumulative):")
    for seconds, where in sorted(calls, reverse=True)[:top]:
        print(f"    {seconds:7.3f} s {seconds / total:6.1%}  {where}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="measured runs of each (floor, train)")
    parser.add_argument("--cprofile", type=Path, help="also profile one run to its first step into FILE")
    parser.add_argument("--top", type=int, default=30, help="functions shown from the profile")
    parser.add_argument(
        "--project",
        type=Path,
        help="measure this checkout's train.py and src/ instead (e.g. main, for before/after)",
    )
    parser.add_argument("--child-profile", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("override", nargs="*", help="extra Hydra overrides for the train runs")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child_profile is not None:
        return child_profile(args.child_profile, args.override)
    global ROOT
    ROOT = (args.project or ROOT).resolve()
    load_before = os.getloadavg()[0]
    floor: list[dict[str, float]] = []
    runs: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory(prefix="startup_") as tmp:
        work = Path(tmp)
        warm = time.perf_counter()
        stamps(train_cmd(work, "warm", args.override), work)  # demo set + image cache + .pyc files
        warm = time.perf_counter() - warm
        for k in range(args.repeats):
            floor.append(stamps([sys.executable, "-c", FLOOR_CODE], work))
            runs.append(stamps(train_cmd(work, f"run{k}", args.override), work))
        if args.cprofile is not None:
            stamps(train_cmd(work, "profiled", args.override, profile=args.cprofile.resolve()), work)

    def med(rows: list[dict[str, float]], a: str, b: str | None = None) -> float:
        return statistics.median(r[a] - (r[b] if b else 0.0) for r in rows)

    imported, imported_cpu = med(floor, "imported"), med(floor, "imported cpu")
    first, first_cpu = med(runs, "first_step"), med(runs, "first_step cpu")
    above = first - imported
    reports, reports_cpu = med(runs, "fit_end", "train_end"), med(runs, "fit_end cpu", "train_end cpu")
    print(
        f"{ROOT}: python train.py experiment=demo trainer.max_epochs=1 (warm image cache; the warm-up run took "
        f"{warm:.1f} s); {args.repeats} run(s) of each, taking turns; medians; OMP_NUM_THREADS="
        f"{os.environ.get('OMP_NUM_THREADS', 'unset')}; load average {load_before:.2f} before, "
        f"{os.getloadavg()[0]:.2f} after"
    )
    print("wall: seconds since the process was launched; CPU: the process's own CPU seconds by then (robust")
    print("to other load on the machine, a cross-check; the targets are wall time)")
    header = f"{'measure':50} {'wall s':>7} {'CPU s':>7} {'target':>8}  verdict"
    print(header)
    print("-" * len(header))

    def row(label: str, wall: float, cpu: float, target: float | None = None) -> None:
        verdict = (
            ""
            if target is None
            else f"{'<= ' + format(target, 'g'):>8}  " + ("met" if wall <= target else "NOT met")
        )
        print(f"{label:50} {wall:7.2f} {cpu:7.2f} {verdict}")

    row("import torch, lightning", imported, imported_cpu)
    row("train.py: process start -> first training step", first, first_cpu)
    row("  above the import floor", above, first_cpu - imported_cpu, TARGET_ABOVE_FLOOR_S)
    row("end-of-run reports (train end -> fit end)", reports, reports_cpu, TARGET_REPORTS_S)
    row("end of fit -> process exit", med(runs, "exit", "fit_end"), med(runs, "exit cpu", "fit_end cpu"))
    print("timeline of each train run (wall s since launch / CPU s):")
    names = ("fit_start", "sanity_done", "first_step", "train_end", "fit_end", "exit")
    for r in runs:
        print("  " + ", ".join(f"{n} {r[n]:.2f}/{r[n + ' cpu']:.2f}" for n in names if n in r))
    print(
        "import floor runs (wall/CPU s): "
        + ", ".join(f"{r['imported']:.2f}/{r['imported cpu']:.2f}" for r in floor)
    )
    if args.cprofile is not None:
        print_profile(args.cprofile, args.top)


if __name__ == "__main__":
    sys.exit(main())
