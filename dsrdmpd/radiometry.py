"""Radiometric mapping between a raster's values and the networks' [0, 1] RGB, and back.

Per band, a linear stretch ``u = (v - lo) / (hi - lo)`` clipped to [0, 1]. Where it is
chosen from (``--scale``):

* ``auto`` (default): 8-bit data -> ``0,255``; any other type -> ``p0.5,p99.5``.
* ``LO,HI`` (e.g. ``0,4095`` for 12-bit data, ``0,10000`` for reflectance x 10000,
  ``0,1`` for float reflectance): the same fixed range for every band.
* ``pA,pB`` (e.g. ``p0.5,p99.5``): the A-th and B-th percentiles of each band's valid
  pixels (nodata and masked pixels left out), from a decimated read of the scene.
* ``dtype``: the full range of an integer type (e.g. 0..65535 for uint16).

The way back is exact: ``v' = lo + u' (hi - lo) + (v - clip(v, lo, hi))`` puts back what
the clip took off (haze-free highlights above ``hi`` keep their excess), then rounds and
clips to the output type. With the networks replaced by the identity, every value comes
back unchanged (tested).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import List, Optional, Sequence

import numpy as np
import torch


class ScaleError(ValueError):
    """A --scale that cannot be used for this file."""


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


@dataclass
class BandScale:
    """The mapping of each dehazed band: ``lo`` / ``hi`` per band (float64), and the value
    that replaces invalid pixels for the networks (per band, in [0, 1])."""
    lo: np.ndarray
    hi: np.ndarray
    fill: np.ndarray
    spec: ScaleSpec
    dtype: str

    def describe(self, band_numbers: Sequence[int]) -> str:
        parts = [f"band {b}: {_fmt(lo)}..{_fmt(hi)}" for b, lo, hi in zip(band_numbers, self.lo, self.hi)]
        return f"{self.spec} ({'; '.join(parts)})"

    def to_unit(self, values: np.ndarray, valid: Optional[np.ndarray] = None) -> torch.Tensor:
        """(C, h, w) raster values -> (C, h, w) float32 tensor in [0, 1]; invalid pixels
        (``valid`` False, (h, w)) get the fill value."""
        v = values.astype(np.float64)
        u = np.clip((v - self.lo[:, None, None]) / (self.hi - self.lo)[:, None, None], 0, 1)
        if valid is not None:
            u = np.where(valid[None], u, self.fill[:, None, None])
        return torch.from_numpy(u.astype(np.float32))

    def from_unit(self, unit: torch.Tensor, original: np.ndarray, out_dtype) -> np.ndarray:
        """(C, h, w) network output in [0, 1] -> values in the input's units and ``out_dtype``,
        with the part of ``original`` that the stretch clipped off put back."""
        # float32 is exact enough for integer data up to 16 bits (rounding error << 0.5); else float64
        small = np.dtype(out_dtype).kind in "ui" and np.dtype(out_dtype).itemsize <= 2
        ft = np.float32 if small else np.float64
        lo, hi = self.lo[:, None, None].astype(ft), self.hi[:, None, None].astype(ft)
        v = original.astype(ft)
        excess = v - np.clip(v, lo, hi)
        out = lo + unit.numpy().astype(ft) * (hi - lo) + excess
        return cast_to(out, out_dtype)


def cast_to(values: np.ndarray, dtype) -> np.ndarray:
    """float values -> ``dtype``, rounded to nearest and clipped for integer types."""
    dtype = np.dtype(dtype)
    if dtype.kind in "ui":
        info = np.iinfo(dtype)
        return np.clip(np.rint(values), info.min, info.max).astype(dtype)
    return values.astype(dtype)


def _fmt(x: float) -> str:
    return f"{x:.6g}"


def resolve_scale(spec: ScaleSpec, dtype, sample: np.ndarray, valid: Optional[np.ndarray],
                  name: str = "") -> BandScale:
    """The per-band mapping for data of ``dtype``. ``sample``: (C, h, w) decimated values,
    ``valid``: (h, w) bool (None: all valid), used for percentiles and the fill value."""
    dtype = np.dtype(dtype)
    kind = spec
    if spec.kind == "auto":
        kind = ScaleSpec("range", 0, 255) if dtype == np.uint8 else ScaleSpec("percentiles", 0.5, 99.5)
    channels = sample.shape[0]
    mask = np.ones(sample.shape[1:], bool) if valid is None else valid
    values: List[np.ndarray] = [sample[c][mask].astype(np.float64) for c in range(channels)]
    values = [v[np.isfinite(v)] for v in values]
    if any(v.size == 0 for v in values):
        raise ScaleError(f"{name}: no valid pixels to scale (every pixel is nodata or masked)")
    if kind.kind == "dtype":
        if dtype.kind not in "ui":
            raise ScaleError(f"{name}: --scale dtype needs integer data, this file holds {dtype.name}")
        info = np.iinfo(dtype)
        lo, hi = np.full(channels, float(info.min)), np.full(channels, float(info.max))
    elif kind.kind == "range":
        lo, hi = np.full(channels, kind.a), np.full(channels, kind.b)
    else:
        q = np.array([np.percentile(v, [kind.a, kind.b]) for v in values])
        lo, hi = q[:, 0], q[:, 1]
        flat = hi <= lo                       # a constant band: any width maps it the same way
        hi = np.where(flat, lo + (1.0 if dtype.kind in "ui" else max(1e-6, 1e-6 * float(np.abs(lo).max()))), hi)
    fill = np.array([np.clip((np.median(v) - l) / (h - l), 0, 1) for v, l, h in zip(values, lo, hi)])
    return BandScale(lo.astype(np.float64), hi.astype(np.float64), fill, kind if spec.kind == "auto" else spec,
                     dtype.name)
