"""Binary layers: sign with a straight-through estimator on weights and activations."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from bnnprune.core.errors import UserError


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


class ScaledBinaryConv2d(BinaryConv2d):
    """Bi-Real / XNOR-Net style: sign(w) scaled per output channel by the detached mean |w|."""

    def output_scale(self) -> torch.Tensor:
        """The detached mean |w| per output channel: (C_out,)."""
        return self.weight.detach().abs().mean(dim=(1, 2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * self.output_scale().view(1, -1, 1, 1)


class BinaryLinear(nn.Linear):
    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(binarize(x), binarize(self.weight))


BINARY_LAYERS = (BinaryConv2d, BinaryLinear)

Binary = Sequence[type[nn.Module] | str] | None
"""Which modules are binary: None (the project's own binary layers), module classes, or
qualified module names (as `model.named_modules()` gives them)."""


class BinaryLayerError(UserError, ValueError):
    """A `binary` selection that finds no layer, or a layer that is not a binary layer."""


def binary_layers(model: nn.Module, binary: Binary = None) -> dict[str, nn.Module]:
    """Binary layers by qualified name, in module order: modules whose `weight` parameter's
    sign is what their forward pass uses, 2-D (linear) or 4-D (conv). A model may declare its
    own with a `bnnprune_binary` attribute (what `binary` takes), used when binary is None."""
    modules = dict(model.named_modules())
    if binary is None:
        binary = getattr(model, "bnnprune_binary", None)
    if binary is None:
        found = {n: m for n, m in modules.items() if isinstance(m, BINARY_LAYERS)}
        wanted = "the project's binary layers (BinaryConv2d, BinaryLinear)"
    else:
        if isinstance(binary, str | type):
            binary = [binary]
        classes = tuple(b for b in binary if isinstance(b, type))
        names = [b for b in binary if isinstance(b, str)]
        bad = [b for b in binary if not isinstance(b, str | type)]
        if bad:
            raise BinaryLayerError(f"binary: {bad!r} is not allowed; allowed: module classes or "
                                   f"qualified module names")
        missing = [n for n in names if n not in modules]
        if missing:
            raise BinaryLayerError(f"binary: no module named {missing}; allowed: names from "
                                   f"model.named_modules(), e.g. {list(modules)[1:6]}")
        found = {n: m for n, m in modules.items()
                 if n in names or (classes and isinstance(m, classes))}
        wanted = f"binary={[getattr(b, '__name__', b) for b in binary]}"
    if not found:
        raise BinaryLayerError(f"no binary layer found in {type(model).__name__} with {wanted}; "
                               f"allowed: pass binary= module classes or qualified names")
    for n, m in found.items():
        weight = getattr(m, "weight", None)
        if not isinstance(weight, nn.Parameter):
            raise BinaryLayerError(f"binary layer {n!r} ({type(m).__name__}) has no `weight` "
                                   f"parameter; a binary layer's forward uses sign(weight)")
        if weight.dim() not in (2, 4):
            raise BinaryLayerError(f"binary layer {n!r} ({type(m).__name__}) has a "
                                   f"{weight.dim()}-D weight {tuple(weight.shape)}; allowed: "
                                   f"2-D (linear) or 4-D (conv)")
    return found


@torch.no_grad()
def clip_latent_weights(model: nn.Module, binary: Binary = None) -> None:
    for m in binary_layers(model, binary).values():
        m.weight.clamp_(-1.0, 1.0)
