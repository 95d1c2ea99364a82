"""Run entry points in one process under an address-space limit, to show a refusal costs bounded memory.

    python memory_limit.py HEADROOM_MIB TOOL ARG... [-- TOOL ARG...]...

Imports everything first, then caps the address space at what the process already maps plus HEADROOM_MIB, then
runs each `TOOL.py ARG...` (its `main`) and prints one JSON line per run: exit status, stderr, peak RSS in MiB.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import resource
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/

import densenet_se.evaluate  # noqa: E401, E402, F401
from helpers.runs import entry_point  # noqa: E402


def mapped_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmSize in /proc/self/status")


def main() -> None:
    headroom = int(sys.argv[1]) << 20
    runs, current = [], []
    for arg in sys.argv[2:]:
        if arg == "--":
            runs.append(current)
            current = []
        else:
            current.append(arg)
    runs.append(current)
    mains = {tool: entry_point(tool).main for tool, *_ in runs}
    limit = mapped_bytes() + headroom
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    for tool, *args in runs:
        sys.argv = [f"{tool}.py", *args]
        err = io.StringIO()
        code = 0
        with contextlib.redirect_stderr(err):
            try:
                mains[tool]()
            except SystemExit as exit_:
                code = exit_.code if isinstance(exit_.code, int) else 1
            except BaseException as ex:  # noqa: BLE001 - MemoryError included: reported, not raised
                code, _ = -1, err.write(f"{type(ex).__name__}: {ex}")
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(
            json.dumps({"tool": tool, "code": code, "stderr": err.getvalue(), "peak_mib": peak}), flush=True
        )


if __name__ == "__main__":
    main()
