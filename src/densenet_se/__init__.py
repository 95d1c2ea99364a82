"""densenet-se: DenseNet + Squeeze-and-Excitation image classifiers with Lightning and Hydra."""

from __future__ import annotations

__version__ = "0.1.0"
