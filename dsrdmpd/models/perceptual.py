"""The perceptual decoder's conditional feature fusion (official
``ConditionalFeatureFusionLayer``), SPEC.md "The perceptual decoder".

Its output depends only on the coarse estimate and the hazy image (both in [-1, 1])
and on the target size, never on x_t or t, so samplers compute it once per image.

The image encoders run at full resolution and are then resized (bilinear,
align_corners=True) to the level's size, which for the deep levels is 1/8 or 1/4 of
the image's: the resize reads two source rows and two source columns per output row and
column and nothing else. Where those are at most half of the image's rows and columns
(levels at 1/4 of the image size or smaller), the encoder's second convolution is
evaluated at those (2h x 2w) positions only (:func:`encode_where_read`) and the resize
is done on them (:func:`resize_from_taps`): the same dot products and the same
interpolation arithmetic, at 1/16 (level at 1/8) or 1/4 (at 1/4) of the convolution's
work and memory. At the paper's widths that is 7 % of an inference call's FLOPs and 23 %
of a training forward's, and the (B, 512, H, W) level-0 encoder outputs (2 GiB per image
at 1024 x 1024) are never formed. Deterministic training on CUDA keeps the authors' form
(:func:`gathers_allowed`).
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import nn
import torch.nn.functional as F


def _image_encoder(width: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.LeakyReLU(0.1),
                         nn.Conv2d(64, width, 3, padding=1))


def opmath_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype PyTorch's kernels compute in for values of ``dtype``: float64 for float64,
    float32 otherwise (bfloat16 and float16 included)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def bilinear_taps(n_in: int, n_out: int, device=None, dtype: torch.dtype = torch.float32
                  ) -> Tuple[torch.Tensor, torch.Tensor]:
    """The taps of a bilinear resize with align_corners=True from n_in to n_out samples,
    in PyTorch's arithmetic (scale and source index in ``dtype``, the opmath dtype of the
    values resized: :func:`opmath_dtype`): ``(index, weight)``, each of
    length 2 * n_out, output i reading index[i] with weight[i] and index[n_out + i] with
    weight[n_out + i] (the two weights sum to 1; the second index is the first plus one,
    clamped to n_in - 1)."""
    scale = (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0
    src = torch.arange(n_out, device=device, dtype=dtype) * scale
    first = src.floor()
    far = src - first                                           # the weight of the second tap
    i0 = first.long()
    i1 = torch.clamp(i0 + 1, max=n_in - 1)
    return torch.cat((i0, i1)), torch.cat((1 - far, far))


def encode_where_read(encoder: nn.Sequential, image: torch.Tensor, rows: torch.Tensor,
                      cols: torch.Tensor) -> torch.Tensor:
    """``encoder(image)[:, :, rows][:, :, :, cols]`` without the full-size output: the
    first convolution and its activation run on the whole image (3 input channels: cheap),
    the second (3x3, padding 1) only at the (rows x cols) positions, as one stride-3
    convolution over the 3x3 neighbourhoods gathered from the zero-padded activation.
    (B, 3, H, W) -> (B, width, len(rows), len(cols))."""
    conv1, act, conv2 = encoder
    a = F.pad(act(conv1(image)), (1, 1, 1, 1))                 # the second conv's zero padding
    offsets = torch.arange(3, device=rows.device)
    r3 = (rows[:, None] + offsets).reshape(-1)                  # padded coordinates: rows r-1, r, r+1
    c3 = (cols[:, None] + offsets).reshape(-1)
    patches = a.index_select(2, r3).index_select(3, c3)         # (B, 64, 3 len(rows), 3 len(cols))
    return F.conv2d(patches, conv2.weight, conv2.bias, stride=3)


def resize_from_taps(grid: torch.Tensor, row_weight: torch.Tensor, col_weight: torch.Tensor) -> torch.Tensor:
    """The bilinear resize of an image from its values at the taps' positions:
    ``grid`` (B, C, 2h, 2w) holds rows (first taps; second taps) and likewise columns, as
    :func:`encode_where_read` returns them for :func:`bilinear_taps`' indices. Computed as
    PyTorch's kernel does (the lerp along a row first, in the weights' dtype), returned in
    grid's dtype. -> (B, C, h, w)."""
    h, w = grid.shape[-2] // 2, grid.shape[-1] // 2
    g = grid.to(col_weight.dtype)
    along = col_weight[:w] * g[..., :w] + col_weight[w:] * g[..., w:]       # (B, C, 2h, w)
    wr = row_weight[:, None]
    return (wr[:h] * along[..., :h, :] + wr[h:] * along[..., h:, :]).to(grid.dtype)


