"""Side-by-side comparison panels (PNG): labelled tiles in one row.

Tiles are (3, H, W) or (1, 3, H, W) tensors in [0, 1] (clamped); ``error_map`` turns
|restored - GT| into a heat map scaled so that ``scale`` (default 0.25) is full red.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image, ImageDraw

LABEL_HEIGHT = 16


def error_map(pred: torch.Tensor, gt: torch.Tensor, scale: float = 0.25) -> torch.Tensor:
    """Mean absolute error over channels, black (0) -> yellow -> red (>= scale)."""
    e = ((pred.float() - gt.float()).abs().mean(dim=-3, keepdim=True) / scale).clamp(0, 1)
    r = (2 * e).clamp(0, 1)
    g = (2 - 2 * e).clamp(0, 1) * (e > 0).float() * (2 * e).clamp(0, 1)
    return torch.cat([r, g, torch.zeros_like(e)], dim=-3)


def make_panel(tiles: Sequence[Tuple[str, torch.Tensor]], gap: int = 4) -> Image.Image:
    arrays = []
    for label, t in tiles:
        t = t.detach().float().cpu()
        t = t[0] if t.dim() == 4 else t
        arrays.append((label, (t.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()))
    h = max(a.shape[0] for _, a in arrays)
    w = sum(a.shape[1] for _, a in arrays) + gap * (len(arrays) - 1)
    canvas = Image.new("RGB", (w, h + LABEL_HEIGHT), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    x = 0
    for label, a in arrays:
        canvas.paste(Image.fromarray(np.ascontiguousarray(a)), (x, LABEL_HEIGHT))
        draw.text((x + 2, 2), label, fill=(0, 0, 0))
        x += a.shape[1] + gap
    return canvas


def save_panel(tiles: Sequence[Tuple[str, torch.Tensor]], path: Union[str, Path]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    make_panel(tiles).save(path)
