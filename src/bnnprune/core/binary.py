"""Binary layers: sign with a straight-through estimator on weights and activations."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SignSTE(torch.autograd.Function):
    """sign(x) in {-1, +1} (0 -> +1); gradient passed where |x| <= 1 (hard-tanh STE)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return grad * (x.abs() <= 1).to(grad.dtype)


def binarize(x: torch.Tensor) -> torch.Tensor:
    """+1 where x >= 0 else -1; STE gradient when autograd needs one, plain ops otherwise
    (so inference and ONNX export see only standard ops)."""
    if torch.is_grad_enabled() and x.requires_grad:
        return SignSTE.apply(x)
    return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)


class BinaryConv2d(nn.Conv2d):
    """Conv with sign(weight) on sign(input). The binarised input is padded with +1 (not 0),
    so every tap stays a binary value and the packed kernels compute the same thing."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 padding: int = 0):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding=0, bias=False)
        self.pad = padding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xb = binarize(x)
        if self.pad:
            xb = F.pad(xb, (self.pad,) * 4, value=1.0)
        return F.conv2d(xb, binarize(self.weight), None, self.stride)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", pad={self.pad} (value +1)"


class BinaryLinear(nn.Linear):
    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(binarize(x), binarize(self.weight))


BINARY_LAYERS = (BinaryConv2d, BinaryLinear)


def binary_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Binary layers by qualified name, in forward order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, BINARY_LAYERS)}


@torch.no_grad()
def clip_latent_weights(model: nn.Module) -> None:
    for m in binary_layers(model).values():
        m.weight.clamp_(-1.0, 1.0)
