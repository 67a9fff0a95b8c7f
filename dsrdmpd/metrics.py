"""Image quality metrics under two named protocols.

``paper``    the authors' evaluation code: float RGB in [0, 1] (both images clamped),
             PSNR = 20 log10(1 / RMSE); SSIM with an 11x11 Gaussian window (sigma 1.5),
             per channel, zero padding of 5 ("same" size, borders count), mean of the map.
``standard`` BasicSR / scikit-image style: images rounded to uint8 RGB, PSNR on the
             0-255 scale; SSIM with the same Gaussian window over the valid region only
             (no padding), population covariance, computed in float64.
``y``        BasicSR's Y-channel protocol: BT.601 luma of the [0, 1] RGB,
             Y = 16 + 65.481 R + 128.553 G + 24.966 B (on the 16-235 scale), in float64;
             PSNR on the 0-255 scale, SSIM as ``standard`` on that one channel.
:func:`ciede2000` is an extra colour-difference score (not a protocol): the mean over the
image of scikit-image's CIEDE2000 between the two images' CIELAB values.
Inputs: (3, H, W) or (B, 3, H, W) tensors in [0, 1]; outputs: per-image float lists.
"""
from __future__ import annotations

import math
from typing import Dict, List

import torch
import torch.nn.functional as F

from .choices import PROTOCOLS  # noqa: F401  (the protocols' names and descriptions; re-exported)

BT601_Y = (65.481, 128.553, 24.966)     # BasicSR's luma weights for R, G, B in [0, 1]; offset 16


def _batch(x: torch.Tensor) -> torch.Tensor:
    return x.unsqueeze(0) if x.dim() == 3 else x


def gaussian_kernel(size: int = 11, sigma: float = 1.5, dtype=torch.float32) -> torch.Tensor:
    """The normalised 1-D Gaussian (size,) of SSIM's window, computed in float64."""
    coords = torch.arange(size, dtype=torch.float64) - size // 2
    g = torch.exp(-(coords ** 2) / (2 * sigma ** 2))
    return (g / g.sum()).to(dtype)


def gaussian_window(size: int = 11, sigma: float = 1.5, dtype=torch.float32) -> torch.Tensor:
    """SSIM's (size, size) window as the authors' code builds it: the outer product of
    :func:`gaussian_kernel` with itself."""
    g = gaussian_kernel(size, sigma, torch.float64)
    return (g[:, None] * g[None, :]).to(dtype)


def _ssim_map(a: torch.Tensor, b: torch.Tensor, padding: int, data_range: float) -> torch.Tensor:
    """Per-pixel SSIM of (B, C, H, W) ``a`` and ``b`` (zero ``padding`` on each border).

    The five local means (a, b, a^2, b^2, ab) come from one depthwise pass of the 11 x 11
    Gaussian window, applied as its two 1-D factors (11 x 1, then 1 x 11): the same sums
    as the authors' 2-D window in another order (float32 rounding only; 5-13x faster on a
    2-core CPU, where every protocol scores: ``benchmark.py --scoring``)."""
    c = a.shape[1]
    stack = torch.cat([a, b, a * a, b * b, a * b], 1)
    n, g = stack.shape[1], gaussian_kernel(dtype=a.dtype).to(a.device)
    size = g.numel()
    local = F.conv2d(stack, g.view(1, 1, size, 1).expand(n, 1, size, 1), padding=(padding, 0), groups=n)
    local = F.conv2d(local, g.view(1, 1, 1, size).expand(n, 1, 1, size), padding=(0, padding), groups=n)
    mu_a, mu_b, aa, bb, ab = local.split(c, 1)
    return _ssim_from_local_means(mu_a, mu_b, aa, bb, ab, data_range)


