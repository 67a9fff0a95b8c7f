"""Residual diffusion (RDDM) around the stage-2 network: forward process, the
``pred_res`` L1 training loss and the deterministic few-step sampler.

Public tensors are images in [0, 1] of shape (B, 3, H, W); internally everything is
mapped to [-1, 1] as in the official code.
"""
from __future__ import annotations

import hashlib
import math
from typing import Callable, Optional, Sequence

import torch
from torch import nn
import torch.nn.functional as F

from ..models.rdmpd_unet import ResidualDiffusionUNet
from .schedule import RDDMSchedule

OBJECTIVES = ("pred_res",)


def to_signed(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] -> [-1, 1]."""
    return x * 2 - 1


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1]."""
    return (x + 1) * 0.5


def start_noise(shape: Sequence[int], seed: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Device-independent start noise: one CPU generator seeded with ``seed`` per image,
    so an image's noise does not depend on its batch-mates. Returns (B, C, H, W)."""
    b, *rest = shape
    per_image = [torch.randn((1, *rest), generator=torch.Generator().manual_seed(int(seed))) for _ in range(b)]
    return torch.cat(per_image).to(device=device, dtype=dtype)


NOISE_BLOCK = 256      # side of the squares that window noise is assembled from


def _block_seed(seed: int, by: int, bx: int) -> int:
    digest = hashlib.blake2b(f"dsrdmpd-noise:{int(seed)}:{by}:{bx}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2 ** 63 - 1)


def window_noise(seed: int, y: int, x: int, h: int, w: int, channels: int = 3) -> torch.Tensor:
    """Start noise of the window [y, y + h) x [x, x + w) of an unbounded noise field: the
    field is made of NOISE_BLOCK-pixel squares, each drawn from its own CPU generator keyed
    by (seed, square position), so any window of a scene can be made without the rest (tiled
    and streamed scenes get the same noise). Returns (1, channels, h, w)."""
    b = NOISE_BLOCK
    out = torch.empty(1, channels, h, w)
    for by in range(y // b, (y + h - 1) // b + 1):
        for bx in range(x // b, (x + w - 1) // b + 1):
            block = torch.randn((1, channels, b, b), generator=torch.Generator().manual_seed(_block_seed(seed, by, bx)))
            y0, y1 = max(y, by * b), min(y + h, (by + 1) * b)
            x0, x1 = max(x, bx * b), min(x + w, (bx + 1) * b)
            out[..., y0 - y:y1 - y, x0 - x:x1 - x] = block[..., y0 - by * b:y1 - by * b, x0 - bx * b:x1 - bx * b]
    return out


class ResidualDiffusion(nn.Module):
    """Stage 2 (RDMPD). ``net`` is a :class:`ResidualDiffusionUNet`."""

    def __init__(self, net: ResidualDiffusionUNet, timesteps: int = 1000, sampling_timesteps: int = 5,
                 objective: str = "pred_res", sum_scale: float = 1.0):
        super().__init__()
        if objective not in OBJECTIVES:
            raise ValueError(f"objective {objective!r} is not supported (supported: {OBJECTIVES})")
        self.net = net
        self.objective = objective
        self.sampling_timesteps = sampling_timesteps
        self.schedule = RDDMSchedule.build(timesteps, sum_scale)
        for name, value in self.schedule.official_buffers().items():
            self.register_buffer(name, value.clone(), persistent=False)

    @property
    def num_timesteps(self) -> int:
        return self.schedule.timesteps

    @property
    def sum_scale(self) -> float:
        return self.schedule.sum_scale

    # ------------------------------------------------------------------ training
    def q_sample(self, gt: torch.Tensor, res: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = gt + abar_t * res + bbar_t * eps (all in [-1, 1])."""
        abar = self.alphas_cumsum.gather(0, t).view(-1, 1, 1, 1)
        bbar = self.betas_cumsum.gather(0, t).view(-1, 1, 1, 1)
        return gt + abar * res + bbar * noise

    def training_loss(self, gt: torch.Tensor, coarse: torch.Tensor, hazy: torch.Tensor,
                      t: Optional[torch.Tensor] = None, noise: Optional[torch.Tensor] = None,
                      generator: Optional[torch.Generator] = None, full_network: bool = False) -> torch.Tensor:
        """Mean L1 between the residual decoder's output and res = coarse - gt ([-1, 1] units).

        Images (B, 3, H, W) in [0, 1]; ``t`` (B,) int64 and ``noise`` (B, 3, H, W) are drawn
        when not given. ``full_network`` also runs the (unused) noise decoder, as the
        official code does; the loss is the same either way.
        """
        gt, coarse, hazy = to_signed(gt), to_signed(coarse), to_signed(hazy)
        b = gt.shape[0]
        if t is None:
            t = torch.randint(0, self.num_timesteps, (b,), generator=generator).to(gt.device)
        if noise is None:
            noise = torch.randn(gt.shape, generator=generator).to(gt.device, gt.dtype)
        res = coarse - gt
        x_t = self.q_sample(gt, res, t, noise)
        pred_res, _ = self.net(self.net.network_input(x_t, coarse, hazy), t, need_noise_decoder=full_network)
        return F.l1_loss(pred_res, res, reduction="none").flatten(1).mean(1).mean()

    def forward(self, gt, coarse, hazy, t=None, noise=None, generator=None):
        """Training loss (so that DDP wrappers see it as the forward pass)."""
        return self.training_loss(gt, coarse, hazy, t=t, noise=noise, generator=generator)

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def sample(self, coarse: torch.Tensor, hazy: torch.Tensor, *, noise: Optional[torch.Tensor] = None,
               seed: Optional[int] = 0, steps: Optional[int] = None, eta: float = 0.0, fast: bool = True,
               generator: Optional[torch.Generator] = None, return_start: bool = False,
               network: Optional[Callable[[torch.Tensor, torch.Tensor, Optional[dict]], torch.Tensor]] = None):
        """Deterministic (eta = 0) RDDM sampling. ``coarse``, ``hazy``: (B, 3, H, W) in [0, 1].

        ``noise``: explicit start noise eps (B, 3, H, W); otherwise drawn with
        :func:`start_noise` from ``seed``. ``fast`` caches the fusion terms across steps and
        skips the noise decoder (results equal the straightforward path to float rounding).
        With eta > 0 the extra noise comes from ``generator`` (CPU). ``network(x_in, t,
        cache)`` stands in for each step's network call (x_in (B, C_in, H, W) from
        ``net.network_input``, t (B,) int64, the fusion cache dict or None with ``fast``
        off; returns the residual prediction (B, 3, H, W) before clamping), e.g. a compiled
        program of it. Returns the restored image in [0, 1] (and (x_T + 1) / 2 if
        ``return_start``).
        """
        steps = steps or self.sampling_timesteps
        c, x_cond = to_signed(coarse), to_signed(hazy)
        if noise is None:
            noise = start_noise(c.shape, 0 if seed is None else seed, c.device, c.dtype)
        elif noise.shape != c.shape:
            raise ValueError(f"start noise shape {tuple(noise.shape)} != image shape {tuple(c.shape)}")
        img = c + math.sqrt(self.sum_scale) * noise.to(c)
        start = img
        cache = {} if fast else None
        times = self.schedule.sampling_times(steps)
        for t, t_next in zip(times[:-1], times[1:]):
            tt = torch.full((c.shape[0],), t, device=c.device, dtype=torch.long)
            x_in = self.net.network_input(img, c, x_cond)
            if network is None:
                out, _ = self.net(x_in, tt, need_noise_decoder=not fast, fusion_cache=cache)
            else:
                out = network(x_in, tt, cache)
            pred_res = out.clamp(-1, 1)
            x0 = (c - pred_res).clamp(-1, 1)
            if t_next < 0:
                img = x0
                break
            abar, abar_next = self.alphas_cumsum[t], self.alphas_cumsum[t_next]
            b2bar, b2bar_next = self.betas2_cumsum[t], self.betas2_cumsum[t_next]
            sigma2 = eta * ((b2bar - b2bar_next) * b2bar_next / b2bar)
            k = (b2bar_next - sigma2).sqrt() / self.betas_cumsum[t]
            img = k * img + (1 - k) * x0 + (abar_next - abar * k) * pred_res
            if eta > 0:
                img = img + sigma2.sqrt() * torch.randn(img.shape, generator=generator).to(img)
        out = to_unit(img)
        return (out, to_unit(start)) if return_start else out
