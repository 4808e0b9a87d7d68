"""Operation and size counting from a real forward pass, on any topology.

What is counted (per image, the convention of the BNN papers: conv and fc MACs only):
- a binary layer: `BOPs = output elements * weights per output channel` binary
  multiply-accumulates (XNOR + popcount), taken on the layer's own output (before pooling);
- a float `nn.Conv2d` / `nn.Linear` (stem, shortcuts' 1x1 convs, classifier): `FLOPs` counted
  the same way, as multiply-accumulates (MACs), so 1 FLOP here = 1 MAC; biases are not counted;
- `OPs = BOPs / 64 + FLOPs` (Bi-Real Net);
- BatchNorm, pooling, sign, PReLU, biases and residual adds are *not* counted: at inference BN +
  bias + sign fold into a per-channel threshold compare, and adds and pools cost no multiplies.
Counting each layer on its real output gets strides, groups (a depthwise conv's weights per
output channel are its k*k taps), shortcuts and downsample convs right by construction.

Model size: 1 bit per binary weight, 32 bits per other parameter (BatchNorm's running
statistics are buffers: they fold into its affine scale and shift at inference).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from bnnprune.core.binary import Binary, binary_layers


@dataclass
class OpCount:
    """`count_ops`' answer: per-image totals and one row per counted layer (forward order)."""

    layers: list[dict[str, Any]] = field(default_factory=list)
    bops: int = 0
    flops: int = 0
    binary_params: int = 0
    float_params: int = 0

    @property
    def ops(self) -> float:
        return self.bops / 64 + self.flops

    @property
    def size_bits(self) -> int:
        return self.binary_params + 32 * self.float_params

    @property
    def total(self) -> dict[str, Any]:
        return {"bops": self.bops, "flops": self.flops, "binary_params": self.binary_params,
                "float_params": self.float_params, "size_bits": self.size_bits,
                "ops": self.ops, "size_bytes": self.size_bits / 8}

    def to_dict(self) -> dict[str, Any]:
        return {"layers": self.layers, "total": self.total}

    def row(self, name: str) -> dict[str, Any]:
        for r in self.layers:
            if r["name"] == name:
                return r
        raise KeyError(f"no counted layer {name!r}; layers: {[r['name'] for r in self.layers]}")


def example_input(model: nn.Module) -> torch.Tensor:
    """One zero image shaped by the model's config `in_shape` (the project's models)."""
    config = getattr(model, "config", None)
    if not isinstance(config, dict) or "in_shape" not in config:
        raise ValueError(f"{type(model).__name__}: pass example_inputs (a batch the model takes); "
                         f"only models with a config 'in_shape' have a default")
    return torch.zeros(1, *config["in_shape"])


def count_ops(model: nn.Module, example_inputs: torch.Tensor | tuple | None = None,
              binary: Binary = None) -> OpCount:
    """Count BOPs, FLOPs and size of `model` by running it once on `example_inputs` (a batch;
    counts are per image). `binary` selects the binary layers (see `binary_layers`)."""
    if example_inputs is None:
        example_inputs = example_input(model)
    inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    batch = inputs[0].shape[0]
    binaries = binary_layers(model, binary)
    inside_binary = {n for n, _ in model.named_modules()
                     if any(n.startswith(b + ".") for b in binaries)}
    counted = {n: m for n, m in model.named_modules() if n in binaries
               or (n not in inside_binary and isinstance(m, nn.Conv2d | nn.Linear))}
    result = OpCount()
    seen: set[str] = set()

    def hook(name: str, module: nn.Module):
        def record(_m: nn.Module, args: tuple, out: torch.Tensor) -> None:
            if name in seen:
                raise ValueError(f"layer {name!r} ran twice in one forward pass; count_ops "
                                 f"counts each layer once: shared layers are not supported")
            seen.add(name)
            weight = module.weight
            is_binary = name in binaries
            out_ch = out.shape[1]
            per_out = weight.numel() // out_ch  # weights feeding one output element
            macs = out.numel() // batch * per_out
            params = sum(p.numel() for p in module.parameters())
            binary_params = weight.numel() if is_binary else 0
            row = {"name": name, "kind": "conv" if weight.dim() == 4 else "linear",
                   "binary": is_binary, "module": type(module).__name__,
                   "in_channels": int(args[0].shape[1]), "out_channels": int(out_ch),
                   "bops": macs if is_binary else 0, "flops": 0 if is_binary else macs,
                   "binary_params": binary_params, "float_params": params - binary_params}
            row["ops"] = row["bops"] / 64 + row["flops"]
            row["size_bits"] = binary_params + 32 * row["float_params"]
            result.layers.append(row)
        return record

    handles = [m.register_forward_hook(hook(n, m)) for n, m in counted.items()]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(*inputs)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    result.bops = sum(r["bops"] for r in result.layers)
    result.flops = sum(r["flops"] for r in result.layers)
    binary_weights = {id(m.weight) for m in binaries.values()}
    for p in model.parameters():
        if id(p) in binary_weights:
            result.binary_params += p.numel()
        else:
            result.float_params += p.numel()
    return result


def reduction_pct(before: float, after: float) -> float:
    """How much smaller `after` is than `before`, in % (0 when `before` is 0)."""
    return 100.0 * (before - after) / before if before else 0.0
