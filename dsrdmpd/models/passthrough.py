"""Stand-ins that pass the image through unchanged, for I/O tests and benchmarks of the
machinery around the networks (tiling, streaming, radiometric mapping): with them,
``Dehazer(PassThroughStage1(), PassThroughStage2())`` returns its input."""
from __future__ import annotations

import torch
from torch import nn


class PassThroughStage1(nn.Module):
    """coarse = hazy, (B, 3, H, W) in [0, 1]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class PassThroughStage2(nn.Module):
    """restored = coarse; has the sampler's interface."""
    sampling_timesteps = 5

    def __init__(self):
        super().__init__()
        self.net = nn.Identity()

    def sample(self, coarse: torch.Tensor, hazy: torch.Tensor, **_) -> torch.Tensor:
        return coarse.clamp(0, 1)
