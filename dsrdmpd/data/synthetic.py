"""Small synthetic hazy / clear datasets for tests and the demo (no downloads).

Clear images are random crops of the photographs and textures that ship inside
scikit-image (textures are tinted to look like terrain); haze follows the atmospheric
scattering model I = J t + A (1 - t), with t = exp(-beta d) over a smooth random depth
map d, airlight A near white. Written in the RSID layout ``{train,test[,valid]}/{hazy,GT}/*.png``.
Everything is a function of ``seed``.
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from ..imageio import write_image

RGB_SOURCES = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "retina", "immunohistochemistry")
TEXTURE_SOURCES = (("grass", (0.45, 0.75, 0.35)), ("gravel", (0.75, 0.65, 0.5)), ("brick", (0.8, 0.5, 0.4)))


def source_images() -> List[torch.Tensor]:
    """The clear source images, (3, H, W) in [0, 1]."""
    from skimage import data
    out = []
    for name in RGB_SOURCES:
        img = getattr(data, name)()
        out.append(torch.from_numpy(np.ascontiguousarray(img[..., :3])).permute(2, 0, 1).float() / 255)
    for name, tint in TEXTURE_SOURCES:
        g = torch.from_numpy(getattr(data, name)()).float() / 255
        out.append(torch.stack([g * c for c in tint]).clamp(0, 1))
    return out


def add_haze(clear: torch.Tensor, g: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
    """Atmospheric scattering on a (3, H, W) clear image; returns (hazy, transmission)."""
    h, w = clear.shape[-2:]
    coarse = torch.rand((1, 1, 4, 4), generator=g)
    depth = F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=True)[0].clamp(0, 1)
    beta = 0.6 + 1.4 * float(torch.rand((), generator=g))
    t = torch.exp(-beta * depth)
    airlight = (0.8 + 0.15 * torch.rand((), generator=g)) + 0.04 * torch.rand((3, 1, 1), generator=g)
    return (clear * t + airlight.clamp(0, 1) * (1 - t)).clamp(0, 1), t


def random_crop(img: torch.Tensor, size: int, g: torch.Generator) -> torch.Tensor:
    h, w = img.shape[-2:]
    if min(h, w) < size:
        img = F.interpolate(img[None], scale_factor=size / min(h, w) + 1e-3, mode="bilinear", align_corners=False)[0]
        h, w = img.shape[-2:]
    top = int(torch.randint(0, h - size + 1, (1,), generator=g))
    left = int(torch.randint(0, w - size + 1, (1,), generator=g))
    return img[:, top:top + size, left:left + size]


def make_synthetic_dataset(root: Union[str, Path], n_train: int = 24, n_test: int = 6, size: int = 64,
                           seed: int = 0, n_valid: int = 0) -> Path:
    """Write a paired dataset under ``root``; the test split uses sources the training
    split does not (the last two), so test scenes are unseen. ``n_valid`` > 0 adds a
    ``valid`` split (training sources, other crops and haze) for checkpoint selection."""
    root = Path(root)
    g = torch.Generator().manual_seed(seed)
    sources = source_images()
    splits = {"train": (n_train, sources[:-2]), "test": (n_test, sources[-2:])}
    if n_valid:
        splits["valid"] = (n_valid, sources[:-2])
    for split, (n, pool) in splits.items():
        for i in range(n):
            src = pool[int(torch.randint(0, len(pool), (1,), generator=g))]
            scale = 0.25 + 0.5 * float(torch.rand((), generator=g))
            small = F.interpolate(src[None], scale_factor=scale, mode="area")[0] if scale < 1 else src
            clear = random_crop(small, size, g)
            if torch.rand((), generator=g) < 0.5:
                clear = clear.flip(-1)
            hazy, _ = add_haze(clear, g)
            write_image(clear, root / split / "GT" / f"{i:04d}.png")
            write_image(hazy, root / split / "hazy" / f"{i:04d}.png")
    return root
