"""Inference API: the two-stage pipeline on tensors.

    from dsrdmpd.inference import Dehazer
    dehazer = Dehazer.from_checkpoints("stage1.pth", "model-30.pt", device="cuda")
    result = dehazer(hazy)            # hazy: (B, 3, H, W) in [0, 1], any H, W >= 1
    result.coarse, result.restored    # (B, 3, H, W); restored in [0, 1]

Sizes that break the networks' rules (multiples of 16, at least 64) are padded on the
bottom/right (reflect where the image is large enough, else edge replication) and the
outputs are cropped back. The start noise of each image is drawn from its own CPU
generator seeded with ``seed``, at the padded size, so results do not depend on the
device or on batch-mates.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple, Union

import torch
import torch.nn.functional as F

from .builders import load_stage1, load_stage2
from .config import DEFAULTS, load_config
from .diffusion import ResidualDiffusion
from .models import MCESSUNet
from .models.mcess_unet import STAGE1_MIN_SIZE, STAGE1_MULTIPLE


@dataclass
class DehazeResult:
    coarse: torch.Tensor     # (B, 3, H, W) stage-1 output, unclamped
    restored: torch.Tensor   # (B, 3, H, W) final output in [0, 1]


def padded_size(h: int, w: int, multiple: int = STAGE1_MULTIPLE, minimum: int = STAGE1_MIN_SIZE) -> Tuple[int, int]:
    up = lambda n: max(minimum, -(-n // multiple) * multiple)
    return up(h), up(w)


def pad_to(x: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """Pad (B, C, h, w) on the bottom/right to ``size``: reflect when each pad is smaller
    than the side, else replicate."""
    h, w = x.shape[-2:]
    ph, pw = size[0] - h, size[1] - w
    if ph == 0 and pw == 0:
        return x
    mode = "reflect" if ph < h and pw < w else "replicate"
    return F.pad(x, (0, pw, 0, ph), mode=mode)


class Dehazer:
    """Both stages, ready to run. Models are put in eval mode on ``device``."""

    def __init__(self, stage1: MCESSUNet, stage2: ResidualDiffusion, device: Union[str, torch.device] = "cpu",
                 seed: int = 0, eta: float = 0.0, fast: bool = True, steps: Optional[int] = None):
        self.device = torch.device(device)
        self.stage1 = stage1.to(self.device).eval()
        self.stage2 = stage2.to(self.device).eval()
        self.seed, self.eta, self.fast = seed, eta, fast
        self.steps = steps or stage2.sampling_timesteps

    @classmethod
    def from_checkpoints(cls, stage1: str, stage2: str, config: Union[None, str, Dict[str, Any]] = None,
                         device: Union[str, torch.device] = "cpu", weights: str = "model", **kwargs) -> "Dehazer":
        """Load both stages. ``config``: a dict or YAML path whose ``stage1`` / ``stage2``
        sections give the sizes; None reads them off the checkpoints. ``weights``: 'model' or
        'ema' for stage 2. Sampling options default to the config's ``sampling`` section."""
        if isinstance(config, str):
            config = load_config(config)
        s1 = load_stage1(stage1, None if config is None else config.get("stage1"))
        s2 = load_stage2(stage2, None if config is None else config.get("stage2"), weights=weights)
        sampling = {**DEFAULTS["sampling"], **((config or {}).get("sampling") or {})}
        opts = {"seed": sampling["seed"], "eta": sampling["eta"], "fast": sampling["fast"], **kwargs}
        return cls(s1, s2, device=device, **opts)

    @torch.no_grad()
    def coarse(self, hazy: torch.Tensor) -> torch.Tensor:
        """Stage 1 only on an already padded (B, 3, H, W) batch."""
        return self.stage1(hazy)

    @torch.no_grad()
    def __call__(self, hazy: torch.Tensor, seed: Optional[int] = None,
                 noise: Optional[torch.Tensor] = None) -> DehazeResult:
        if hazy.dim() == 3:
            hazy = hazy.unsqueeze(0)
        if hazy.dim() != 4 or hazy.shape[1] != 3:
            raise ValueError(f"expected hazy images of shape (B, 3, H, W) in [0, 1], got {tuple(hazy.shape)}")
        h, w = hazy.shape[-2:]
        size = padded_size(h, w)
        x = pad_to(hazy.to(self.device, torch.float32), size)
        if noise is not None and tuple(noise.shape[-2:]) != size:
            raise ValueError(f"start noise must have the padded size {size}, got {tuple(noise.shape[-2:])}")
        c = self.stage1(x)
        restored = self.stage2.sample(c, x, noise=noise, seed=self.seed if seed is None else seed,
                                      steps=self.steps, eta=self.eta, fast=self.fast)
        return DehazeResult(c[..., :h, :w], restored[..., :h, :w])

    dehaze = __call__
