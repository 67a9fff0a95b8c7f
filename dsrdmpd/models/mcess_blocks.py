"""Building blocks of the stage-1 MCESS-UNet (SPEC.md, "Stage 1").

All blocks map (B, C, H, W) float tensors to tensors of the stated width; none of
them constrains the value range. Module layout mirrors the computation, not the
official attribute names; ``dsrdmpd.checkpoints`` maps official keys onto it.
"""
from __future__ import annotations

import math

import torch
from torch import nn
import torch.nn.functional as F


class MultiScaleModule(nn.Module):
    """MSM: four parallel branches (1x1+3x3, 1x1+5x5, maxpool+1x1, 1x1), each c -> f,
    concatenated to 4f channels. LeakyReLU slope 0.01 throughout."""

    def __init__(self, channels: int, filters: int):
        super().__init__()
        act = nn.LeakyReLU
        self.branch1 = nn.Sequential(nn.Conv2d(channels, filters, 1), act(),
                                     nn.Conv2d(filters, filters, 3, padding=1), act())
        self.branch2 = nn.Sequential(nn.Conv2d(channels, filters, 1), act(),
                                     nn.Conv2d(filters, filters, 5, padding=2), act())
        self.branch3 = nn.Sequential(nn.MaxPool2d(3, stride=1, padding=1),
                                     nn.Conv2d(channels, filters, 1), act())
        self.branch4 = nn.Sequential(nn.Conv2d(channels, filters, 1), act())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch1(x), self.branch2(x), self.branch3(x), self.branch4(x)], dim=1)


