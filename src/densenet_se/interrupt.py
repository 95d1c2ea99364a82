"""Stopping on SIGINT (Ctrl+C) or SIGTERM (`kill`, a scheduler's time limit): the exit status a shell gives a
process ended by that signal (130, 143), never 0, and one line saying what was kept and how to continue.

Lightning ends training on SIGTERM at the end of the current batch by raising its SIGTERMException, a
SystemExit that would exit with status 0, and turns Ctrl+C during training into `sys.exit(1)`; `signal_of`
recognises both. Outside Lightning's loops (decoding the images, the report at the end), `sigterm_raises`
makes SIGTERM raise Interrupted at once, as Ctrl+C raises KeyboardInterrupt. Torch-free.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

EXIT_BASE = 128  # a shell reports a process ended by signal N as 128 + N


class Interrupted(BaseException):
    """The run stopped on a signal. A BaseException, like KeyboardInterrupt: no `except Exception` swallows it.

    `hint`: what was kept and how to continue (one line), added by the task that knows its run directory.
    """

    def __init__(self, signum: int, hint: str = "") -> None:
        super().__init__(signum, hint)
        self.signum, self.hint = int(signum), hint

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        return EXIT_BASE + self.signum

    def message(self) -> str:
        return f"interrupted by {self.name}" + (f": {self.hint}" if self.hint else "")


def signal_of(ex: BaseException) -> int | None:
    """SIGINT or SIGTERM if `ex` is how a run stops on that signal (here or inside Lightning), else None."""
    if isinstance(ex, Interrupted):
        return ex.signum
    if isinstance(ex, KeyboardInterrupt):
        return signal.SIGINT
    if isinstance(ex, SystemExit):
        # Lightning's SIGTERMException exists only once Lightning is loaded; no need to load it to ask.
        exceptions = sys.modules.get("lightning.pytorch.utilities.exceptions")
        if exceptions is not None and isinstance(ex, exceptions.SIGTERMException):
            return signal.SIGTERM
        # Lightning ends a Ctrl+C during training with sys.exit(1), raised while it handles the KeyboardInterrupt.
        if isinstance(ex.__context__, KeyboardInterrupt):
            return signal.SIGINT
    return None


def interrupted(ex: BaseException, hint: str = "") -> Interrupted | None:
    """`ex` as an Interrupted carrying `hint` (its own hint, if it has one), or None if no signal stopped the run."""
    signum = signal_of(ex)
    if signum is None:
        return None
    return Interrupted(signum, ex.hint if isinstance(ex, Interrupted) and ex.hint else hint)


@contextmanager
def sigterm_raises() -> Iterator[None]:
    """While inside: SIGTERM raises Interrupted, unless another handler is in charge.

    Only where SIGTERM has its default action (the process dies at once); a handler someone else installed
    (submitit, a wrapper script) or an ignored SIGTERM is left alone. Inside Lightning's loops its own handler
    runs first and calls this one; this one then does nothing, and Lightning stops at the end of the batch
    (with SLURM's auto-requeue too, whose signal is not touched here).
    """
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) not in (
        signal.SIG_DFL,
        None,
    ):
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        if signal.getsignal(signal.SIGTERM) is handler:  # called directly, not by Lightning's handler
            raise Interrupted(signum)

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
