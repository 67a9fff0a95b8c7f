"""Stage 1: MCESS-UNet, the coarse dehazing network (official class ``U_Net``).

Input: hazy image (B, 3, H, W) in [0, 1]; output: coarse estimate (B, 3, H, W), the
network output plus the input (global residual), NOT clamped. H and W must be multiples
of 16 and at least 64 (the bottleneck at H/16 x W/16 is reflect-padded by 3).
"""
from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

from ..config import WIDTH_MULTIPLES
from .mcess_blocks import AdaptiveScatteringFusion, MSCABlock, SelectiveSynthesis, UpConv

STAGE1_MULTIPLE = 16
STAGE1_MIN_SIZE = 64


def is_stage1_size(n: int) -> bool:
    """The stage-1 size rule for one side: a multiple of STAGE1_MULTIPLE, at least STAGE1_MIN_SIZE."""
    return n % STAGE1_MULTIPLE == 0 and n >= STAGE1_MIN_SIZE


def check_stage1_size(h: int, w: int) -> None:
    """Raise ValueError unless (h, w) satisfies the stage-1 size rule."""
    if not (is_stage1_size(h) and is_stage1_size(w)):
        raise ValueError(
            f"MCESS-UNet input size {h}x{w} is not allowed: height and width must be multiples "
            f"of {STAGE1_MULTIPLE} and at least {STAGE1_MIN_SIZE} (use dsrdmpd.inference, which "
            f"pads and crops back, for other sizes)")


class DecoderLevel(nn.Module):
    """One decoder level: u = UpConv(prev); u = ESS(e, u) + skip_proj(e); MSCABlock(2w -> w)."""

    def __init__(self, width: int):
        super().__init__()
        self.up = UpConv(2 * width, width)
        self.ess = SelectiveSynthesis(width)
        self.skip_proj = nn.Conv2d(width, 2 * width, 1)
        self.block = MSCABlock(2 * width, width)

    def forward(self, prev: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        u = self.up(prev)
        return self.block(self.ess(skip, u) + self.skip_proj(skip))


class MCESSUNet(nn.Module):
    """MCESS-UNet with base width ``dim`` (paper: 64, 58.7M parameters; ``dim`` must be a
    multiple of 32 because of the grouped attention-gate convs)."""

    def __init__(self, dim: int = 64):
        super().__init__()
        multiple = WIDTH_MULTIPLES["stage1.dim"]
        if dim < multiple or dim % multiple:
            raise ValueError(f"stage-1 dim must be a positive multiple of {multiple}, got {dim}")
        self.dim = dim
        widths = [dim, 2 * dim, 4 * dim, 8 * dim, 16 * dim]
        cins = [3] + widths[:-1]
        self.encoder = nn.ModuleList(MSCABlock(a, b) for a, b in zip(cins, widths))
        self.bottleneck = AdaptiveScatteringFusion(16 * dim)
        self.decoder = nn.ModuleList(DecoderLevel(w) for w in reversed(widths[:-1]))
        self.head = nn.Conv2d(dim, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"MCESS-UNet expects a (B, 3, H, W) tensor, got shape {tuple(x.shape)}")
        check_stage1_size(x.shape[-2], x.shape[-1])
        skips = []
        h = x
        for i, block in enumerate(self.encoder):
            if i:
                h = F.max_pool2d(h, 2)
            h = block(h)
            skips.append(h)
        h = self.bottleneck(skips.pop())
        for level in self.decoder:
            h = level(h, skips.pop())
        return self.head(h) + x


def init_stage1_weights(model: MCESSUNet, generator: torch.Generator | None = None) -> None:
    """Official initialisation: PyTorch defaults, then BatchNorm weight ~ N(1, 0.02), bias 0."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.normal_(1.0, 0.02, generator=generator)
                m.bias.zero_()
