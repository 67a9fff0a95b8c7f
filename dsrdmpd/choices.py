"""The values the commands offer and their default limits, importable without torch or
NumPy, so that a command answers ``--help`` and usage errors before loading them.

Each value belongs to the module that acts on it and is re-exported there
(``inference.PRECISIONS``, ``metrics.PROTOCOLS``, ``imageio.IMAGE_EXTENSIONS``, ...);
it is defined once, here.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import List

# inference: numeric precision of a Dehazer (README "Fast inference paths")
PRECISIONS = ("fp32", "tf32", "bf16", "bf16-stage1")

# metrics: the named metric protocols, name -> the line that reports name them by
PROTOCOLS = {
    "paper": "paper protocol: float RGB clamped to [0,1]; SSIM Gaussian 11x11 (sigma 1.5), zero padding, borders included",
    "standard": "standard protocol: uint8 RGB; SSIM Gaussian 11x11 (sigma 1.5), valid region only (BasicSR / skimage)",
    "y": "y protocol: BT.601 luma Y = 16 + 65.481 R + 128.553 G + 24.966 B of [0,1] RGB, float64 on the 0-255 "
         "scale; SSIM Gaussian 11x11 (sigma 1.5), valid region only (BasicSR test_y_channel)",
}

# imageio: the files a folder run picks up, and which of them are TIFFs (satellite rasters)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
TIFF_EXTENSIONS = (".tif", ".tiff")
APPLEDOUBLE_MAGIC = b"\x00\x05\x16\x07"     # '._name' files macOS leaves beside files it copies


def is_image_file(path) -> bool:
    """Whether a folder run picks up ``path`` (a ``pathlib.Path``): a file or a link (a broken
    link too: its item then fails, named, instead of vanishing from the run) with an image
    extension, any case, that is not a macOS AppleDouble file (``._photo.jpg`` holds the
    metadata of ``photo.jpg``, not an image: named '._' and starting with its magic number)."""
    if path.suffix.lower() not in IMAGE_EXTENSIONS or not (path.is_file() or (path.is_symlink() and not path.is_dir())):
        return False
    if path.name.startswith("._"):
        try:
            with open(path, "rb") as f:
                return f.read(4) != APPLEDOUBLE_MAGIC
        except OSError:             # unreadable: picked up, and its item fails with the reason
            return True
    return True


# pixel limits (0 or None on the command line: no limit)
DEFAULT_MAX_PIXELS = 100_000_000    # imageio: 100 Mpx, ~1.2 GB per float32 RGB copy; a run holds a few copies
DEFAULT_MAX_UNTILED_PIXELS = 2048 * 2048        # evaluation: larger images run in tiles
DEFAULT_MAX_RASTER_PIXELS = 4_000_000_000       # raster: ~63000 x 63000; a 4-band uint16 scene this size is 32 GB


# raster: the forms of --scale (values -> [0, 1] per band; radiometry resolves them per file)
@dataclass(frozen=True)
class ScaleSpec:
    kind: str            # 'auto' | 'range' | 'percentiles' | 'dtype'
    a: float = 0.0
    b: float = 0.0

    def __str__(self) -> str:
        if self.kind == "range":
            return f"{self.a:g},{self.b:g}"
        if self.kind == "percentiles":
            return f"p{self.a:g},p{self.b:g}"
        return self.kind


_NUM = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"


def parse_scale(text: str) -> ScaleSpec:
    """'auto' | 'dtype' | 'LO,HI' | 'pA,pB' -> ScaleSpec; ValueError with the accepted forms."""
    t = text.strip().lower().replace(" ", "")
    if t in ("auto", "dtype"):
        return ScaleSpec(t)
    m = re.fullmatch(rf"p({_NUM}),p({_NUM})", t)
    if m:
        a, b = float(m.group(1)), float(m.group(2))
        if not 0 <= a < b <= 100:
            raise ValueError(f"--scale {text}: percentiles must satisfy 0 <= A < B <= 100")
        return ScaleSpec("percentiles", a, b)
    m = re.fullmatch(rf"({_NUM}),({_NUM})", t)
    if m:
        a, b = float(m.group(1)), float(m.group(2))
        if not math.isfinite(b - a):        # 1e400 reads as infinity: every value would map to 0
            raise ValueError(f"--scale {text}: LO, HI and HI - LO must be finite numbers")
        if not a < b:
            raise ValueError(f"--scale {text}: LO must be below HI")
        return ScaleSpec("range", a, b)
    raise ValueError(f"--scale {text!r}: expected auto, dtype, LO,HI (e.g. 0,4095) or pA,pB (e.g. p0.5,p99.5)")


# raster: --bands, the 1-based red, green and blue bands
def parse_bands(text: str) -> List[int]:
    """'4,3,2' -> [4, 3, 2]; three distinct positive integers."""
    try:
        bands = [int(b) for b in text.replace(" ", "").split(",")]
    except ValueError:
        raise ValueError(f"--bands {text!r}: expected three band numbers such as 3,2,1") from None
    if len(bands) != 3 or len(set(bands)) != 3 or min(bands) < 1:
        raise ValueError(f"--bands {text!r}: expected three different band numbers (1-based) such as 3,2,1")
    return bands
