"""Runs for tests: `python train.py` subprocesses, entry points in-process, and one tiny trained run shared by
the eval, predict and export tests (trained once per pytest session)."""

from __future__ import annotations

import importlib.util
import logging
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
from omegaconf import OmegaConf

from helpers.config import ROOT, TINY, TINY_TV, compose_cfg
from helpers.images import make_image_folder

CLASSES = {"Monkeypox": 24, "Others": 24}
_RUN: dict[str, Path] = {}


def subprocess_env() -> dict[str, str]:
    """Environment for `python train.py ...` subprocesses: no terminal tricks, quiet progress."""
    env = dict(os.environ)
    env.pop("HYDRA_FULL_ERROR", None)
    env["PYTHONUNBUFFERED"] = "1"
    env["MPLBACKEND"] = "Agg"
    return env


def run_train(args: list[str], cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """`python train.py args...` in a fresh interpreter; stdout and stderr captured as text."""
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args],
        cwd=cwd,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )


def tiny_run(tmp_path_factory: pytest.TempPathFactory, arch: str = "densenet_se") -> Path:
    """RUN dir of a 2-epoch tiny training (val and test splits) with .hydra/config.yaml like a real run, of the
    tiny DenseNet+SE or (arch="torchvision") of TINY_TV's torchvision model."""
    if arch not in _RUN:
        from densenet_se.train import run

        base = tmp_path_factory.mktemp(f"tiny_run_{arch}")
        images = make_image_folder(base / "images", CLASSES, size=40)
        tiny = {"densenet_se": TINY, "torchvision": TINY_TV}[arch]
        cfg = compose_cfg(
            base,
            [*tiny, f"data.root={images}", "data.test_fraction=0.2", "print_config=false"],
        )
        run(cfg)
        out = base / "run"
        # Hydra writes this in real runs; in-process runs do not, so save the (already concrete) config.
        (out / ".hydra").mkdir()
        OmegaConf.save(cfg, out / ".hydra" / "config.yaml")
        _RUN[arch] = out
    return _RUN[arch]


def entry_point(name: str) -> ModuleType:
    """Import eval.py / predict.py / export.py from the repo root (their `main` is the CLI)."""
    module_name = f"_entry_{name}"
    if module_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(module_name, ROOT / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules[module_name] = module
    return sys.modules[module_name]


def run_cli(name: str, args: list[str], monkeypatch: pytest.MonkeyPatch) -> int:
    """Run `python <name>.py args...` in this process; returns the exit status."""
    monkeypatch.setattr(sys, "argv", [f"{name}.py", *args])
    monkeypatch.setenv("HYDRA_FULL_ERROR", "0")  # restored after the test (main() sets it to 1)
    root = logging.getLogger()
    handlers = list(root.handlers)
    try:
        entry_point(name).main()
    except SystemExit as exit_:
        return int(exit_.code or 0)
    finally:  # Hydra's handlers write to this test's captured streams, closed once the test ends
        root.handlers[:] = handlers
    return 0


def train_process(args: list[str], cwd: Path, stderr: int = subprocess.PIPE) -> subprocess.Popen:
    """`python train.py args...` started in the background with tests/ importable (helpers.faultinject
    callbacks); stdout and stderr are pipes of text (stderr=subprocess.STDOUT: one pipe)."""
    env = subprocess_env()
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "tests"), env.get("PYTHONPATH", "")])
    return subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
        # As from a terminal: a suite started in the background (nohup, `&` in a script) passes SIGINT on as
        # ignored, and Python then keeps ignoring it, so a Ctrl+C test would wait out its callback and exit 0.
        preexec_fn=_default_sigint,
    )


def _default_sigint() -> None:
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


def signal_at_marker(proc: subprocess.Popen, marker: Path, signum: int) -> tuple[str, str]:
    """Wait until `marker` exists (a WaitForSignal callback wrote it), send `signum`, and return (stdout, stderr)
    once the process has ended."""
    import time

    deadline = time.monotonic() + 600  # a safety net for a hung run, not a timing assertion
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    if proc.poll() is None:
        proc.send_signal(signum)
    return proc.communicate(timeout=600)
