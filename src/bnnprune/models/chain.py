"""Chain architectures (cnn, nin, alexnet) as lists of layer specs; one BNN module builds any
of them from a config.

A model config (saved in every checkpoint) is enough to rebuild the network:
    {"arch": "cnn", "width": 1.0, "in_shape": [1, 28, 28], "num_classes": 10,
     "channels": [32, 32, 64, ...]}
`channels` holds the output width of every body layer; pruning only changes it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from bnnprune.core.binary import BinaryConv2d, BinaryLinear

MAX2 = ("max", 2, 2, 0)  # pool: (kind, kernel, stride, padding)
MAX3 = ("max", 3, 2, 1)
AVG3 = ("avg", 3, 2, 1)


@dataclass(frozen=True)
class LayerSpec:
    kind: str  # "conv" | "linear"
    out: int
    kernel: int = 3
    stride: int = 1
    padding: int = 0
    pool: tuple | None = None
    binary: bool = True


def _w(c: float, width: float) -> int:
    return max(1, round(c * width))


def cnn_specs(width: float) -> tuple[list[LayerSpec], str]:
    """Compact binary CNN (CPU default): float stem + 5 binary 3x3 convs, flatten classifier."""
    c = [_w(32, width), _w(32, width), _w(64, width), _w(64, width), _w(128, width),
         _w(128, width)]
    pools = [None, MAX2, None, MAX2, None, MAX2]
    return [LayerSpec("conv", o, 3, 1, 1, p, binary=i > 0)
            for i, (o, p) in enumerate(zip(c, pools, strict=True))], "flatten"


def nin_specs(width: float) -> tuple[list[LayerSpec], str]:
    """Binary Network-in-Network (9 layers; seed paper): float 5x5 stem, 7 binary layers, and a
    float classifier. The last 1x1 conv + global average pool is written as global average pool
    + linear, which is the same function."""
    w = lambda c: _w(c, width)  # noqa: E731
    return [
        LayerSpec("conv", w(192), 5, 1, 2, binary=False),
        LayerSpec("conv", w(160), 1, 1, 0),
        LayerSpec("conv", w(96), 1, 1, 0, MAX3),
        LayerSpec("conv", w(192), 5, 1, 2),
        LayerSpec("conv", w(192), 1, 1, 0),
        LayerSpec("conv", w(192), 1, 1, 0, AVG3),
        LayerSpec("conv", w(192), 3, 1, 1),
        LayerSpec("conv", w(192), 1, 1, 0),
    ], "gap"


def alexnet_specs(width: float) -> tuple[list[LayerSpec], str]:
    """Binary AlexNet for small images: float 5x5 stem, 4 binary convs, 2 binary FC layers."""
    w = lambda c: _w(c, width)  # noqa: E731
    return [
        LayerSpec("conv", w(64), 5, 1, 2, MAX3, binary=False),
        LayerSpec("conv", w(192), 5, 1, 2, MAX3),
        LayerSpec("conv", w(384), 3, 1, 1),
        LayerSpec("conv", w(256), 3, 1, 1),
        LayerSpec("conv", w(256), 3, 1, 1, MAX3),
        LayerSpec("linear", w(1024)),
        LayerSpec("linear", w(1024)),
    ], "flatten"


ARCHS = {"cnn": cnn_specs, "nin": nin_specs, "alexnet": alexnet_specs}


class Block(nn.Module):
    """layer -> pool -> BatchNorm. The next binary layer binarises this block's output."""

    def __init__(self, spec: LayerSpec, in_ch: int):
        super().__init__()
        if spec.kind == "conv":
            if spec.binary:
                self.layer = BinaryConv2d(in_ch, spec.out, spec.kernel, spec.stride, spec.padding)
            else:
                self.layer = nn.Conv2d(in_ch, spec.out, spec.kernel, spec.stride, spec.padding,
                                       bias=False)
            self.bn = nn.BatchNorm2d(spec.out)
        else:
            self.layer = BinaryLinear(in_ch, spec.out) if spec.binary else nn.Linear(
                in_ch, spec.out, bias=False)
            self.bn = nn.BatchNorm1d(spec.out)
        self.pool: nn.Module = nn.Identity()
        if spec.pool:
            kind, k, s, p = spec.pool
            self.pool = (nn.MaxPool2d(k, s, p) if kind == "max"
                         else nn.AvgPool2d(k, s, p, count_include_pad=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.layer, nn.Linear) and x.dim() == 4:
            x = x.flatten(1)  # (N, C, H, W) -> (N, C*H*W)
        return self.bn(self.pool(self.layer(x)))


class BNN(nn.Module):
    def __init__(self, config: dict[str, Any]):
        super().__init__()
        self.config = dict(config)
        self.specs, self.head = layer_specs(config)
        c, h, w = config["in_shape"]
        blocks, in_ch, spatial = [], c, True
        for spec in self.specs:
            if spec.kind == "linear" and spatial:
                in_ch, spatial = in_ch * h * w, False  # flatten (C, H, W) -> C*H*W
            blocks.append(Block(spec, in_ch))
            if spec.kind == "conv":
                h, w = conv_out_hw(spec, h, w)
            in_ch = spec.out
        self.blocks = nn.ModuleList(blocks)
        self.feature_hw = (h, w)
        features = in_ch * h * w if (spatial and self.head == "flatten") else in_ch
        self.classifier = nn.Linear(features, config["num_classes"])

    def sync_config(self) -> None:
        """After surgery: the config's widths and the specs from the layers."""
        self.config["channels"] = [b.layer.weight.shape[0] for b in self.blocks]
        self.specs, self.head = layer_specs(self.config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        if self.head == "gap" and x.dim() == 4:
            x = x.mean(dim=(2, 3))  # (N, C, H, W) -> (N, C)
        return self.classifier(x.flatten(1))


def conv_out_hw(spec: LayerSpec, h: int, w: int) -> tuple[int, int]:
    def out(n: int, k: int, s: int, p: int) -> int:
        return (n + 2 * p - k) // s + 1

    h, w = out(h, spec.kernel, spec.stride, spec.padding), out(w, spec.kernel, spec.stride,
                                                               spec.padding)
    if spec.pool:
        _, k, s, p = spec.pool
        h, w = out(h, k, s, p), out(w, k, s, p)
    if h < 1 or w < 1:
        raise ValueError(f"input too small for this architecture: feature map {h}x{w}")
    return h, w


def layer_specs(config: dict[str, Any]) -> tuple[list[LayerSpec], str]:
    arch = config["arch"]
    if arch not in ARCHS:
        raise ValueError(f"model.arch: {arch!r} is not allowed; allowed: {', '.join(ARCHS)}")
    specs, head = ARCHS[arch](config.get("width", 1.0))
    channels = config.get("channels")
    if channels is not None:
        if len(channels) != len(specs):
            raise ValueError(f"channels: {len(channels)} entries for arch {arch!r}, expected "
                             f"{len(specs)}")
        specs = [replace(s, out=int(c)) for s, c in zip(specs, channels, strict=True)]
    return specs, head
