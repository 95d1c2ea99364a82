"""The import graph of densenet_se: no circle (module-level and function-level imports alike), and the modules an
entry point needs to report a config error load without torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from helpers.config import ROOT

PACKAGE = ROOT / "src" / "densenet_se"


def module_files(package: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package (a sub-package is its __init__.py)."""
    out = {}
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(package.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def import_graph(package: Path) -> dict[str, set[str]]:
    """Module -> the package's modules it imports anywhere in its body (top level, functions, TYPE_CHECKING).

    A package __init__ that re-exports lazily (`importlib.import_module` on a name from a table) also imports
    each module it names in a string.
    """
    files = module_files(package)

    def known(name: str) -> str | None:  # the module `name` refers to, or its nearest parent module
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        is_package = path.name == "__init__.py"
        edges: set[str | None] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                edges.update(known(alias.name) for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the module's own package upwards
                    here = name if is_package else name.rpartition(".")[0]
                    for _ in range(node.level - 1):
                        here = here.rpartition(".")[0]
                    base = f"{here}.{base}".rstrip(".")
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    edges.add(sub if sub in files else known(base))
            elif is_package and isinstance(node, ast.Constant) and node.value in files:
                edges.add(node.value)
        graph[name] = {e for e in edges if e is not None and e != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


def test_the_checker_sees_a_circle_closed_inside_a_function(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg.sub import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from .. import a\n    return a\n")
    (pkg / "c.py").write_text("import pkg.sub.b\n")
    graph = import_graph(pkg)
    assert graph == {
        "pkg": set(),
        "pkg.sub": set(),
        "pkg.a": {"pkg.sub.b"},
        "pkg.sub.b": {"pkg.a"},
        "pkg.c": {"pkg.sub.b"},
    }
    assert find_cycle(graph) == ["pkg.a", "pkg.sub.b", "pkg.a"]
    assert find_cycle({"x": {"y"}, "y": set()}) is None


def test_densenet_se_has_no_import_circle():
    graph = import_graph(PACKAGE)
    # Function-level imports count: the resume resolver loads densenet_se.resume only when resuming.
    assert "densenet_se.resume" in graph["densenet_se.resolvers"]
    assert "densenet_se.data.datamodule" in graph["densenet_se.data"]  # the lazy re-export
    cycle = find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_models_and_data_import_nothing_of_the_training_stack():
    leaves = {
        "densenet_se.errors",
        "densenet_se.io",
        "densenet_se.distributed",
        "densenet_se.checks",
        "densenet_se.archive",
        "densenet_se.names",
        "densenet_se.plugins",
    }
    graph = import_graph(PACKAGE)
    for name, edges in graph.items():
        for layer in ("densenet_se.models", "densenet_se.data"):
            if name == layer or name.startswith(f"{layer}."):
                outside = {e for e in edges if not e.startswith(layer) and e not in leaves}
                assert not outside, f"{name} imports {sorted(outside)}"


@pytest.mark.slow
def test_backbones_import_only_themselves_the_networks_and_the_leaves():
    allowed = (
        "densenet_se.backbones",
        "densenet_se.models",
        "densenet_se.checks",
        "densenet_se.errors",
        "densenet_se.plugins",
    )
    graph = import_graph(PACKAGE)
    for name, edges in graph.items():
        if name.startswith("densenet_se.backbones"):
            assert all(e.startswith(allowed) for e in edges), f"{name} imports {sorted(edges)}"


@pytest.mark.subprocess
def test_entry_point_plumbing_loads_without_torch():
    # Registering the schemas imports every arch module of densenet_se.backbones: none may import torch. Nor may
    # the data sources (config.validate checks data.source and data.labels).
    code = (
        "import sys, densenet_se.cli, densenet_se.resolvers, densenet_se.overrides\n"
        "densenet_se.cli.register()\n"
        "assert set(densenet_se.backbones.registry()) == {'densenet_se', 'torchvision'}\n"
        "from densenet_se.data import sources\n"
        "assert set(sources.registry()) == {'csv', 'folders'}\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision', 'lightning', "
        "'torchmetrics')))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
