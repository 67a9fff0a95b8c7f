"""The stage-2 linear attention's core as Triton kernels (CUDA inference, ``fast_norm``).

For the (B, 3 * heads * d, H, W) output ``qkv`` of the attention's 1x1 ``to_qkv`` conv,
NCHW or channels-last, with N = H * W positions and per head

    q = softmax over d of q,   k = softmax over the N positions of k,
    context = k v^T * scale / N   (d x d),   out = context^T q   (d x N),

the native form runs two softmaxes, two batched matmuls and, on channels-last input,
copies of the strided chunks. Here:

1. ``_key_stats_kernel``: per k channel, the max and the sum of exp(k - max) over a block
   of positions; the blocks merged on the host side (torch, small tensors): M, S.
2. ``_context_kernel``: per chunk of positions and head, sum over the chunk of
   exp(k - M) v^T (tensor-core dots); the chunk partials summed in a fixed order and
   divided by S: the context, without k's softmax ever written.
3. ``_output_kernel``: per block of positions and head, q's softmax over d in registers,
   then context^T q (a dot), written in qkv's memory format.

q, k and v are read where ``to_qkv`` wrote them (strides for either layout), each about
once: about 5 passes over (heads * d x N) tensors where the native form makes 8 (more on
channels-last). The position chunks of the context are sized so that a batch of one
still gives hundreds of programs: the native (d x N) @ (N x d) product with N up to 262144
is a handful of output tiles per image. Partials are summed in a fixed order (no atomics):
deterministic. Dots run in TF32 when ``torch.backends.cuda.matmul.allow_tf32`` is on (as
the native matmuls do) or qkv is 16-bit (autocast), else in full float32.
"""
from __future__ import annotations

from typing import Optional

import torch

from .layout import is_channels_last

try:                                  # Triton ships with CUDA builds of torch
    import triton
    import triton.language as tl
except ImportError:
    triton = None

POSITIONS = 64              # positions per block of every kernel
TARGET_PROGRAMS = 512       # context programs aimed at (a 132-SM card takes ~4 per SM)


if triton is not None:
    @triton.jit
    def _key_stats_kernel(qkv_ptr, max_ptr, sum_ptr, N, J, sb, sc, sp, KEY0,
                          HD: tl.constexpr, BLOCK_P: tl.constexpr):
        """Program (position block j, image b): per k channel c (qkv channel KEY0 + c), the
        max m and sum of exp(k - m) over the block -> max/sum[b, j, c] (blocks on axis 0)."""
        j = tl.program_id(0)
        b = tl.program_id(1)
        c = tl.arange(0, HD)[:, None]
        p = j * BLOCK_P + tl.arange(0, BLOCK_P)[None, :]
        valid = (p < N) & (c < HD)
        offs = b.to(tl.int64) * sb + (KEY0 + c).to(tl.int64) * sc + p.to(tl.int64) * sp
        k = tl.load(qkv_ptr + offs, mask=valid, other=-float("inf")).to(tl.float32)
        m = tl.max(k, axis=1)
        s = tl.sum(tl.where(valid, tl.exp(k - m[:, None]), 0.0), axis=1)
        out = (b.to(tl.int64) * J + j) * HD + tl.arange(0, HD)
        tl.store(max_ptr + out, m)
        tl.store(sum_ptr + out, s)

    @triton.jit
    def _context_kernel(qkv_ptr, kmax_ptr, part_ptr, N, J, sb, sc, sp, KEY0, VALUE0,
                        HEADS: tl.constexpr, D: tl.constexpr, CHUNK: tl.constexpr, BLOCK_P: tl.constexpr,
                        DOT_PRECISION: tl.constexpr):
        """Program (chunk j, image b): per head h, sum over the chunk's positions of
        exp(k - M) v^T -> part[b, j, h] (D x D)."""
        j = tl.program_id(0)
        b = tl.program_id(1)
        d = tl.arange(0, D)
        base = b.to(tl.int64) * sb
        for h in tl.static_range(HEADS):
            m = tl.load(kmax_ptr + b * HEADS * D + h * D + d)
            acc = tl.zeros((D, D), dtype=tl.float32)
            for i in range(0, CHUNK, BLOCK_P):
                p = j * CHUNK + i + tl.arange(0, BLOCK_P)
                valid = (p < N)[None, :] & (d < D)[:, None]
                pos = p.to(tl.int64)[None, :] * sp
                k = tl.load(qkv_ptr + base + (KEY0 + h * D + d).to(tl.int64)[:, None] * sc + pos, mask=valid,
                            other=0.0).to(tl.float32)
                v = tl.load(qkv_ptr + base + (VALUE0 + h * D + d).to(tl.int64)[:, None] * sc + pos, mask=valid,
                            other=0.0).to(tl.float32)
                e = tl.where(valid, tl.exp(k - m[:, None]), 0.0)
                acc += tl.dot(e, tl.trans(v), input_precision=DOT_PRECISION)
            out = ((b.to(tl.int64) * J + j) * HEADS + h) * D * D + d[:, None] * D + d[None, :]
            tl.store(part_ptr + out, acc)

    @triton.jit
    def _output_kernel(qkv_ptr, ctx_ptr, out_ptr, N, sb, sc, sp, ob, oc, op,
                       HEADS: tl.constexpr, D: tl.constexpr, BLOCK_P: tl.constexpr, DOT_PRECISION: tl.constexpr):
        """Program (position block, image b): per head, softmax over d of q in registers, then
        out = context^T q (D x BLOCK_P) -> out (channels h * D + e)."""
        j = tl.program_id(0)
        b = tl.program_id(1)
        d = tl.arange(0, D)
        p = j * BLOCK_P + tl.arange(0, BLOCK_P)
        valid = (p < N)[None, :] & (d < D)[:, None]
        for h in tl.static_range(HEADS):
            q = tl.load(qkv_ptr + b.to(tl.int64) * sb + (h * D + d).to(tl.int64)[:, None] * sc
                        + p.to(tl.int64)[None, :] * sp, mask=valid, other=0.0).to(tl.float32)
            q = tl.exp(q - tl.max(q, axis=0)[None, :])
            q = q / tl.sum(q, axis=0)[None, :]
            # context[d, e] of this head, read transposed: ct[e, d]
            ct = tl.load(ctx_ptr + (b * HEADS + h) * D * D + d[None, :] * D + d[:, None])
            y = tl.dot(ct, q, input_precision=DOT_PRECISION)
            tl.store(out_ptr + b.to(tl.int64) * ob + (h * D + d).to(tl.int64)[:, None] * oc
                     + p.to(tl.int64)[None, :] * op, y.to(out_ptr.dtype.element_ty), mask=valid)


