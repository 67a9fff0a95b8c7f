"""Building blocks of the stage-2 residual-diffusion U-Net (SPEC.md, "The network").

Feature maps are (B, C, H, W) floats, time embeddings (B, 4*dim).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn
import torch.nn.functional as F

from .linear_attention_triton import linear_attention_core, supported as attention_kernels_support
from .layout import is_channels_last
from .norm import FastNorm, GroupNormAct, autocast_dtype, channel_layer_norm_triton, triton_available


def _eps(dtype: torch.dtype) -> float:
    return 1e-5 if dtype == torch.float32 else 1e-3


def standardize_weight(w: torch.Tensor) -> torch.Tensor:
    """(out, in, kh, kw) weight standardised per output channel (biased variance)."""
    var, mean = torch.var_mean(w, dim=(1, 2, 3), unbiased=False, keepdim=True)
    # eps follows the parameters' dtype (the official code reads the input's, which is the
    # same except under autocast, where the float32 eps keeps bf16 runs close to float32)
    return (w - mean) * (var + _eps(w.dtype)).rsqrt()


class WeightStandardizedConv2d(nn.Conv2d):
    """Conv2d whose weight is standardised per output channel (biased variance).

    With ``cache_weight`` on (off by default; :func:`set_weight_cache`, which ``Dehazer``
    uses), the standardised weight is computed once per weight version and reused while
    autograd is off: the key is (weight._version, data_ptr, dtype, device, autocast
    state), so an optimizer step, ``load_state_dict``, ``copy_`` or ``.to()`` recomputes
    it. Writes through ``weight.data`` do not bump the version (ema-pytorch updates its
    copy that way), which is why the cache is opt-in for frozen inference models only.
    Whenever autograd records, the weight is standardised afresh in every call, so
    training sees every update and gets the same gradients.
    """

    cache_weight = False

    def standardized_weight(self) -> torch.Tensor:
        w = self.weight
        if not self.cache_weight or torch.is_grad_enabled() or torch.compiler.is_compiling():
            return standardize_weight(w)
        dev = w.device.type
        autocast = ((torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev))
                    if torch.amp.is_autocast_available(dev) else None)
        key = (w._version, w.data_ptr(), w.dtype, w.device, autocast)
        cached = self.__dict__.get("_ws_cache")
        if cached is None or cached[0] != key:
            cached = (key, standardize_weight(w))
            self.__dict__["_ws_cache"] = cached      # a plain attribute: not state, not a buffer
        return cached[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.standardized_weight(), self.bias, self.stride, self.padding, self.dilation,
                        self.groups)


class ChannelLayerNorm(FastNorm, nn.Module):
    """LayerNorm over channels with a learnt gain only: (x - mean) / sqrt(var + eps) * g.
    With ``fast`` (:func:`dsrdmpd.models.norm.set_fast_norm`), CUDA inference runs one
    Triton kernel instead (:func:`dsrdmpd.models.norm.channel_layer_norm_triton`)."""

    def __init__(self, channels: int):
        super().__init__()
        self.g = nn.Parameter(torch.ones(1, channels, 1, 1))

    def uses_fast_path(self, x: torch.Tensor) -> bool:
        """Triton importable, CUDA input, and no autograd recording (no backward kernel)."""
        return triton_available() and self.cuda_inference(x)

    def fuses(self, x: torch.Tensor, conv: nn.Conv2d) -> bool:
        """Whether the fast kernel takes over ``conv``'s bias (``conv`` then runs without it)
        for ``conv``'s input ``x``: the fast path on, and no autograd recording."""
        return self.fast and conv.bias is not None and self.uses_fast_path(x)

    def forward(self, x: torch.Tensor, pre_bias: Optional[torch.Tensor] = None,
                residual: Optional[torch.Tensor] = None, feeds_conv: bool = False) -> torch.Tensor:
        """norm(x + pre_bias) + residual, each addition only if given: ``pre_bias`` (C
        values) is the bias of the convolution before, ``residual`` (x's shape) a skip.
        ``feeds_conv`` (the output goes to a convolution only): on the fast path under
        autocast, written in autocast's dtype (what the convolution casts it to)."""
        if self.fast and self.uses_fast_path(x):
            out_dtype = autocast_dtype(x) if feeds_conv and residual is None else None
            return channel_layer_norm_triton(x, self.g.view(-1), _eps(self.g.dtype), pre_bias, residual, out_dtype)
        if pre_bias is not None:
            x = x + pre_bias.view(1, -1, 1, 1)
        y = self.forward_native(x)
        return y if residual is None else y + residual

    def forward_native(self, x: torch.Tensor) -> torch.Tensor:
        """The reference computation."""
        # statistics in at least the parameters' precision (matters under bf16 autocast only)
        xs = x.to(torch.promote_types(x.dtype, self.g.dtype))
        var, mean = torch.var_mean(xs, dim=1, unbiased=False, keepdim=True)
        return ((xs - mean) * (var + _eps(self.g.dtype)).rsqrt() * self.g).to(x.dtype)


