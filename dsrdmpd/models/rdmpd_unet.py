"""Stage 2 network: RDDM U-Net with a shared encoder, a residual decoder (no skips) and a
noise decoder (U-Net skips), each optionally with the perceptual decoder's fusion layers
(official ``UnetRes`` with ``condition=True``).

Input: x_in (B, 9, H, W) = concat(x_t, coarse, hazy) with ``input_condition`` (the
authors' later training script), or (B, 6, H, W) = concat(x_t, coarse) without it (their
first script: the hazy image plays no part, and the fusion layers see the coarse image
in its place, as the authors' code does); all in [-1, 1]; t (B,) int64 in [0, T). H and
W must be multiples of 2**(len(dim_mults) - 1) (8 for the paper).
Output: (residual prediction, noise-decoder output), each (B, 3, H, W); the second is
None when only the residual decoder was asked for.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch
from torch import nn

from ..config import WIDTH_MULTIPLES
from .perceptual import ConditionalFeatureFusion
from .unet_blocks import Attention, LinearAttention, PreNormResidual, ResBlock, Resample, TimeMLP

# Cache of per-level fusion terms for one batch of (coarse, hazy): level index -> tensor.
FusionCache = Dict[int, torch.Tensor]


class EncoderLevel(nn.Module):
    def __init__(self, cin: int, cout: int, time_dim: int, last: bool):
        super().__init__()
        self.res1 = ResBlock(cin, cin, time_dim)
        self.res2 = ResBlock(cin, cin, time_dim)
        self.attn = PreNormResidual(cin, LinearAttention(cin))
        self.down = Resample(cin, cout, "same" if last else "down")


class DecoderLevel(nn.Module):
    """Decoder level of width ``width`` that hands ``out_width`` channels to the next one;
    ``skip_width`` > 0 for the noise decoder's concatenated skips."""

    def __init__(self, width: int, out_width: int, skip_width: int, time_dim: int, last: bool):
        super().__init__()
        self.res1 = ResBlock(width + skip_width, width, time_dim)
        self.res2 = ResBlock(width + skip_width, width, time_dim)
        self.attn = PreNormResidual(width, LinearAttention(width))
        self.up = Resample(width, out_width, "same" if last else "up")


class Decoder(nn.Module):
    """Either decoder; ``with_skips`` selects the noise decoder's wiring."""

    def __init__(self, dims: Sequence[int], time_dim: int, with_skips: bool, perceptual: bool):
        super().__init__()
        self.with_skips = with_skips
        pairs = list(zip(dims[:-1], dims[1:]))[::-1]
        n = len(pairs)
        self.levels = nn.ModuleList(
            DecoderLevel(b, a, a if with_skips else 0, time_dim, i == n - 1) for i, (a, b) in enumerate(pairs))
        self.fusions = (nn.ModuleList(ConditionalFeatureFusion(b) for _, b in pairs) if perceptual else None)
        d = dims[0]
        self.final_block = ResBlock(2 * d if with_skips else d, d, time_dim)
        self.head = nn.Conv2d(d, 3, 1)

    def fusion_term(self, i: int, x: torch.Tensor, coarse: torch.Tensor, hazy: torch.Tensor,
                    cache: Optional[FusionCache]) -> torch.Tensor:
        if cache is not None and i in cache:
            return cache[i]
        term = self.fusions[i](coarse, hazy, x.shape[-2:])
        if cache is not None:
            cache[i] = term
        return term

    def fusion_terms(self, coarse: torch.Tensor, hazy: torch.Tensor) -> FusionCache:
        """Every level's fusion term for images (B, 3, H, W) in [-1, 1]: what a forward pass
        fills ``cache`` with (level i runs at 1 / 2**(levels - 1 - i) of the image size);
        empty without the perceptual decoder."""
        if self.fusions is None:
            return {}
        n, (h, w) = len(self.levels), coarse.shape[-2:]
        return {i: self.fusions[i](coarse, hazy, (h >> (n - 1 - i), w >> (n - 1 - i))) for i in range(n)}

    def forward(self, x, temb, skips, stem, coarse, hazy, cache: Optional[FusionCache] = None):
        skips = list(skips)
        for i, level in enumerate(self.levels):
            if self.with_skips:
                x = level.res1(torch.cat((x, skips.pop()), dim=1), temb)
                if self.fusions is not None:
                    x = x + self.fusion_term(i, x, coarse, hazy, cache)
                x = level.res2(torch.cat((x, skips.pop()), dim=1), temb)
                x = level.attn(x)
            else:
                x = level.attn(level.res2(level.res1(x, temb), temb))
                if self.fusions is not None:
                    x = x + self.fusion_term(i, x, coarse, hazy, cache)
            x = level.up(x)
        if self.with_skips:
            x = torch.cat((x, stem), dim=1)
        return self.head(self.final_block(x, temb))


