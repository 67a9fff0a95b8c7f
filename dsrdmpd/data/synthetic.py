"""Small synthetic hazy / clear datasets for tests and the demo (no downloads).

Clear images are random crops of the photographs and textures that ship inside
scikit-image (textures are tinted to look like terrain); haze follows the atmospheric
scattering model I = J t + A (1 - t), with t = exp(-beta d) over a smooth random depth
map d, airlight A near white. Written in the RSID layout ``{train,test[,valid]}/{hazy,GT}/*.png``.
Everything is a function of ``seed``.
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from ..imageio import write_image

RGB_SOURCES = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "retina", "immunohistochemistry")
HELD_OUT = 0.3          # share of every source image kept for the test split
TEST_SEED_OFFSET = 1 << 32  # the test split has its own generator
FLAT_STD = 0.04         # crops with less contrast than this are redrawn
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
    """Atmospheric scattering on a (3, H, W) clear image; returns (hazy, transmission).
    The depth map has one random control point per 16 pixels (4 x 4 at 64 x 64), so haze
    varies over the same distances at every scene size."""
    h, w = clear.shape[-2:]
    coarse = torch.rand((1, 1, max(4, round(h / 16)), max(4, round(w / 16))), generator=g)
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


def split_regions(src: torch.Tensor, held_out: float = HELD_OUT) -> Tuple[torch.Tensor, torch.Tensor]:
    """(training part, held-out part) of a (3, H, W) image: the last ``held_out`` of its
    longer side is held out, so no held-out pixel is ever seen in training."""
    axis = -1 if src.shape[-1] >= src.shape[-2] else -2
    cut = round(src.shape[axis] * (1 - held_out))
    return src.narrow(axis, 0, cut), src.narrow(axis, cut, src.shape[axis] - cut)


def scene(region: torch.Tensor, size: int, g: torch.Generator, tries: int = 20) -> torch.Tensor:
    """A (3, size, size) crop of ``region`` at a random scale in [0.25, 0.75] (more if the
    region is too small for the crop), randomly mirrored; near-flat crops are redrawn."""
    lo = max(0.25, size / min(region.shape[-2:]))
    for _ in range(tries):
        scale = min(1.0, lo + max(0.0, 0.75 - lo) * float(torch.rand((), generator=g)))
        small = F.interpolate(region[None], scale_factor=scale, mode="area")[0] if scale < 1 else region
        clear = random_crop(small, size, g)
        if torch.rand((), generator=g) < 0.5:
            clear = clear.flip(-1)
        if float(clear.std()) > FLAT_STD:
            break
    return clear


def make_synthetic_dataset(root: Union[str, Path], n_train: int = 24, n_test: int = 6, size: int = 64,
                           seed: int = 0, n_valid: int = 0, test_size: Optional[int] = None) -> Path:
    """Write a paired dataset under ``root``. Every source image is split in two
    (``split_regions``): training and validation crops come from the first part, test crops
    from the held-out part, so test scenes are unseen pixels of the same kinds of scene.
    Test scenes cycle through the sources (in a seeded order), are ``test_size`` pixels
    (default ``size``) and do not depend on ``n_train`` / ``n_valid``. ``n_valid`` > 0 adds a
    ``valid`` split (other crops and haze of the training parts) for checkpoint selection."""
    root = Path(root)
    parts = [split_regions(s) for s in source_images()]
    g = torch.Generator().manual_seed(seed)
    for split, n in (("train", n_train), ("valid", n_valid)):
        for i in range(n):
            clear = scene(parts[int(torch.randint(0, len(parts), (1,), generator=g))][0], size, g)
            _write_pair(root / split, i, clear, g)
    g = torch.Generator().manual_seed(TEST_SEED_OFFSET + seed)      # test scenes: independent of n_train
    order = torch.randperm(len(parts), generator=g).tolist()
    for i in range(n_test):
        clear = scene(parts[order[i % len(parts)]][1], test_size or size, g)
        _write_pair(root / "test", i, clear, g)
    return root


def _write_pair(folder: Path, i: int, clear: torch.Tensor, g: torch.Generator) -> None:
    hazy, _ = add_haze(clear, g)
    write_image(clear, folder / "GT" / f"{i:04d}.png")
    write_image(hazy, folder / "hazy" / f"{i:04d}.png")
