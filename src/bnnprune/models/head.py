"""The classifier heads of the residual models: global average pool + linear, and average
pool + flatten + linear (keeps where on the image a feature was seen)."""

from __future__ import annotations

import torch
from torch import nn


class GlobalAvgPoolHead(nn.Module):
    """(N, C, H, W) -> mean over H, W -> linear -> (N, classes). A 2-D input is taken as
    already pooled."""

    def __init__(self, features: int, num_classes: int):
        super().__init__()
        self.classifier = nn.Linear(features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4:
            x = x.mean(dim=(2, 3))  # (N, C, H, W) -> (N, C)
        return self.classifier(x)


class PoolFlattenHead(nn.Module):
    """(N, C, H, W) -> AvgPool(pool) -> (N, C, H // pool, W // pool) -> flatten -> linear ->
    (N, classes). The chain `cnn`'s head, for a residual stream: on 28x28 Fashion-MNIST it
    scored 91.47% in birealnet against 90.06% with the global average pool (one seed each)."""

    def __init__(self, channels: int, hw: tuple[int, int], num_classes: int, pool: int = 2):
        super().__init__()
        self.pool = nn.AvgPool2d(pool)
        h, w = hw[0] // pool, hw[1] // pool
        self.classifier = nn.Linear(channels * h * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(x).flatten(1))  # (N, C*h*w) -> (N, classes)