class ResidualDiffusionUNet(nn.Module):
    """Stage-2 denoiser (paper: dim 64, dim_mults (1, 2, 4, 8), 67.5M parameters)."""

    def __init__(self, dim: int = 64, dim_mults: Sequence[int] = (1, 2, 4, 8), perceptual_decoder: bool = True,
                 input_condition: bool = True):
        super().__init__()
        multiple = WIDTH_MULTIPLES["stage2.dim"]
        if dim < multiple or dim % multiple:
            raise ValueError(f"stage-2 dim must be a positive multiple of {multiple} (its GroupNorm groups), got {dim}")
        self.dim, self.dim_mults, self.perceptual_decoder = dim, tuple(dim_mults), perceptual_decoder
        self.input_condition = bool(input_condition)
        dims = [dim] + [dim * m for m in dim_mults]
        time_dim = 4 * dim
        self.stem = nn.Conv2d(self.in_channels, dim, 7, padding=3)
        self.time_embed = TimeMLP(dim)
        pairs = list(zip(dims[:-1], dims[1:]))
        self.encoder = nn.ModuleList(
            EncoderLevel(a, b, time_dim, i == len(pairs) - 1) for i, (a, b) in enumerate(pairs))
        mid = dims[-1]
        self.middle = nn.ModuleDict(dict(res1=ResBlock(mid, mid, time_dim),
                                         attn=PreNormResidual(mid, Attention(mid)),
                                         res2=ResBlock(mid, mid, time_dim)))
        self.residual_decoder = Decoder(dims, time_dim, with_skips=False, perceptual=perceptual_decoder)
        self.noise_decoder = Decoder(dims, time_dim, with_skips=True, perceptual=perceptual_decoder)

    @property
    def in_channels(self) -> int:
        """9 = (x_t, coarse, hazy) with the hazy-image condition, 6 = (x_t, coarse) without."""
        return 9 if self.input_condition else 6

    def network_input(self, x_t: torch.Tensor, coarse: torch.Tensor, hazy: torch.Tensor) -> torch.Tensor:
        """Concatenate the inputs this variant takes (all (B, 3, H, W) in [-1, 1])."""
        return torch.cat((x_t, coarse, hazy) if self.input_condition else (x_t, coarse), dim=1)

    def conditions(self, x_in: torch.Tensor):
        """(coarse, hazy) of a network input, as the fusion layers see them (the coarse image
        in the hazy one's place without the hazy-image condition)."""
        coarse = x_in[:, 3:6]
        return coarse, (x_in[:, 6:9] if self.input_condition else coarse)

    def fusion_cache(self, x_in: torch.Tensor) -> FusionCache:
        """The residual decoder's fusion terms for the network input ``x_in`` (they depend on
        its coarse and hazy parts only): what ``forward(..., fusion_cache={})`` fills in."""
        return self.residual_decoder.fusion_terms(*self.conditions(x_in))

    @property
    def size_multiple(self) -> int:
        return 2 ** (len(self.dim_mults) - 1)

    def forward(self, x_in: torch.Tensor, t: torch.Tensor, *, need_noise_decoder: bool = True,
                fusion_cache: Optional[FusionCache] = None):
        """``fusion_cache`` (a dict, filled on first use) must only be reused for the same
        coarse/hazy batch; it caches the residual decoder's fusion terms."""
        if x_in.dim() != 4 or x_in.shape[1] != self.in_channels:
            raise ValueError(f"stage-2 network expects (B, {self.in_channels}, H, W) input, got {tuple(x_in.shape)}")
        m = self.size_multiple
        if x_in.shape[-2] % m or x_in.shape[-1] % m:
            raise ValueError(f"stage-2 input size {x_in.shape[-2]}x{x_in.shape[-1]} must be a multiple of {m}")
        coarse, hazy = self.conditions(x_in)
        x = self.stem(x_in)
        stem = x
        temb = self.time_embed(t)
        skips = []
        for level in self.encoder:
            x = level.res1(x, temb)
            skips.append(x)
            x = level.attn(level.res2(x, temb))
            skips.append(x)
            x = level.down(x)
        x = self.middle["res2"](self.middle["attn"](self.middle["res1"](x, temb)), temb)
        res = self.residual_decoder(x, temb, (), None, coarse, hazy, fusion_cache)
        noise = self.noise_decoder(x, temb, skips, stem, coarse, hazy) if need_noise_decoder else None
        return res, noise