class SinusoidalTimeEmbedding(nn.Module):
    """Integer timesteps (B,) -> (B, dim): concat(sin, cos) of t * exp(-i ln(1e4) / (dim/2 - 1))."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.dim // 2
        freqs = torch.exp(torch.arange(half, device=t.device) * -(math.log(10000) / (half - 1)))
        args = t[:, None] * freqs[None, :]
        return torch.cat((args.sin(), args.cos()), dim=-1)


class TimeMLP(nn.Module):
    """Sinusoidal embedding of size dim -> Linear(dim, 4dim) -> GELU -> Linear(4dim, 4dim)."""

    def __init__(self, dim: int):
        super().__init__()
        self.embed = SinusoidalTimeEmbedding(dim)
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, 4 * dim)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(self.embed(t))))


class ConvNormAct(nn.Module):
    """WS-conv3x3 -> GroupNorm(8) -> optional h*(scale+1)+shift -> SiLU."""

    def __init__(self, cin: int, cout: int, groups: int = 8):
        super().__init__()
        self.proj = WeightStandardizedConv2d(cin, cout, 3, padding=1)
        self.norm = GroupNormAct(groups, cout)

    def fuses(self, x: torch.Tensor) -> bool:
        """Whether the norm's fast kernels take over the conv's bias (and a residual) for
        input ``x``: the fast path on, affine, and no autograd recording."""
        return self.norm.fast and self.proj.bias is not None and self.norm.uses_fast_path(x)

    def forward(self, x, scale_shift=None, residual=None, residual_bias=None, feeds_conv=False):
        """silu(norm(conv(x)) [* (scale + 1) + shift]) [+ residual + residual_bias].
        ``feeds_conv``: the output goes to a convolution only (see GroupNormAct.forward_fast)."""
        if self.fuses(x):     # the conv's bias and the residual added inside the norm's kernels
            p = self.proj
            h = F.conv2d(x, p.standardized_weight(), None, p.stride, p.padding, p.dilation, p.groups)
            return self.norm.forward_fast(h, scale_shift, act=True, pre_bias=p.bias, residual=residual,
                                          residual_bias=residual_bias, feeds_conv=feeds_conv)
        y = self.norm(self.proj(x), scale_shift, act=True)
        if residual is None:
            return y
        return y + (residual if residual_bias is None else residual + residual_bias.view(1, -1, 1, 1))


class ResBlock(nn.Module):
    """Time-conditioned residual block (a -> b channels)."""

    def __init__(self, cin: int, cout: int, time_dim: int, groups: int = 8):
        super().__init__()
        self.time_proj = nn.Linear(time_dim, 2 * cout)
        self.block1 = ConvNormAct(cin, cout, groups)
        self.block2 = ConvNormAct(cout, cout, groups)
        self.shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        scale_shift = self.time_proj(F.silu(temb))[:, :, None, None].chunk(2, dim=1)
        h = self.block1(x, scale_shift, feeds_conv=True)       # block2's convolution is its only reader
        if self.block2.fuses(h):   # fast CUDA inference: the skip (its conv without bias) added in block2's kernel
            s = self.shortcut
            if isinstance(s, nn.Conv2d):
                return self.block2(h, residual=F.conv2d(x, s.weight, None, s.stride, s.padding, s.dilation,
                                                        s.groups), residual_bias=s.bias)
            return self.block2(h, residual=x)
        return self.block2(h) + self.shortcut(x)


class LinearAttention(FastNorm, nn.Module):
    """Linear attention, 4 heads of 32, followed by a 1x1 conv and a channel LayerNorm.
    With ``fast`` (:func:`dsrdmpd.models.norm.set_fast_norm`), CUDA inference runs its core
    (softmaxes, context, output) as Triton kernels
    (:func:`dsrdmpd.models.linear_attention_triton.linear_attention_core`)."""

    def __init__(self, channels: int, heads: int = 4, dim_head: int = 32):
        super().__init__()
        self.heads, self.dim_head, self.scale = heads, dim_head, dim_head ** -0.5
        hidden = heads * dim_head
        self.to_qkv = nn.Conv2d(channels, 3 * hidden, 1, bias=False)
        self.to_out = nn.Conv2d(hidden, channels, 1)
        self.out_norm = ChannelLayerNorm(channels)

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, H, W), plus ``residual`` (that shape) if given."""
        b, _, h, w = x.shape
        if self.uses_fast_path(x):
            out = linear_attention_core(self.to_qkv(x), self.heads, self.dim_head, self.scale)
        elif is_channels_last(x):
            out = self._attend_channels_last(x)
        else:
            q, k, v = (t.reshape(b, self.heads, -1, h * w) for t in self.to_qkv(x).chunk(3, dim=1))
            q = q.softmax(dim=-2)
            k = k.softmax(dim=-1)
            # the authors scale q by dim_head^-0.5 and v by 1 / (h w); both factors are applied
            # to the small (dim_head x dim_head) context instead: the same product, two passes
            # over full-size tensors fewer
            context = torch.einsum("bhdn,bhen->bhde", k, v) * (self.scale / (h * w))
            out = torch.einsum("bhde,bhdn->bhen", context, q).reshape(b, -1, h, w)
        if self.out_norm.fuses(out, self.to_out):  # to_out's bias and the residual added in the norm's kernel
            return self.out_norm(F.conv2d(out, self.to_out.weight), pre_bias=self.to_out.bias, residual=residual)
        y = self.out_norm(self.to_out(out))
        return y if residual is None else y + residual

    def uses_fast_path(self, x: torch.Tensor) -> bool:
        """``fast`` on, Triton importable, the kernels' head shape, CUDA input and no autograd
        recording (the kernels have no backward)."""
        return (self.fast and triton_available()
                and attention_kernels_support(self.heads, self.dim_head)
                and self.cuda_inference(x))

    def _attend_channels_last(self, x: torch.Tensor) -> torch.Tensor:
        """The same attention on channels-last x, without a layout change: positions stay
        rows of (B, HW, channels) matrices. q, k and v each come from their own slice of
        to_qkv's weight (a (B, HW, 128) product each, contiguous: the softmaxes read them
        in place, where chunks of one 384-wide product would be strided copies); the heads'
        (32 x 32) contexts are the diagonal blocks of one (128 x 128) product with the rest
        zeroed, so that both products are single batched matmuls. Returns (B, 128, H, W),
        channels-last."""
        b, c, h, w = x.shape
        hidden = self.to_qkv.out_channels // 3
        rows = x.permute(0, 2, 3, 1).reshape(b, h * w, c)                # a view: x is channels-last
        wq, wk, wv = self.to_qkv.weight.reshape(3, hidden, c).unbind(0)
        q = F.linear(rows, wq).view(b, h * w, self.heads, -1).softmax(dim=-1).view(b, h * w, hidden)
        k = F.linear(rows, wk).softmax(dim=1)                              # over the positions
        v = F.linear(rows, wv)
        head = torch.arange(hidden, device=x.device) // (hidden // self.heads)
        same_head = head[:, None] == head[None, :]
        context = torch.bmm(k.transpose(1, 2), v)                          # (B, 128, 128): [d, e]
        context = torch.where(same_head, context * (self.scale / (h * w)), torch.zeros((), dtype=context.dtype,
                                                                                      device=x.device))
        return torch.bmm(q, context).view(b, h, w, hidden).permute(0, 3, 1, 2)


