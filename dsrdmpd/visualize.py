"""Side-by-side comparison panels (PNG): labelled tiles in one row.

Tiles are (3, H, W) or (1, 3, H, W) tensors in [0, 1] (clamped); ``error_map`` turns
|restored - GT| into a heat map scaled so that ``scale`` (default 0.25) is full red.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

def error_map(pred: torch.Tensor, gt: torch.Tensor, scale: float = 0.25) -> torch.Tensor:
    """Mean absolute error over channels, black (0) -> yellow -> red (>= scale)."""
    e = ((pred.float() - gt.float()).abs().mean(dim=-3, keepdim=True) / scale).clamp(0, 1)
    r = (2 * e).clamp(0, 1)
    g = (2 - 2 * e).clamp(0, 1) * (e > 0).float() * (2 * e).clamp(0, 1)
    return torch.cat([r, g, torch.zeros_like(e)], dim=-3)


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)     # scalable (Pillow >= 10.1 with FreeType)
    except (TypeError, OSError):
        return ImageFont.load_default()


def make_panel(tiles: Sequence[Tuple[str, torch.Tensor]], gap: int = 6, captions: Optional[Sequence[str]] = None,
               min_size: int = 0) -> Image.Image:
    """One row of labelled tiles; ``captions`` (e.g. PSNR) go under each tile. Tiles smaller
    than ``min_size`` pixels (height) are enlarged by an integer factor, nearest neighbour,
    so small images stay legible without invented detail."""
    arrays = []
    for label, t in tiles:
        t = t.detach().float().cpu()
        t = t[0] if t.dim() == 4 else t
        arrays.append((label, (t.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()))
    h0 = max(a.shape[0] for _, a in arrays)
    zoom = max(1, -(-min_size // h0)) if min_size else 1
    big = max(zoom * h0, 64)
    font = _font(max(12, min(22, big // 12)))
    label_h = font.getbbox("Ag")[3] + 8
    cap_h = label_h if captions else 0
    w = sum(a.shape[1] * zoom for _, a in arrays) + gap * (len(arrays) - 1)
    canvas = Image.new("RGB", (w, zoom * h0 + label_h + cap_h), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    x = 0
    for k, (label, a) in enumerate(arrays):
        img = Image.fromarray(np.ascontiguousarray(a))
        if zoom > 1:
            img = img.resize((a.shape[1] * zoom, a.shape[0] * zoom), Image.NEAREST)
        canvas.paste(img, (x, label_h))
        draw.text((x + 3, 3), label, fill=(0, 0, 0), font=font)
        if captions and k < len(captions) and captions[k]:
            draw.text((x + 3, label_h + zoom * h0 + 3), captions[k], fill=(0, 0, 0), font=font)
        x += a.shape[1] * zoom + gap
    return canvas


def save_panel(tiles: Sequence[Tuple[str, torch.Tensor]], path: Union[str, Path],
               captions: Optional[Sequence[str]] = None, min_size: int = 0) -> None:
    from .imageio import write_atomic
    panel = make_panel(tiles, captions=captions, min_size=min_size)
    write_atomic(Path(path), lambda p: panel.save(p))


def stack_panels(paths: Sequence[Union[str, Path]], path: Union[str, Path], gap: int = 10) -> None:
    """Panel PNGs one under the other (left-aligned, white between) in one PNG, written atomically."""
    from .imageio import write_atomic
    images = [Image.open(p).convert("RGB") for p in paths]
    canvas = Image.new("RGB", (max(i.width for i in images), sum(i.height for i in images) + gap * (len(images) - 1)),
                       (255, 255, 255))
    y = 0
    for img in images:
        canvas.paste(img, (0, y))
        y += img.height + gap
    write_atomic(Path(path), lambda p: canvas.save(p))
