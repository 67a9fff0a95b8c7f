"""RDDM coefficient schedules (SPEC.md, "Residual diffusion").

Built in float64, stored as float32 exactly like the official code, so that the float32
arithmetic of the sampler matches it bit for bit.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RDDMSchedule:
    """alphas_cumsum (abar_t), betas2_cumsum (b2bar_t), betas_cumsum (bbar_t), each (T,) float32."""

    timesteps: int
    sum_scale: float
    alphas_cumsum: torch.Tensor
    betas2_cumsum: torch.Tensor
    betas_cumsum: torch.Tensor

    @classmethod
    def build(cls, timesteps: int = 1000, sum_scale: float = 1.0) -> "RDDMSchedule":
        if timesteps < 1:
            raise ValueError(f"timesteps must be >= 1, got {timesteps}")
        scale = 0.5 * timesteps * (timesteps + 1)
        ramp = torch.linspace(1, timesteps, timesteps, dtype=torch.float64)
        alphas = ramp.flip(0) / scale                       # decreasing, sums to 1
        betas2 = ramp / scale * sum_scale                   # increasing, sums to sum_scale
        abar = alphas.cumsum(0).clip(0, 1)
        b2bar = betas2.cumsum(0).clip(0, 1)
        return cls(timesteps, float(sum_scale), abar.float(), b2bar.float(), b2bar.sqrt().float())

    def sampling_times(self, steps: int) -> list:
        """Official DDIM-style time grid, descending, ending at -1 (e.g. 999, 799, ..., 199, -1)."""
        if not 1 <= steps <= self.timesteps:
            raise ValueError(f"sampling steps must be in [1, {self.timesteps}], got {steps}")
        return list(time_grid(self.timesteps, steps))

    def official_buffers(self) -> dict:
        """The float32 buffers an official ``ResidualDiffusion`` state dict carries that are
        used to check a loaded checkpoint against this schedule."""
        return {"alphas_cumsum": self.alphas_cumsum, "betas2_cumsum": self.betas2_cumsum,
                "betas_cumsum": self.betas_cumsum}


@functools.lru_cache(maxsize=None)
def time_grid(timesteps: int, steps: int) -> tuple:
    """The descending sampling grid of ``steps`` steps over ``timesteps``, computed once per
    pair. A sampler traced by ``torch.export`` runs on fake tensors, where this computation
    would give symbols, not ints; the Dehazer therefore computes the grid it is about to
    have traced before tracing (:mod:`dsrdmpd.aot`), and the trace reads it from here.
    float32 whatever the default dtype (the authors' code runs with float32 as the default;
    a float64 grid differs for some step counts, e.g. 26, 30, 52 of 1000)."""
    return tuple(reversed(torch.linspace(-1, timesteps - 1, steps=steps + 1, dtype=torch.float32).int().tolist()))