def _ssim_from_local_means(mu_a, mu_b, aa, bb, ab, data_range: float) -> torch.Tensor:
    """SSIM from the Gaussian-weighted local means of a, b, a^2, b^2 and ab."""
    saa, sbb, sab = aa - mu_a ** 2, bb - mu_b ** 2, ab - mu_a * mu_b
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    return ((2 * mu_a * mu_b + c1) * (2 * sab + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (saa + sbb + c2))


def ssim_map_2d_window(a: torch.Tensor, b: torch.Tensor, padding: int, data_range: float) -> torch.Tensor:
    """:func:`_ssim_map` as the authors' code writes it: five depthwise convolutions with the
    2-D 11 x 11 window. The reference the separable form is tested and benchmarked against."""
    c = a.shape[1]
    win = gaussian_window(dtype=a.dtype).to(a.device).expand(c, 1, 11, 11)
    filt = lambda x: F.conv2d(x, win, padding=padding, groups=c)      # noqa: E731
    return _ssim_from_local_means(filt(a), filt(b), filt(a * a), filt(b * b), filt(a * b), data_range)


def rgb_to_y(x: torch.Tensor) -> torch.Tensor:
    """BT.601 luma as BasicSR computes it: (B, 3, H, W) RGB in [0, 1] -> (B, 1, H, W)
    float64 in [16, 235] (white 235, black 16)."""
    w = torch.tensor(BT601_Y, dtype=torch.float64).view(1, 3, 1, 1)
    return 16.0 + (x.double() * w).sum(1, keepdim=True)


def ciede2000(pred: torch.Tensor, target: torch.Tensor) -> List[float]:
    """Per-image mean CIEDE2000 colour difference (scikit-image ``rgb2lab`` then
    ``deltaE_ciede2000``, D65) of (B, 3, H, W) RGB in [0, 1]; both clamped to [0, 1]."""
    from skimage.color import deltaE_ciede2000, rgb2lab
    pred, target = _batch(pred).detach().double().cpu(), _batch(target).detach().double().cpu()
    if pred.shape != target.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and ground truth {tuple(target.shape)} differ in shape")
    lab = lambda x: rgb2lab(x.clamp(0, 1).permute(1, 2, 0).numpy())
    return [float(deltaE_ciede2000(lab(a), lab(b)).mean()) for a, b in zip(pred, target)]


def psnr_ssim(pred: torch.Tensor, target: torch.Tensor, protocol: str = "paper") -> Dict[str, List[float]]:
    """Per-image PSNR (dB) and SSIM of ``pred`` against ``target`` under ``protocol``."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown metric protocol {protocol!r}; choose from {sorted(PROTOCOLS)}")
    pred, target = _batch(pred).detach().float().cpu(), _batch(target).detach().float().cpu()
    if pred.shape != target.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and ground truth {tuple(target.shape)} differ in shape")
    if protocol == "paper":
        a, b = pred.clamp(0, 1), target.clamp(0, 1)
        mse = ((a - b) ** 2).flatten(1).mean(1)
        psnr = [20 * math.log10(1.0 / math.sqrt(m)) if m > 0 else float("inf") for m in mse.tolist()]
        ssim = _ssim_map(a, b, padding=5, data_range=1.0).flatten(1).mean(1).tolist()
        return {"psnr": psnr, "ssim": ssim}
    if protocol == "y":
        a, b = rgb_to_y(pred.clamp(0, 1)), rgb_to_y(target.clamp(0, 1))
    else:
        a = (pred.clamp(0, 1) * 255).round().double()
        b = (target.clamp(0, 1) * 255).round().double()
    if min(a.shape[-2:]) < 11:
        raise ValueError(f"{protocol} SSIM needs images of at least 11x11, got {tuple(a.shape[-2:])}")
    mse = ((a - b) ** 2).flatten(1).mean(1)
    psnr = [10 * math.log10(255.0 ** 2 / m) if m > 0 else float("inf") for m in mse.tolist()]
    ssim = _ssim_map(a, b, padding=0, data_range=255.0).flatten(1).mean(1).tolist()
    return {"psnr": psnr, "ssim": ssim}