class ChannelGate(nn.Module):
    """CAM: global average pool -> Linear(c, c/r) -> Sigmoid -> Linear(c/r, c) -> Sigmoid,
    multiplied onto the input (the sigmoid between the linears is the official design)."""

    def __init__(self, channels: int, reduction: int = 4):
        super().__init__()
        self.fc1 = nn.Linear(channels, channels // reduction)
        self.fc2 = nn.Linear(channels // reduction, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = x.mean(dim=(2, 3))
        w = torch.sigmoid(self.fc2(torch.sigmoid(self.fc1(w))))
        return x * w[:, :, None, None]


class MultiScaleChannelAttention(nn.Module):
    """AttentionModule: MSM (c -> 4*(c//4)), 1x1 conv back to c, channel gate."""

    def __init__(self, channels: int):
        super().__init__()
        filters = channels // 4
        self.msm = MultiScaleModule(channels, filters)
        self.fuse = nn.Conv2d(filters * 4, channels, 1)
        self.channel_gate = ChannelGate(channels, reduction=4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.channel_gate(self.fuse(self.msm(x)))


class MSCABlock(nn.Module):
    """conv3x3-BN-ReLU x2 -> multi-scale channel attention, plus a 1x1 shortcut.
    (B, cin, H, W) -> (B, cout, H, W)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(cout)
        self.attention = MultiScaleChannelAttention(cout)
        self.shortcut = nn.Conv2d(cin, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        return self.attention(out) + self.shortcut(x)


class UpConv(nn.Module):
    """Bilinear x2 (align_corners=True) -> conv3x3 -> BN -> ReLU; (B, cin, H, W) -> (B, cout, 2H, 2W)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)
        return F.relu(self.bn(self.conv(x)))


def _conv_bn_relu(cin: int, cout: int, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 1, groups=groups), nn.BatchNorm2d(cout), nn.ReLU())


class AttentionGate(nn.Module):
    """EAG: grouped 1x1 convs (32 groups) on the skip e and the upsampled feature u;
    psi = Sigmoid(BN(conv1x1(ReLU(g + x)))) -> 1 channel; returns u * psi + u."""

    def __init__(self, width: int, groups: int = 32):
        super().__init__()
        if width % groups:
            raise ValueError(f"attention gate width {width} must be a multiple of its {groups} groups")
        self.skip_branch = _conv_bn_relu(width, width, groups)
        self.up_branch = _conv_bn_relu(width, width, groups)
        self.psi = nn.Sequential(nn.Conv2d(width, 1, 1), nn.BatchNorm2d(1), nn.Sigmoid())

    def forward(self, skip: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        psi = self.psi(F.relu(self.skip_branch(skip) + self.up_branch(up)))
        return up * psi + up


class EfficientChannelAttention(nn.Module):
    """ECA: pooled channel descriptor -> 1-D conv across channels -> Sigmoid; returns the
    (B, C, 1, 1) weights."""

    def __init__(self, channels: int):
        super().__init__()
        k = int(abs((math.log(channels, 2) + 1) / 2))
        k = k if k % 2 else k + 1
        self.conv = nn.Conv1d(1, 1, k, padding=(k - 1) // 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = x.mean(dim=(2, 3), keepdim=True)                # B C 1 1
        v = self.conv(v.squeeze(-1).transpose(-1, -2))      # B 1 C
        return torch.sigmoid(v.transpose(-1, -2).unsqueeze(-1))


class ChannelSE(nn.Module):
    """cSE with a ReLU (not a sigmoid) at the end, as in the official code: z*y + R(z)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels // 2, 1, bias=False)
        self.conv2 = nn.Conv2d(channels // 2, 1, 1, bias=False)
        self.residual = nn.Conv2d(channels, channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.mean(dim=(2, 3), keepdim=True)
        y = F.relu(self.conv2(F.relu(self.conv1(y))))       # (B, 1, 1, 1): nearest resize == broadcast
        return x * y + self.residual(x)


class SpatialSE(nn.Module):
    """sSE: per-pixel sigmoid gate, z*y + R(z)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels // 2, 1, bias=False)
        self.conv2 = nn.Conv2d(channels // 2, 1, 1, bias=False)
        self.residual = nn.Conv2d(channels, channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.sigmoid(self.conv2(F.relu(self.conv1(x))))
        return x * y + self.residual(x)


class ConcurrentSE(nn.Module):
    """scSE: elementwise max(cSE(z) + R(z), sSE(z) + R(z))."""

    def __init__(self, channels: int):
        super().__init__()
        self.cse = ChannelSE(channels)
        self.sse = SpatialSE(channels)
        self.residual = nn.Conv2d(channels, channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = self.residual(x)
        return torch.maximum(self.cse(x) + r, self.sse(x) + r)


class SpatialAttention(nn.Module):
    """Sigmoid(conv7x7([mean_c, max_c])), returns the (B, 1, H, W) weights."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 1, 7, padding=3, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        stats = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
        return torch.sigmoid(self.conv(stats))


class SelectiveSynthesis(nn.Module):
    """ESS(e, u): gate u by (e, u), concat [gated, e] (2w channels), then ECA, scSE and
    spatial attention. (B, w, H, W) x 2 -> (B, 2w, H, W)."""

    def __init__(self, width: int):
        super().__init__()
        self.gate = AttentionGate(width)
        self.eca = EfficientChannelAttention(2 * width)
        self.scse = ConcurrentSE(2 * width)
        self.spatial = SpatialAttention()

    def forward(self, skip: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        z = torch.cat([self.gate(skip, up), skip], dim=1)
        z = self.eca(z) * z
        z = self.scse(z)
        return self.spatial(z) * z


class AdaptiveScatteringFusion(nn.Module):
    """ASFusion bottleneck: x * t + a * (1 - t), with t and a per-channel statistics of a
    shallow depthwise-dilated branch (reflect padding 3, so its maps grow by 2 per conv).
    Needs H, W >= 4 (reflect padding of 3)."""

    def __init__(self, channels: int):
        super().__init__()
        def dw():
            return nn.Conv2d(channels, channels, 3, padding=3, dilation=2, groups=channels,
                             padding_mode="reflect")
        self.shallow = nn.Sequential(dw(), nn.BatchNorm2d(channels), nn.ReLU(),
                                     dw(), nn.BatchNorm2d(channels), nn.ReLU())
        self.mlp_t = self._mlp(channels)
        self.mlp_a = self._mlp(channels)

    @staticmethod
    def _mlp(c: int) -> nn.Sequential:
        return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(c, 2 * c, 1, bias=False), nn.ReLU(),
                             nn.Conv2d(2 * c, c, 1, bias=False), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mid = self.shallow(x)
        t = self.mlp_t(mid)
        a = self.mlp_a(mid)
        return x * t + a * (1 - t)