class Attention(nn.Module):
    """Full softmax attention over positions, 4 heads of 32, 1x1 conv out.

    With ``fused`` (default) the attention runs through
    ``F.scaled_dot_product_attention`` (the same softmax(q k^T * scale) v, equal to float
    rounding) whose fused kernels never hold the (HW/64)^2 score matrix: memory stays
    linear in the number of positions. ``fused = False`` is the authors' explicit form.
    """

    fused = True

    def __init__(self, channels: int, heads: int = 4, dim_head: int = 32):
        super().__init__()
        self.heads, self.scale = heads, dim_head ** -0.5
        hidden = heads * dim_head
        self.to_qkv = nn.Conv2d(channels, 3 * hidden, 1, bias=False)
        self.to_out = nn.Conv2d(hidden, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        q, k, v = (t.reshape(b, self.heads, -1, h * w) for t in self.to_qkv(x).chunk(3, dim=1))
        if self.fused:
            # (B, heads, positions, dim_head), contiguous so that the fused kernels apply
            q, k, v = (t.transpose(-1, -2).contiguous() for t in (q, k, v))
            out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        else:
            sim = torch.einsum("bhdi,bhdj->bhij", q * self.scale, k)
            out = torch.einsum("bhij,bhdj->bhid", sim.softmax(dim=-1), v)
        return self.to_out(out.permute(0, 1, 3, 2).reshape(b, -1, h, w))


class PreNormResidual(nn.Module):
    """x + fn(ChannelLayerNorm(x))."""

    def __init__(self, channels: int, fn: nn.Module):
        super().__init__()
        self.norm = ChannelLayerNorm(channels)
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # both attentions start with their to_qkv convolution: the norm's output feeds it alone
        if isinstance(self.fn, LinearAttention):     # adds the residual itself (fused on the fast path)
            return self.fn(self.norm(x, feeds_conv=True), residual=x)
        return self.fn(self.norm(x, feeds_conv=isinstance(self.fn, Attention))) + x


class Resample(nn.Module):
    """Conv that changes width, optionally after a nearest x2 upsampling (decoder) or
    as a 4x4 stride-2 conv (encoder downsampling)."""

    def __init__(self, cin: int, cout: int, mode: str):
        super().__init__()
        self.mode = mode
        if mode == "down":
            self.conv = nn.Conv2d(cin, cout, 4, stride=2, padding=1)
        elif mode in ("up", "same"):
            self.conv = nn.Conv2d(cin, cout, 3, padding=1)
        else:
            raise ValueError(f"unknown resample mode {mode!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "up":
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x)


def set_fused_attention(module: nn.Module, fused: bool) -> nn.Module:
    """Switch every :class:`Attention` inside ``module`` between the fused kernel and the
    authors' explicit form; returns ``module``."""
    for m in module.modules():
        if isinstance(m, Attention):
            m.fused = fused
    return module


def set_weight_cache(module: nn.Module, enabled: bool) -> nn.Module:
    """Switch the standardised-weight cache of every :class:`WeightStandardizedConv2d`
    inside ``module`` (for frozen inference models; see the class); returns ``module``."""
    for m in module.modules():
        if isinstance(m, WeightStandardizedConv2d):
            m.cache_weight = bool(enabled)
            m.__dict__.pop("_ws_cache", None)
    return module
