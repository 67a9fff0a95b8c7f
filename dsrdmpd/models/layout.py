"""Memory layout of (B, C, H, W) tensors: one rule for every fast path that reads or keeps it.

A tensor whose C == 1 or H == W == 1 is contiguous in both layouts; such a tensor counts as
NCHW (its elements are in NCHW order, so NCHW kernels read it as they are).
"""
from __future__ import annotations

import torch


def is_channels_last(x: torch.Tensor) -> bool:
    """x is 4-D, stored channels-last (NHWC order) and not also NCHW-contiguous."""
    return x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def memory_format_of(x: torch.Tensor) -> torch.memory_format:
    """torch.channels_last where :func:`is_channels_last`, else torch.contiguous_format."""
    return torch.channels_last if is_channels_last(x) else torch.contiguous_format
