"""The worked examples of docs/ARCHITECTURE.md, installed as a contributor would: one module file and one YAML."""

from __future__ import annotations

import re
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from helpers.config import CONF, ROOT


def doc_block(first_line: str) -> str:
    """The fenced block of docs/ARCHITECTURE.md that starts with `first_line`."""
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    blocks = re.findall(r"```(?:python|yaml)\n(.*?)```", text, flags=re.S)
    return next(block for block in blocks if block.startswith(first_line))


def installed_example(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, package: ModuleType, module: str, config: str
) -> Iterator[Path]:
    """For a fixture: the documented `<package>/<module>.py` found by the package's registry, and `conf/<config>.yaml`
    in a copy of conf/ (yielded). The registry forgets it afterwards."""
    folder = tmp_path / "package"
    folder.mkdir()
    path = package.__name__.replace(".", "/")
    (folder / f"{module}.py").write_text(doc_block(f"# src/{path}/{module}.py"))
    conf = tmp_path / "conf"
    shutil.copytree(CONF, conf)
    (conf / f"{config}.yaml").write_text(doc_block(f"# conf/{config}.yaml"))
    monkeypatch.setattr(package, "__path__", [*package.__path__, str(folder)])
    package.registry.cache_clear()
    yield conf
    package.registry.cache_clear()
    sys.modules.pop(f"{package.__name__}.{module}", None)