def gathers_allowed(image: torch.Tensor) -> bool:
    """Whether the fusion layers may evaluate their encoders at the read positions for
    ``image``: always with autograd off (inference, validation sampling) or on the CPU, and
    on CUDA while autograd records unless deterministic algorithms are on. The gather's
    backward accumulates into repeated rows (index_add); on CUDA, PyTorch's deterministic
    form of it sorts the indices (an index_put_ with accumulate), which CUDA graph capture
    has rejected (pytorch/pytorch#105439) and which the trainer's captured deterministic
    step must not meet, so deterministic CUDA training keeps the authors' form (full-size
    encoders, F.interpolate)."""
    return (not torch.is_grad_enabled() or not image.is_cuda
            or not torch.are_deterministic_algorithms_enabled())


class ConditionalFeatureFusion(nn.Module):
    """Returns the additive term f * m + a of shape (B, width, *size) for one decoder level.

    f = encoder(coarse), g = encoder(hazy) at full resolution, bilinear-resized
    (align_corners=True) to ``size``; m = Sigmoid(conv(LReLU(conv([f, g])))),
    a = conv(LReLU(conv([f, g]))).
    """

    def __init__(self, width: int, hidden: int = 128):
        super().__init__()
        self.coarse_encoder = _image_encoder(width)
        self.hazy_encoder = _image_encoder(width)
        self.gate_conv1 = nn.Conv2d(2 * width, hidden, 3, padding=1)
        self.gate_conv2 = nn.Conv2d(hidden, width, 3, padding=1)
        self.shift_conv1 = nn.Conv2d(2 * width, hidden, 3, padding=1)
        self.shift_conv2 = nn.Conv2d(hidden, width, 3, padding=1)

    def encode(self, encoder: nn.Sequential, image: torch.Tensor, size) -> torch.Tensor:
        """encoder(image) bilinear-resized (align_corners=True) to ``size`` (h, w): on the
        read positions only where the resize reads at most half of the rows and of the
        columns (see the module's docstring) and :func:`gathers_allowed`; unchanged where
        ``size`` is the image's."""
        (h, w), (H, W) = tuple(size), image.shape[-2:]
        if (h, w) == (H, W):        # align_corners=True to the same size: every value as it is
            return encoder(image)
        # the full form where the taps (2h rows, 2w columns) would cover most of the image
        if 4 * h > H or 4 * w > W or not gathers_allowed(image):
            return F.interpolate(encoder(image), size=(h, w), mode="bilinear", align_corners=True)
        dtype = opmath_dtype(image.dtype)       # = the encoder output's (autocast leaves float64 alone)
        rows, row_weight = bilinear_taps(H, h, image.device, dtype)
        cols, col_weight = bilinear_taps(W, w, image.device, dtype)
        return resize_from_taps(encode_where_read(encoder, image, rows, cols), row_weight, col_weight)

    def forward(self, coarse: torch.Tensor, hazy: torch.Tensor, size) -> torch.Tensor:
        f = self.encode(self.coarse_encoder, coarse, size)
        g = self.encode(self.hazy_encoder, hazy, size)
        fg = torch.cat((f, g), dim=1)
        m = torch.sigmoid(self.gate_conv2(F.leaky_relu(self.gate_conv1(fg), 0.1)))
        a = self.shift_conv2(F.leaky_relu(self.shift_conv1(fg), 0.1))
        return f * m + a
