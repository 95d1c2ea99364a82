"""Data: ImageFolder scanning, checking, splitting, caching, and the synthetic demo set."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from densenet_se.data.datamodule import ImageFolderDataModule
    from densenet_se.data.demo import ensure_demo_dataset, make_demo_dataset

__all__ = ["ImageFolderDataModule", "ensure_demo_dataset", "make_demo_dataset"]

_LAZY = {
    "ImageFolderDataModule": "densenet_se.data.datamodule",
    "ensure_demo_dataset": "densenet_se.data.demo",
    "make_demo_dataset": "densenet_se.data.demo",
}


def __getattr__(name: str) -> Any:
    # Lazy so `densenet_se.data.images` (used by predict) does not pay for importing Lightning.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
