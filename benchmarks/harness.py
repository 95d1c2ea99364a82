"""Shared pieces of the benchmark scripts: the compute floor, epoch-by-epoch interleaving, a hook profile.

Not a benchmark itself. The scripts in this folder import it (their folder is on sys.path when run as
scripts; the tests load them with the folder added).
"""

from __future__ import annotations

import os
import shutil
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
LAYOUTS = {"tiny": "densenet_tiny_se", "121": "densenet121_se"}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def load_average() -> float:
    return os.getloadavg()[0]


def describe(values: list[float]) -> tuple[float, float]:
    """(median, min) of the epochs after the warm-up one (all of them when there are fewer than 3)."""
    counted = values[1:] if len(values) >= 3 else values
    return statistics.median(counted), min(counted)


def compose(overrides: list[str], work: Path):
    """conf/train.yaml composed with `overrides`, paths under `work` (run dir: work/run)."""
    from densenet_se.config import compose_train_config

    return compose_train_config(overrides, work, ROOT / "conf")


def make_data(root: Path, images: int, size: int, workers: int) -> Path:
    """`images` demo JPEGs (half per class) at `size` px, made by `workers` processes with their own seeds."""
    per_class = max(images // 2, 1)
    parts = max(1, min(workers, per_class))
    counts = [per_class // parts + (k < per_class % parts) for k in range(parts)]
    from densenet_se.data.demo import make_demo_dataset

    jobs = [(str(root.parent / f"part{k}"), n, size, k) for k, n in enumerate(counts)]
    with ProcessPoolExecutor(parts) as pool:  # a library function, so the workers can unpickle it
        for done in [pool.submit(make_demo_dataset, part, n, size, seed=k) for part, n, size, k in jobs]:
            done.result()
    for k, (part, *_) in enumerate(jobs):
        for file in Path(part).glob("*/*.jpg"):
            target = root / file.parent.name / f"p{k}_{file.name}"
            target.parent.mkdir(parents=True, exist_ok=True)
            file.rename(target)
        shutil.rmtree(part)
    return root


class ComputeFloor:
    """The same network's training and evaluation steps on batches already normalised in memory, nothing else.

    No framework, no data loading, no host reads, no metrics: what any pipeline needs at the least for this
    model. Each evaluation step computes the loss, as validation does.
    """

    def __init__(self, model: torch.nn.Module, device: torch.device, train: Iterable, val: Iterable) -> None:
        import copy

        from densenet_se.data.images import normalize

        self.device = device
        self.model = copy.deepcopy(model).to(device)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-4)

        def batches(loader: Iterable) -> list[tuple[torch.Tensor, torch.Tensor]]:
            return [(normalize(x.to(device)), y.to(device)) for x, y in loader]

        self.train = batches(train)
        self.val = batches(val)

    def epoch(self) -> float:
        start = time.perf_counter()
        self.model.train()
        for images, labels in self.train:
            self.optimizer.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(self.model(images), labels).backward()
            self.optimizer.step()
        self.model.eval()
        with torch.inference_mode():
            for images, labels in self.val:
                torch.nn.functional.cross_entropy(self.model(images), labels)
        sync(self.device)
        return time.perf_counter() - start


def interleaver(loops: dict, device: torch.device, between: Callable[[], None] | None = None):
    """A callback that runs one epoch of each other loop between two project epochs and times them all.

    Wall seconds go to `project` and `others`, the process's CPU seconds to `project_cpu` and `others_cpu`
    (every thread: on a busy machine CPU time shows the work done, wall time also the waiting). `between`
    runs untimed after a project epoch ends and before the other loops run (e.g. to let the project's
    background checkpoint writes finish, so they never slow the other loops down); the CPU it uses is the
    project's.
    """
    import lightning as L

    class Interleave(L.Callback):
        def __init__(self) -> None:
            self.project: list[float] = []
            self.project_cpu: list[float] = []
            self.others: dict[str, list[float]] = {name: [] for name in loops}
            self.others_cpu: dict[str, list[float]] = {name: [] for name in loops}
            self.mark: tuple[float, float] | None = None
            self.fit_start = time.perf_counter()
            self.first_epoch_start: float | None = None
            self.end: float | None = None
            self.stop_after: int | None = None  # project epochs to interleave (None: all)

        def _close_project_epoch(self) -> None:
            sync(device)
            now = time.perf_counter()
            if self.mark is None:
                self.first_epoch_start = now
            else:
                self.project.append(now - self.mark[0])
            if between is not None:
                between()
            if self.mark is not None:
                self.project_cpu.append(time.process_time() - self.mark[1])
            self.mark = None

        def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            if self.stop_after is not None and len(self.project) >= self.stop_after:
                if self.mark is not None:
                    self._close_project_epoch()
                return
            self._close_project_epoch()
            rng = torch.get_rng_state()  # the project's own seeding stays as it would be without us
            with torch.enable_grad(), torch.inference_mode(False):
                for name, loop in loops.items():
                    cpu = time.process_time()
                    self.others[name].append(loop.epoch())
                    self.others_cpu[name].append(time.process_time() - cpu)
            torch.set_rng_state(rng)
            self.mark = (time.perf_counter(), time.process_time())

        def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            if self.mark is not None:
                self._close_project_epoch()
            self.end = time.perf_counter()

    return Interleave()


class HookProfile:
    """Seconds per Lightning action (callback hooks, loop steps, module hooks), switched on for some epochs.

    Lightning reports every hook it calls to `trainer.profiler`; this swaps a SimpleProfiler in at the start
    of a profiled epoch and the default no-op one back afterwards, so timed epochs run exactly as usual.
    """

    def __init__(self) -> None:
        self.durations: dict[str, list[float]] = defaultdict(list)
        self.epochs = 0

    def start(self, trainer) -> None:
        from lightning.pytorch.profilers import SimpleProfiler

        trainer.profiler = SimpleProfiler()
        self.epochs += 1

    def stop(self, trainer) -> None:
        from lightning.pytorch.profilers import PassThroughProfiler, SimpleProfiler

        if isinstance(trainer.profiler, SimpleProfiler):
            for action, seconds in trainer.profiler.recorded_durations.items():
                self.durations[action].extend(seconds)
        trainer.profiler = PassThroughProfiler()

    def rows(self, top: int = 18) -> list[tuple[str, float, int]]:
        """(action, seconds per epoch, calls per epoch), largest first; step-level actions included."""
        n = max(self.epochs, 1)
        rows = [(short_action(a), sum(s) / n, round(len(s) / n)) for a, s in self.durations.items()]
        return sorted(rows, key=lambda r: -r[1])[:top]


def short_action(action: str) -> str:
    """`[Callback]ModelCheckpoint{'monitor': 'val/acc', ...}.on_validation_end` -> shorter, still unique."""
    if "{" in action and "}" in action:
        head, rest = action.split("{", 1)
        state, tail = rest.rsplit("}", 1)
        if head.endswith("ModelCheckpoint"):
            monitor = "monitor=val/acc" if "val/acc" in state else "last"
            return f"{head}({monitor}){tail}"
        return f"{head}{tail}"
    return action


def print_lines(lines: Iterable[str]) -> None:
    for line in lines:
        print(line)
    sys.stdout.flush()
