"""DenseNet + Squeeze-and-Excitation models with torchvision-compatible parameter names."""

from __future__ import annotations

from densenet_se.models.densenet import DenseNetSE, LoadReport, load_pretrained
from densenet_se.models.se import SqueezeExcitation

__all__ = ["DenseNetSE", "LoadReport", "SqueezeExcitation", "load_pretrained"]
