"""A Bi-Real/ReActNet-style residual BNN for small images.

Every block is `PReLU(BN(BinaryConv(sign(x + b))) + shortcut(x))`: a learnable per-channel
threshold `b` (a `(1, C, 1, 1)` parameter) in front of the sign, a binary 3x3 conv whose sign
weights are scaled per output channel by the detached mean |w|, BatchNorm, and an identity
shortcut around every binary conv. Where a stage halves the size and doubles the width, the
shortcut is AvgPool(2) + 1x1 float conv + BN. The stem (3x3 conv + BN + PReLU) and the
classifier stay float. The classifier is `cnn`'s: AvgPool(2) + flatten + linear (on 28x28 the
last stage is 7x7 -> 3x3); `config["head"] = "gap"` gives Bi-Real's global average pool.

Every layer that writes a stage's residual stream keeps the same channels, so the prunable
widths are one per stage: `channels` in the config.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from bnnprune.core.binary import ScaledBinaryConv2d
from bnnprune.models.head import GlobalAvgPoolHead, PoolFlattenHead

STAGE_CHANNELS = (32, 64, 128)
BLOCKS_PER_STAGE = 2


class BiRealBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.move = nn.Parameter(torch.zeros(1, c_in, 1, 1))  # learnable sign threshold
        self.conv = ScaledBinaryConv2d(c_in, c_out, 3, stride, 1)
        self.bn = nn.BatchNorm2d(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.AvgPool2d(stride) if stride > 1 else nn.Identity(),
                nn.Conv2d(c_in, c_out, 1, bias=False), nn.BatchNorm2d(c_out))
        self.act = nn.PReLU(c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x + self.move)) + self.shortcut(x))


class BiRealNet(nn.Module):
    def __init__(self, config: dict[str, Any]):
        super().__init__()
        self.config = dict(config)
        channels = [int(c) for c in config["channels"]]
        in_ch = config["in_shape"][0]
        self.stem = nn.Sequential(nn.Conv2d(in_ch, channels[0], 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(channels[0]), nn.PReLU(channels[0]))
        blocks, c_prev = [], channels[0]
        for s, c in enumerate(channels):
            for b in range(BLOCKS_PER_STAGE):
                stride = 2 if s > 0 and b == 0 else 1
                blocks.append(BiRealBlock(c_prev, c, stride))
                c_prev = c
        self.blocks = nn.Sequential(*blocks)
        head = config.get("head", "pool_flatten")
        if head == "gap":
            self.head: nn.Module = GlobalAvgPoolHead(c_prev, config["num_classes"])
        elif head == "pool_flatten":
            h, w = config["in_shape"][1:]
            for _ in channels[1:]:  # every stage after the first halves the size
                h, w = (h + 1) // 2, (w + 1) // 2
            self.head = PoolFlattenHead(c_prev, (h, w), config["num_classes"])
        else:
            raise ValueError(f"birealnet head: {head!r} is not allowed; allowed: pool_flatten, "
                             f"gap")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))

    def sync_config(self) -> None:
        """After surgery: the config's stage widths from the layers (the checkpoint rebuilds
        the model from them)."""
        firsts = [self.blocks[s * BLOCKS_PER_STAGE] for s in range(len(self.config["channels"]))]
        self.config["channels"] = [b.conv.weight.shape[0] for b in firsts]


def default_channels(width: float) -> list[int]:
    return [max(1, round(c * width)) for c in STAGE_CHANNELS]