def _power_of_two(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def supported(heads: int, dim_head: int) -> bool:
    """The kernels' shape rule: dim_head a power of two from 16 (tensor-core dots) to 64
    (at 128 the per-head tiles spill registers), heads * dim_head a power of two (one
    register tile of k channels); the paper's 4 x 32."""
    return (triton is not None and 16 <= dim_head <= 64 and _power_of_two(dim_head)
            and _power_of_two(heads * dim_head))


def context_chunk(batch: int, positions: int) -> int:
    """Positions per context program: a multiple of the block, sized for about
    TARGET_PROGRAMS programs in all (at least one block, at most 8192 positions)."""
    want = -(-batch * positions // TARGET_PROGRAMS)
    chunk = POSITIONS
    while chunk < want and chunk < 8192:
        chunk *= 2
    return chunk


def matmul_allows_tf32() -> bool:
    """Whether float32 matmuls may use TF32 now: the legacy switch (what the Dehazer sets),
    or, where PyTorch refuses to read it after its newer ``fp32_precision`` setting was
    used, that setting."""
    try:
        return bool(torch.backends.cuda.matmul.allow_tf32)
    except RuntimeError:
        return getattr(torch.backends.cuda.matmul, "fp32_precision", "ieee") == "tf32"


def _strides(t: torch.Tensor):
    """(image, channel, position) strides of a (B, C, H, W) tensor, NCHW or channels-last."""
    return t.stride(0), t.stride(1), t.stride(3)


def linear_attention_core(qkv: torch.Tensor, heads: int, dim_head: int, scale: float,
                          out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """out (B, heads * dim_head, H, W) of the linear attention for ``to_qkv``'s output
    ``qkv`` (B, 3 * heads * dim_head, H, W), NCHW or channels-last (kept); float32
    arithmetic, output in ``out_dtype`` (default qkv's)."""
    b, c3, h, w = qkv.shape
    hd = heads * dim_head
    if c3 != 3 * hd:
        raise ValueError(f"qkv must have 3 * {hd} channels, got {c3}")
    cl = is_channels_last(qkv)
    if not cl:
        qkv = qkv.contiguous()
    n = h * w
    sb, sc, sp = _strides(qkv)
    dev = qkv.device
    # 16-bit qkv (autocast's conv output): TF32 dots (autocast's own matmuls take 16-bit
    # operands; Triton's interpreter cannot check 16-bit dots, and TF32 is the closer one)
    low = qkv.dtype in (torch.bfloat16, torch.float16)
    precision = "tf32" if matmul_allows_tf32() or low else "ieee"
    # 1. k's softmax statistics over the positions
    jb = triton.cdiv(n, POSITIONS)
    kmax = torch.empty((b, jb, hd), device=dev, dtype=torch.float32)
    ksum = torch.empty_like(kmax)
    _key_stats_kernel[(jb, b)](qkv, kmax, ksum, n, jb, sb, sc, sp, hd, HD=hd, BLOCK_P=POSITIONS)
    m = kmax.amax(dim=1)                                            # (B, HD)
    s = (ksum * torch.exp(kmax - m[:, None, :])).sum(dim=1)         # (B, HD): fixed order
    # 2. the context: chunk partials of exp(k - M) v^T, summed, over S, times scale / N
    chunk = context_chunk(b, n)
    jc = triton.cdiv(n, chunk)
    part = torch.empty((b, jc, heads, dim_head, dim_head), device=dev, dtype=torch.float32)
    _context_kernel[(jc, b)](qkv, m.contiguous(), part, n, jc, sb, sc, sp, hd, 2 * hd, HEADS=heads, D=dim_head,
                             CHUNK=chunk, BLOCK_P=POSITIONS, DOT_PRECISION=precision)
    context = part.sum(dim=1) / s.view(b, heads, dim_head, 1) * (scale / n)      # (B, heads, d, e)
    # 3. out = context^T softmax_d(q)
    fmt = torch.channels_last if cl else torch.contiguous_format
    out = torch.empty((b, hd, h, w), device=dev, dtype=out_dtype or qkv.dtype, memory_format=fmt)
    ob, oc, op = _strides(out)
    _output_kernel[(jb, b)](qkv, context.contiguous(), out, n, sb, sc, sp, ob, oc, op, HEADS=heads, D=dim_head,
                            BLOCK_P=POSITIONS, DOT_PRECISION=precision)
    return out
