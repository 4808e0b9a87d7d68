"""A user's own residual BNN, as the pipeline's `model.arch: "usermodels.tiny_bireal:build"`
runs it: a binary conv that is a plain nn.Module (not nn.Conv2d), a (1, C, 1, 1) sign
threshold, PReLU, an identity and a downsample shortcut."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def sign(x: torch.Tensor) -> torch.Tensor:
    """+1 / -1 with a straight-through gradient."""
    return x + (torch.where(x >= 0, 1.0, -1.0) - x).detach()


class MyBinaryConv(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(c_out, c_in, 3, 3) * 0.1)
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xb = F.pad(sign(x), (1, 1, 1, 1), value=1.0)
        return F.conv2d(xb, sign(self.weight), None, self.stride)


class Block(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1, c_in, 1, 1))
        self.conv = MyBinaryConv(c_in, c_out, stride)
        self.bn = nn.BatchNorm2d(c_out)
        self.short = nn.Identity() if stride == 1 else nn.Sequential(
            nn.AvgPool2d(stride), nn.Conv2d(c_in, c_out, 1, bias=False), nn.BatchNorm2d(c_out))
        self.act = nn.PReLU(c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x + self.bias)) + self.short(x))


class TinyBiReal(nn.Module):
    def __init__(self, width: int = 16, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(width))
        self.body = nn.Sequential(Block(width, width, 1), Block(width, 2 * width, 2))
        self.fc = nn.Linear(2 * width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(self.stem(x)).mean(dim=(2, 3)))


def build(width: int = 16, classes: int = 10) -> TinyBiReal:
    return TinyBiReal(width, classes)
