"""GroupNorm with the stage-2 blocks' optional scale/shift and SiLU, chosen per device.

``GroupNormAct`` holds the same parameters as ``nn.GroupNorm`` (``weight``, ``bias``: the
state-dict keys do not change) and computes, on (B, C, H, W) input,

    y = group_norm(x) * weight + bias;  y = y * (scale + 1) + shift  (if given);  y = silu(y)  (if act)

Two implementations:

* native (:meth:`GroupNormAct.forward_native`): ``F.group_norm`` then the element-wise ops,
  exactly the reference computation. Used on the CPU (PyTorch's kernel is already the fast
  form there; a ``var_mean`` over a (B, G, -1) view measured 7-14x slower per call at 64-128
  channels on the 2-core development CPU), whenever autograd records (training), and
  whenever the fast path is switched off (the default: :func:`set_fast_norm`).
* fast (CUDA only, opt-in; for training too, with a backward: :class:`GroupNormActFunction`):
  statistics by a split reduction, so that a batch of one still fills the card. Each
  (image, group) is cut into chunks of ``CHUNK`` elements; each chunk gives (count, mean, M2) in one pass over registers, and
  the chunks are merged with the parallel-variance formula (Chan et al.):
  mean = sum(n_i mean_i) / N, M2 = sum(M2_i + n_i (mean_i - mean)^2) -- no
  sum-of-squares cancellation. One more pass normalises, applies weight/bias,
  scale/shift and SiLU and writes the output in the input's memory format (NCHW or
  channels-last, no layout round trip). With Triton importable this is three Triton
  kernels (partials, merge, apply); without it, the same split in plain torch
  (``var_mean`` over the chunked view, then the merge formula).

Fusions with the blocks around the norm (fast path only; the native path runs the
reference ops): a convolution right before a norm runs without its bias, which the norm's
kernels add as they load (``pre_bias``), and a residual block's skip is added in the
same pass that writes the norm's output (``residual``, plus ``residual_bias`` for a 1x1
conv skip). PyTorch's cuDNN convolutions add their bias in a separate broadcast pass over
the output, and a residual add is one more; each fusion saves a read and a write of the
block's output (the stage-2 ResBlocks and linear attentions run 5 times per image).

The stage-2 channel LayerNorm (:class:`dsrdmpd.models.unet_blocks.ChannelLayerNorm`: each
pixel normalised over its C channels, times a gain) has a fast form under the same switch:
one Triton kernel that reads a (channels x positions) tile once, takes each position's mean
and variance over the channels in registers (float32; the mean corrected by a second pass
over the deviations, the variance from the corrected deviations) and writes
(x - mean) / sqrt(var + eps) * g, NCHW or channels-last, in place of the native form's
four passes over the tensor (var_mean, subtract, two multiplies). Without Triton it keeps
the native form.

Statistics and arithmetic are float32 in every path. Output dtype follows the native path:
float32 under autocast (GroupNorm is on autocast's float32 list), else the input's dtype
promoted with scale/shift's.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator, Optional, Tuple

import torch
from torch import nn
from torch.autograd.function import once_differentiable
import torch.nn.functional as F

from .layout import is_channels_last, memory_format_of

try:                                  # Triton ships with CUDA builds of torch
    import triton
    import triton.language as tl
except ImportError:                   # CPU builds: the plain-torch fast form is the CUDA fallback
    triton = None

CHUNK = 4096          # elements per partial statistic (a power of two)
APPLY_BLOCK = 1024    # elements per program of the apply kernel


def on_cuda(x: torch.Tensor) -> bool:
    """x lives on a CUDA device (one place for the fast paths' device test)."""
    return x.is_cuda


def triton_available() -> bool:
    """Triton importable and not switched off with ``DSRDMPD_TRITON=0``."""
    return triton is not None and os.environ.get("DSRDMPD_TRITON", "1") != "0"


def _merge(count: torch.Tensor, mean: torch.Tensor, m2: torch.Tensor, n: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(R, K) chunk partials -> (R,) mean and biased variance of all n elements of each row."""
    total = (count * mean).sum(dim=1) / n
    var = (m2 + count * (mean - total[:, None]) ** 2).sum(dim=1) / n
    return total, var


def group_stats_torch(x: torch.Tensor, groups: int, chunk: int = CHUNK) -> Tuple[torch.Tensor, torch.Tensor]:
    """(B*G,) mean and biased variance of each (image, group) of x (B, C, H, W), any memory
    format, float32, by the chunked split reduction (plain torch)."""
    b, c, h, w = x.shape
    if is_channels_last(x):
        rows = x.permute(0, 2, 3, 1).reshape(b, h * w, groups, c // groups).transpose(1, 2)
        rows = rows.reshape(b * groups, -1)      # one copy, channels-last order within a group
    else:
        rows = x.reshape(b * groups, -1)
    rows = rows.float()
    r, n = rows.shape
    full = n // chunk                        # whole chunks, then a shorter last one if any
    means, m2s = [], []
    if full:
        var, mean = torch.var_mean(rows[:, :full * chunk].reshape(r, full, chunk), dim=2, unbiased=False)
        means.append(mean)
        m2s.append(var * chunk)
    if n > full * chunk:
        var, mean = torch.var_mean(rows[:, full * chunk:], dim=1, unbiased=False, keepdim=True)
        means.append(mean)
        m2s.append(var * (n - full * chunk))
    mean, m2 = torch.cat(means, 1), torch.cat(m2s, 1)
    count = torch.full_like(mean, float(chunk))          # no host-to-device copy: capturable
    if n > full * chunk:
        count[:, -1] = n - full * chunk
    return _merge(count, mean, m2, n)


def _apply_torch(x, mean, var, groups, weight, bias, eps, scale, shift, act):
    b, c = x.shape[:2]
    rstd = (var + eps).rsqrt()
    a = weight.float()[None, :] * rstd.view(b, groups, 1).expand(b, groups, c // groups).reshape(b, c)
    d = bias.float()[None, :] - mean.view(b, groups, 1).expand(b, groups, c // groups).reshape(b, c) * a
    y = x.float() * a[:, :, None, None] + d[:, :, None, None]
    if scale is not None:
        y = y * (scale.float() + 1) + shift.float()
    return F.silu(y) if act else y


if triton is not None:
    @triton.jit
    def _partials_kernel(x_ptr, pb_ptr, count_ptr, mean_ptr, m2_ptr, C, HW, CG, G, N, K,
                         CHANNELS_LAST: tl.constexpr, HAS_PB: tl.constexpr, BLOCK: tl.constexpr):
        """Program (k, row = b*G + g): (count, mean, M2) of chunk k of that group of x (plus
        the per-channel bias pb with HAS_PB); the chunks on grid axis 0, the one without
        CUDA's 65535 limit: an untiled 8192 x 8192 image has over 65535 chunks per group."""
        k = tl.program_id(0)
        row = tl.program_id(1)
        bi = row // G
        g = row % G
        i = k * BLOCK + tl.arange(0, BLOCK)
        valid = i < N
        if CHANNELS_LAST:                 # group elements ordered (position, channel)
            p = i // CG
            ch = g * CG + i % CG
            offs = bi.to(tl.int64) * HW * C + p.to(tl.int64) * C + ch
        else:                             # one contiguous span per (image, group)
            ch = g * CG + i // HW
            offs = (bi.to(tl.int64) * C + g * CG) * HW + i
        v = tl.load(x_ptr + offs, mask=valid, other=0.0).to(tl.float32)
        if HAS_PB:
            v = tl.where(valid, v + tl.load(pb_ptr + ch, mask=valid, other=0.0), 0.0)
        cnt = tl.minimum(N - k * BLOCK, BLOCK).to(tl.float32)
        mean = tl.sum(v, axis=0) / cnt
        dev = tl.where(valid, v - mean, 0.0)
        m2 = tl.sum(dev * dev, axis=0)
        tl.store(count_ptr + row * K + k, cnt)
        tl.store(mean_ptr + row * K + k, mean)
        tl.store(m2_ptr + row * K + k, m2)

    @triton.jit
    def _merge_kernel(count_ptr, mean_ptr, m2_ptr, out_mean_ptr, out_rstd_ptr, K, N, eps,
                      BLOCK: tl.constexpr):
        """Program row: merge the K partials of one (image, group) -> mean, 1/sqrt(var + eps)."""
        row = tl.program_id(0)
        base = row.to(tl.int64) * K
        # while loops over the runtime K, not range(0, K, BLOCK): Triton 3.6's interpreter makes
        # a range bound of a scalar argument with int() of a 1-element array, which numpy >= 2.4
        # refuses (triton-lang/triton#9171); `start` starts as an int32 scalar, not a constant
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        start = row * 0
        while start < K:
            j = start + tl.arange(0, BLOCK)
            m = j < K
            acc += tl.load(count_ptr + base + j, mask=m, other=0.0) * tl.load(mean_ptr + base + j, mask=m, other=0.0)
            start += BLOCK
        total = tl.sum(acc, axis=0) / N
        acc2 = tl.zeros((BLOCK,), dtype=tl.float32)
        start = row * 0
        while start < K:
            j = start + tl.arange(0, BLOCK)
            m = j < K
            cnt = tl.load(count_ptr + base + j, mask=m, other=0.0)
            d = tl.load(mean_ptr + base + j, mask=m, other=0.0) - total
            acc2 += tl.load(m2_ptr + base + j, mask=m, other=0.0) + cnt * d * d
            start += BLOCK
        var = tl.sum(acc2, axis=0) / N
        tl.store(out_mean_ptr + row, total)
        tl.store(out_rstd_ptr + row, 1.0 / tl.sqrt(var + eps))

    @triton.jit
    def _apply_kernel(x_ptr, y_ptr, mean_ptr, rstd_ptr, w_ptr, b_ptr, scale_ptr, shift_ptr, pb_ptr, res_ptr, rb_ptr,
                      total, C, HW, CG, G, CHANNELS_LAST: tl.constexpr, HAS_SS: tl.constexpr, ACT: tl.constexpr,
                      HAS_PB: tl.constexpr, HAS_RES: tl.constexpr, HAS_RB: tl.constexpr, BLOCK: tl.constexpr):
        """Element-wise, in memory order: (x + pb) normalised, affine, scale/shift, SiLU, then
        + (res + rb): each step only with its flag."""
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        valid = offs < total
        if CHANNELS_LAST:
            ch = offs % C
            bi = offs // (HW * C)
        else:
            ch = (offs // HW) % C
            bi = offs // (HW * C)
        row = bi * G + ch // CG
        v = tl.load(x_ptr + offs, mask=valid, other=0.0).to(tl.float32)
        if HAS_PB:
            v = v + tl.load(pb_ptr + ch, mask=valid, other=0.0)
        mean = tl.load(mean_ptr + row, mask=valid, other=0.0)
        rstd = tl.load(rstd_ptr + row, mask=valid, other=1.0)
        y = (v - mean) * rstd * tl.load(w_ptr + ch, mask=valid, other=1.0) + tl.load(b_ptr + ch, mask=valid,
                                                                                       other=0.0)
        if HAS_SS:
            sc = tl.load(scale_ptr + bi * C + ch, mask=valid, other=0.0).to(tl.float32)
            sh = tl.load(shift_ptr + bi * C + ch, mask=valid, other=0.0).to(tl.float32)
            y = y * (sc + 1.0) + sh
        if ACT:
            y = y * tl.sigmoid(y)
        if HAS_RES:
            r = tl.load(res_ptr + offs, mask=valid, other=0.0).to(tl.float32)
            if HAS_RB:
                r = r + tl.load(rb_ptr + ch, mask=valid, other=0.0)
            y = y + r
        tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=valid)


    @triton.jit
    def _channel_norm_kernel(x_ptr, y_ptr, g_ptr, pb_ptr, res_ptr, C, HW, eps,
                             CHANNELS_LAST: tl.constexpr, HAS_PB: tl.constexpr, HAS_RES: tl.constexpr,
                             BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
        """Program (position block, image b): each position of x (plus the per-channel bias pb
        with HAS_PB) normalised over its C channels, times g (plus res with HAS_RES); the
        position blocks on grid axis 0, the one without CUDA's 65535 limit."""
        bi = tl.program_id(1)
        c = tl.arange(0, BLOCK_C)[:, None]
        p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)[None, :]
        valid = (c < C) & (p < HW)
        base = bi.to(tl.int64) * C * HW
        if CHANNELS_LAST:
            offs = base + p.to(tl.int64) * C + c
        else:
            offs = base + c.to(tl.int64) * HW + p
        v = tl.load(x_ptr + offs, mask=valid, other=0.0).to(tl.float32)
        if HAS_PB:
            v = tl.where(valid, v + tl.load(pb_ptr + c, mask=c < C, other=0.0), 0.0)
        mean = tl.sum(v, axis=0) / C
        dev = tl.where(valid, v - mean[None, :], 0.0)
        # the sum of C values far from zero rounds at their magnitude: one more pass over the
        # (small) deviations corrects the mean to float32 rounding of the data's spread
        dev = tl.where(valid, dev - (tl.sum(dev, axis=0) / C)[None, :], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(dev * dev, axis=0) / C + eps)
        g = tl.load(g_ptr + c, mask=c < C, other=0.0)
        y = dev * rstd[None, :] * g
        if HAS_RES:
            y = y + tl.load(res_ptr + offs, mask=valid, other=0.0).to(tl.float32)
        tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=valid)


    @triton.jit
    def _recompute_dz(x_ptr, dy_ptr, mean_ptr, rstd_ptr, w_ptr, b_ptr, scale_ptr, shift_ptr, offs, valid, row, ch,
                      bi, C, pmask, HAS_SS: tl.constexpr, ACT: tl.constexpr):
        """What both backward kernels read at elements ``offs`` (channel ``ch``, (image,
        group) ``row``; per-channel loads masked by ``pmask``), and the forward recomputed
        from it in float32: (xhat, u, dz, rstd, weight, scale), xhat the normalised input,
        u = xhat * weight + bias, dz the gradient at the pre-activation z."""
        x = tl.load(x_ptr + offs, mask=valid, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + offs, mask=valid, other=0.0).to(tl.float32)
        mean = tl.load(mean_ptr + row, mask=pmask, other=0.0)
        rstd = tl.load(rstd_ptr + row, mask=pmask, other=1.0)
        w = tl.load(w_ptr + ch, mask=pmask, other=1.0)
        xhat = (x - mean) * rstd
        u = xhat * w + tl.load(b_ptr + ch, mask=pmask, other=0.0)
        sc = 0.0
        if HAS_SS:
            sc = tl.load(scale_ptr + bi * C + ch, mask=pmask, other=0.0).to(tl.float32)
            z = u * (sc + 1.0) + tl.load(shift_ptr + bi * C + ch, mask=pmask, other=0.0).to(tl.float32)
        else:
            z = u
        if ACT:
            sig = tl.sigmoid(z)
            dz = dy * sig * (1.0 + z * (1.0 - sig))
        else:
            dz = dy
        return xhat, u, dz, rstd, w, sc

    @triton.jit
    def _grad_sums_kernel(x_ptr, dy_ptr, mean_ptr, rstd_ptr, w_ptr, b_ptr, scale_ptr, shift_ptr, zu_ptr, z_ptr,
                          zx_ptr, C, HW, CG, G, K, CHANNELS_LAST: tl.constexpr, HAS_SS: tl.constexpr, ACT: tl.constexpr,
                          BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
        """Program (position block k, image bi): per channel, the sums over the block's
        positions of dz * u, dz and dz * xhat -> zu/z/zx[bi, k, :] (blocks on axis 0)."""
        k = tl.program_id(0)
        bi = tl.program_id(1)
        c = tl.arange(0, BLOCK_C)[:, None]
        p = k * BLOCK_P + tl.arange(0, BLOCK_P)[None, :]
        cm = c < C
        valid = cm & (p < HW)
        base = bi.to(tl.int64) * C * HW
        if CHANNELS_LAST:
            offs = base + p.to(tl.int64) * C + c
        else:
            offs = base + c.to(tl.int64) * HW + p
        xhat, u, dz, rstd, w, sc = _recompute_dz(x_ptr, dy_ptr, mean_ptr, rstd_ptr, w_ptr, b_ptr, scale_ptr,
                                                 shift_ptr, offs, valid, bi * G + c // CG, c, bi, C, cm, HAS_SS, ACT)
        dz = tl.where(valid, dz, 0.0)
        cc = tl.arange(0, BLOCK_C)
        out = (bi.to(tl.int64) * K + k) * C + cc
        tl.store(zu_ptr + out, tl.sum(dz * u, axis=1), mask=cc < C)
        tl.store(z_ptr + out, tl.sum(dz, axis=1), mask=cc < C)
        tl.store(zx_ptr + out, tl.sum(dz * xhat, axis=1), mask=cc < C)

    @triton.jit
    def _grad_input_kernel(x_ptr, dy_ptr, dx_ptr, mean_ptr, rstd_ptr, w_ptr, b_ptr, scale_ptr, shift_ptr, m1_ptr,
                           m2_ptr, total, C, HW, CG, G, CHANNELS_LAST: tl.constexpr, HAS_SS: tl.constexpr,
                           ACT: tl.constexpr, BLOCK: tl.constexpr):
        """Element-wise, in memory order: dx = rstd * (dxhat - m1 - xhat * m2) with dxhat =
        dz * (scale + 1) * weight and m1, m2 the group means of dxhat and dxhat * xhat."""
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        valid = offs < total
        if CHANNELS_LAST:
            ch = offs % C
        else:
            ch = (offs // HW) % C
        bi = offs // (HW * C)
        row = bi * G + ch // CG
        xhat, u, dz, rstd, w, sc = _recompute_dz(x_ptr, dy_ptr, mean_ptr, rstd_ptr, w_ptr, b_ptr, scale_ptr,
                                                 shift_ptr, offs, valid, row, ch, bi, C, valid, HAS_SS, ACT)
        dxhat = dz * (sc + 1.0) * w
        m1 = tl.load(m1_ptr + row, mask=valid, other=0.0)
        m2 = tl.load(m2_ptr + row, mask=valid, other=0.0)
        tl.store(dx_ptr + offs, (rstd * (dxhat - m1 - xhat * m2)).to(dx_ptr.dtype.element_ty), mask=valid)


CHANNEL_TILE = 4096   # elements (channels x positions) per program of the channel-norm kernel


def channel_norm_blocks(channels: int) -> Tuple[int, int]:
    """(BLOCK_C, BLOCK_P) of the channel-norm kernel for ``channels``: all channels in one
    tile (the next power of two), positions filling it up to CHANNEL_TILE (at least 4)."""
    block_c = 1 << max(0, channels - 1).bit_length()
    return block_c, max(4, CHANNEL_TILE // block_c)


CUDA_GRID_YZ_MAX = 65535   # CUDA's limit on grid axes 1 and 2 (axis 0 takes up to 2**31 - 1)


def channel_norm_grid(batch: int, positions: int, channels: int) -> Tuple[int, int]:
    """The channel-norm kernel's launch grid: (position blocks, images); the position blocks,
    which grow with the image, on axis 0."""
    return -(-positions // channel_norm_blocks(channels)[1]), batch


def partials_grid(chunks: int, rows: int) -> Tuple[int, int]:
    """The GroupNorm partials kernel's launch grid: (chunks per group, image-groups)."""
    return chunks, rows


def _in_format(t: Optional[torch.Tensor], cl: bool) -> Optional[torch.Tensor]:
    """``t`` laid out as the kernel reads x: channels-last or contiguous (no copy if it is)."""
    if t is None:
        return None
    return t.contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)


def _channel_vector(v: Optional[torch.Tensor], c: int, what: str) -> Optional[torch.Tensor]:
    """A per-channel vector (C values, any shape) as a contiguous float32 (C,) tensor."""
    if v is None:
        return None
    if v.numel() != c:
        raise ValueError(f"{what} must hold one value per channel ({c}), got shape {tuple(v.shape)}")
    return v.reshape(c).float().contiguous()


def autocast_dtype(x: torch.Tensor) -> Optional[torch.dtype]:
    """Autocast's lower precision (bfloat16, float16) for x's device while autocast is on
    there, else None: the dtype a convolution casts its float32 input to."""
    dev = x.device.type
    if torch.amp.is_autocast_available(dev) and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return None


def _check_residual(residual: Optional[torch.Tensor], x: torch.Tensor) -> None:
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"residual must have the input's shape {tuple(x.shape)}, got {tuple(residual.shape)}")


def channel_layer_norm_triton(x: torch.Tensor, gain: torch.Tensor, eps: float,
                              pre_bias: Optional[torch.Tensor] = None,
                              residual: Optional[torch.Tensor] = None,
                              out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """(x' - mean_c) / sqrt(var_c + eps) * gain over the channels of x' = x + pre_bias (B, C,
    H, W; ``pre_bias`` per channel: the bias of the convolution before, which then runs
    without it), plus ``residual`` (B, C, H, W) if given, by one Triton kernel; float32
    arithmetic, output in x's memory format and in ``out_dtype`` (default: x's dtype
    promoted with the residual's)."""
    b, c, h, w = x.shape
    _check_residual(residual, x)
    cl = is_channels_last(x)
    if not cl:
        x = x.contiguous()
    pb = _channel_vector(pre_bias, c, "pre_bias")
    res = _in_format(residual, cl)
    if out_dtype is None:
        out_dtype = x.dtype if res is None else torch.promote_types(x.dtype, res.dtype)
    y = torch.empty_like(x, dtype=out_dtype)
    block_c, block_p = channel_norm_blocks(c)
    _channel_norm_kernel[channel_norm_grid(b, h * w, c)](
        x, y, gain.float().contiguous(), x if pb is None else pb, x if res is None else res, c, h * w, eps,
        CHANNELS_LAST=cl, HAS_PB=pb is not None, HAS_RES=res is not None, BLOCK_C=block_c, BLOCK_P=block_p)
    return y


def _group_stats_triton(x: torch.Tensor, groups: int, eps: float, pb: Optional[torch.Tensor] = None):
    """(x in a layout the kernels read, channels-last?, mean (B*G,), rstd (B*G,)) of x (+ pb),
    by the split reduction (partials, merge)."""
    b, c, h, w = x.shape
    cl = is_channels_last(x)
    if not cl:
        x = x.contiguous()
    cg, hw = c // groups, h * w
    n = cg * hw
    k = triton.cdiv(n, CHUNK)
    rows = b * groups
    part = torch.empty((3, rows, k), device=x.device, dtype=torch.float32)
    _partials_kernel[partials_grid(k, rows)](x, x if pb is None else pb, part[0], part[1], part[2], c, hw, cg,
                                             groups, n, k, CHANNELS_LAST=cl, HAS_PB=pb is not None, BLOCK=CHUNK)
    mean = torch.empty(rows, device=x.device, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    _merge_kernel[(rows,)](part[0], part[1], part[2], mean, rstd, k, n, eps, BLOCK=256)
    return x, cl, mean, rstd


def _flat_scale_shift(scale, shift, b, c):
    """scale/shift (B, C, 1, 1) as contiguous (B, C) tensors (None stays None)."""
    if scale is None:
        return None, None
    return scale.reshape(b, c).contiguous(), shift.reshape(b, c).contiguous()


def _group_norm_act_triton(x, groups, weight, bias, eps, scale, shift, act, out_dtype,
                           pre_bias=None, residual=None, residual_bias=None, stats=None):
    """The fast GroupNormAct forward; ``stats`` (a list), if given, receives (mean, rstd)."""
    b, c, h, w = x.shape
    pb, rb = _channel_vector(pre_bias, c, "pre_bias"), _channel_vector(residual_bias, c, "residual_bias")
    x, cl, mean, rstd = _group_stats_triton(x, groups, eps, pb)
    if stats is not None:
        stats.extend((mean, rstd))
    res = _in_format(residual, cl)
    y = torch.empty_like(x, dtype=out_dtype)          # keeps the memory format
    has_ss = scale is not None
    scale, shift = _flat_scale_shift(scale, shift, b, c)
    total = x.numel()
    _apply_kernel[(triton.cdiv(total, APPLY_BLOCK),)](
        x, y, mean, rstd, weight.float().contiguous(), bias.float().contiguous(),
        scale if has_ss else x, shift if has_ss else x, x if pb is None else pb, x if res is None else res,
        x if rb is None else rb, total, c, h * w, c // groups, groups, CHANNELS_LAST=cl, HAS_SS=has_ss, ACT=act,
        HAS_PB=pb is not None, HAS_RES=res is not None, HAS_RB=rb is not None, BLOCK=APPLY_BLOCK)
    return y


class GroupNormActFunction(torch.autograd.Function):
    """The fast GroupNormAct with a backward (training on CUDA): the forward kernels above,
    and two backward passes over (x, dy), the forward's output recomputed in registers:

    1. per (image, channel), sums over the positions of dz * u, dz and dz * xhat (xhat
       the normalised input, u = xhat * weight + bias, z = u * (scale + 1) + shift, dz the
       gradient at z: dy times SiLU's derivative), as partials per block of positions
       summed in a fixed order (no atomics: deterministic);
    2. dx = rstd * (dxhat - mean_g(dxhat) - xhat * mean_g(dxhat * xhat)), dxhat = dz *
       (scale + 1) * weight, the two group means from the sums of pass 1.

    The parameter gradients come from the same sums: d scale = sum dz * u, d shift =
    sum dz, d weight = sum_b (scale + 1) sum dz * xhat, d bias = sum_b (scale + 1) sum dz."""

    @staticmethod
    def forward(ctx, x, weight, bias, scale, shift, groups, eps, act, out_dtype):
        stats = []
        y = _group_norm_act_triton(x, groups, weight, bias, eps, scale, shift, act, out_dtype, stats=stats)
        ctx.save_for_backward(x, weight, bias, scale, shift, *stats)
        ctx.groups, ctx.act = groups, act
        return y

    @staticmethod
    @once_differentiable            # a second derivative through the kernels would be silently wrong
    def backward(ctx, dy):
        x, weight, bias, scale, shift, mean, rstd = ctx.saved_tensors
        groups, act = ctx.groups, ctx.act
        b, c, h, w = x.shape
        hw, cg = h * w, c // groups
        cl = is_channels_last(x)
        x, dy = _in_format(x, cl), _in_format(dy, cl)
        has_ss = scale is not None
        sc, sh = _flat_scale_shift(scale, shift, b, c)
        wf, bf = weight.float().contiguous(), bias.float().contiguous()
        block_c, block_p = channel_norm_blocks(c)
        k = triton.cdiv(hw, block_p)
        part = torch.empty((3, b, k, c), device=x.device, dtype=torch.float32)
        # 8 warps: at 64 channels (the full-resolution level) the 64 x 64 tile spills with 4
        # (ptxas, sm_90: 255 registers and 260-332 bytes of spill; 184 and none with 8)
        _grad_sums_kernel[(k, b)](x, dy, mean, rstd, wf, bf, sc if has_ss else x, sh if has_ss else x, part[0],
                                  part[1], part[2], c, hw, cg, groups, k, CHANNELS_LAST=cl, HAS_SS=has_ss, ACT=act,
                                  BLOCK_C=block_c, BLOCK_P=block_p, num_warps=8)
        s_zu, s_z, s_zx = part.sum(dim=2)                   # (B, C) each, summed in a fixed order
        gain = sc.float() + 1 if has_ss else torch.ones_like(s_z)
        n = cg * hw
        m1 = (wf * gain * s_z).view(b, groups, cg).sum(-1).reshape(-1) / n
        m2 = (wf * gain * s_zx).view(b, groups, cg).sum(-1).reshape(-1) / n
        dx = None
        if ctx.needs_input_grad[0]:
            dx = torch.empty_like(x)
            total = x.numel()
            _grad_input_kernel[(triton.cdiv(total, APPLY_BLOCK),)](
                x, dy, dx, mean, rstd, wf, bf, sc if has_ss else x, sh if has_ss else x, m1.contiguous(),
                m2.contiguous(), total, c, hw, cg, groups, CHANNELS_LAST=cl, HAS_SS=has_ss, ACT=act,
                BLOCK=APPLY_BLOCK)
        d_weight = (gain * s_zx).sum(0).to(weight.dtype)
        d_bias = (gain * s_z).sum(0).to(bias.dtype)
        d_scale = s_zu.view(b, c, 1, 1).to(scale.dtype) if has_ss else None
        d_shift = s_z.view(b, c, 1, 1).to(shift.dtype) if has_ss else None
        return dx, d_weight, d_bias, d_scale, d_shift, None, None, None, None


class FastNorm:
    """Marks a module with a fast CUDA form, on when ``fast`` is true (off by default): the
    normalisations, and the linear attention whose core has Triton kernels too. What
    :func:`set_fast_norm` switches and :func:`native_norm` switches off for a block."""

    fast = False

    @staticmethod
    def cuda_inference(x: torch.Tensor) -> bool:
        """4-D CUDA input with autograd off (``no_grad`` / ``inference_mode``, as the Dehazer
        and the sampler run): the fast inference kernels have no backward, and while
        autograd is on any tensor they read (the input, weights, the time scale/shift, a
        skip) may need a gradient."""
        records = torch.is_grad_enabled()
        return on_cuda(x) and x.dim() == 4 and not records


class GroupNormAct(FastNorm, nn.GroupNorm):
    """``nn.GroupNorm`` (same parameters and state-dict keys) with the optional
    scale/shift and SiLU that follow it in the stage-2 blocks, native or fast (see the
    module docstring). ``fast`` is off by default; :func:`set_fast_norm` switches it."""

    def forward(self, x: torch.Tensor, scale_shift: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
                act: bool = False) -> torch.Tensor:
        if self.fast:
            if self.uses_fast_path(x):
                return self.forward_fast(x, scale_shift, act)
            if self.uses_training_path(x):
                return self.forward_trainable(x, scale_shift, act)
        return self.forward_native(x, scale_shift, act)

    def uses_fast_path(self, x: torch.Tensor) -> bool:
        """Affine, CUDA input, and no autograd recording (the inference form)."""
        return self.affine and self.cuda_inference(x)

    def uses_training_path(self, x: torch.Tensor) -> bool:
        """Affine, 4-D CUDA input and Triton importable: the Triton kernels with their
        backward (:class:`GroupNormActFunction`) when autograd records."""
        return self.affine and on_cuda(x) and x.dim() == 4 and triton_available()

    @staticmethod
    def _out_dtype(x: torch.Tensor, scale: Optional[torch.Tensor], shift: Optional[torch.Tensor]) -> torch.dtype:
        """The native path's output dtype: float32 under autocast (GroupNorm is on its float32
        list), else x's; promoted with scale/shift's."""
        out_dtype = torch.float32 if torch.is_autocast_enabled(x.device.type) else x.dtype
        if scale is not None:
            out_dtype = torch.promote_types(out_dtype, torch.promote_types(scale.dtype, shift.dtype))
        return out_dtype

    def forward_trainable(self, x, scale_shift=None, act=False):
        """The Triton forward and backward (CUDA, or Triton's interpreter); gradients for x,
        weight, bias, scale and shift, deterministic (no atomics)."""
        scale, shift = scale_shift if scale_shift is not None else (None, None)
        if scale is not None and (scale.shape[2:] != (1, 1) or shift.shape[2:] != (1, 1)):
            raise ValueError(f"scale/shift must be (B, C, 1, 1), got {tuple(scale.shape)}")
        return GroupNormActFunction.apply(x, self.weight, self.bias, scale, shift, self.num_groups, self.eps, act,
                                          self._out_dtype(x, scale, shift))

    def forward_native(self, x, scale_shift=None, act=False):
        """The reference: F.group_norm, then x * (scale + 1) + shift, then SiLU."""
        x = F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        if scale_shift is not None:
            scale, shift = scale_shift
            x = x * (scale + 1) + shift
        return F.silu(x) if act else x

    def forward_fast(self, x, scale_shift=None, act=False, use_triton: Optional[bool] = None,
                     pre_bias: Optional[torch.Tensor] = None, residual: Optional[torch.Tensor] = None,
                     residual_bias: Optional[torch.Tensor] = None, feeds_conv: bool = False):
        """Split-reduction statistics and one fused apply pass (Triton, or plain torch).

        Fusions for the blocks around the norm (each optional): ``pre_bias`` (C values) is
        added to x first -- the bias of the convolution before, which then runs without
        its own pass over the output; ``residual`` (x's shape, plus ``residual_bias``, C
        values, if given) is added to the result -- a residual block's skip, whose add then
        needs no pass of its own. The same float32 operations in the same order as the
        separate ops. ``feeds_conv`` (the output goes to a convolution and nowhere else):
        under autocast it is written in autocast's dtype, the very values the convolution
        would cast the float32 output to, at half the bytes and without the cast's pass."""
        scale, shift = scale_shift if scale_shift is not None else (None, None)
        out_dtype = self._out_dtype(x, scale, shift)
        low = autocast_dtype(x) if feeds_conv else None
        if low is not None:                                    # (a residual's float32 is promoted back below)
            out_dtype = low
        if scale is not None and (scale.shape[2:] != (1, 1) or shift.shape[2:] != (1, 1)):
            raise ValueError(f"scale/shift must be (B, C, 1, 1), got {tuple(scale.shape)}")
        _check_residual(residual, x)
        if residual is not None:
            out_dtype = torch.promote_types(out_dtype, residual.dtype)
        elif residual_bias is not None:
            raise ValueError("residual_bias needs a residual")
        use_triton = (on_cuda(x) and triton_available()) if use_triton is None else use_triton
        if use_triton:
            return _group_norm_act_triton(x, self.num_groups, self.weight, self.bias, self.eps, scale, shift, act,
                                          out_dtype, pre_bias, residual, residual_bias)
        c = x.shape[1]
        fmt = memory_format_of(x)
        if pre_bias is not None:
            x = (x.float() + _channel_vector(pre_bias, c, "pre_bias")[:, None, None]).contiguous(memory_format=fmt)
        mean, var = group_stats_torch(x, self.num_groups)
        y = _apply_torch(x, mean, var, self.num_groups, self.weight, self.bias, self.eps, scale, shift, act)
        if residual is not None:
            r = residual.float()
            if residual_bias is not None:
                r = r + _channel_vector(residual_bias, c, "residual_bias")[:, None, None]
            y = y + r
        return y.to(out_dtype).contiguous(memory_format=fmt)


def set_fast_norm(module: nn.Module, enabled: bool) -> nn.Module:
    """Switch the fast CUDA normalisation of every :class:`FastNorm` inside ``module``
    (GroupNormAct, ChannelLayerNorm; the CPU always takes the native path, and so does
    training except GroupNormAct's Triton form with its backward); returns ``module``."""
    for m in module.modules():
        if isinstance(m, FastNorm):
            m.fast = bool(enabled)
    return module


@contextmanager
def native_norm(*modules: nn.Module) -> Iterator[None]:
    """Every :class:`FastNorm` inside ``modules`` on the native path for the block (what
    a tracer for ahead-of-time compilation needs: the fast kernels are not traceable, and
    the compiler fuses the native form itself); each one's setting is restored after."""
    norms = [m for module in modules for m in module.modules() if isinstance(m, FastNorm)]
    saved = [m.__dict__.get("fast") for m in norms]
    try:
        for m in norms:
            m.fast = False
        yield
    finally:
        for m, fast in zip(norms, saved):
            if fast is None:
                m.__dict__.pop("fast", None)
            else:
                m.fast = fast
