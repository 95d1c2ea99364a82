"""Fixtures shared by every test: a tiny image folder, and a cache directory of the test's own.

Helpers (TINY overrides, image makers, subprocess runs) live in the `helpers` package beside this file.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers.images import make_image_folder


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    return make_image_folder(tmp_path / "images")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Tests never touch the user's cache.
    monkeypatch.setenv("DENSENET_SE_CACHE", str(tmp_path / "cache"))
