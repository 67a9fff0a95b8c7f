"""The perceptual decoder's conditional feature fusion (official
``ConditionalFeatureFusionLayer``), SPEC.md "The perceptual decoder".

Its output depends only on the coarse estimate and the hazy image (both in [-1, 1])
and on the target size, never on x_t or t, so samplers compute it once per image.
"""
from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F


def _image_encoder(width: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.LeakyReLU(0.1),
                         nn.Conv2d(64, width, 3, padding=1))


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

    def forward(self, coarse: torch.Tensor, hazy: torch.Tensor, size) -> torch.Tensor:
        f = F.interpolate(self.coarse_encoder(coarse), size=tuple(size), mode="bilinear", align_corners=True)
        g = F.interpolate(self.hazy_encoder(hazy), size=tuple(size), mode="bilinear", align_corners=True)
        fg = torch.cat((f, g), dim=1)
        m = torch.sigmoid(self.gate_conv2(F.leaky_relu(self.gate_conv1(fg), 0.1)))
        a = self.shift_conv2(F.leaky_relu(self.shift_conv1(fg), 0.1))
        return f * m + a
