"""The one global-average-pool classifier head."""

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
