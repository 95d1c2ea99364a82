"""Squeeze-and-Excitation channel gating (Hu et al., 2018)."""

from __future__ import annotations

from numbers import Integral

import torch
from torch import nn


class SqueezeExcitation(nn.Module):
    """Rescale each channel by a gate in (0, 1) computed from the channel means.

    Args:
        channels: number of input (and output) channels.
        reduction: the hidden width is ``channels // reduction``; 1 <= reduction <= channels.
    """

    def __init__(self, channels: int, reduction: int = 8) -> None:
        super().__init__()
        if not isinstance(channels, Integral) or isinstance(channels, bool) or channels < 1:
            raise ValueError(f"channels must be an integer >= 1, got {channels!r}")
        if (
            not isinstance(reduction, Integral)
            or isinstance(reduction, bool)
            or not 1 <= reduction <= channels
        ):
            raise ValueError(
                f"se_reduction must be an integer between 1 and the {channels} channels the "
                f"squeeze-excitation applies to, got {reduction!r}"
            )
        hidden = int(channels) // int(reduction)
        # 1x1 convs keep the gate in NCHW (no reshapes) and work unchanged for channels_last.
        self.fc1 = nn.Conv2d(channels, hidden, kernel_size=1, bias=False)
        self.fc2 = nn.Conv2d(hidden, channels, kernel_size=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # mean() rather than AdaptiveAvgPool2d: same value, deterministic backward on CUDA.
        gate = x.mean((2, 3), keepdim=True)
        gate = torch.sigmoid(self.fc2(torch.relu(self.fc1(gate))))
        return x * gate
