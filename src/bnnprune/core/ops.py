"""Operation and size counting for any model the project builds, pruned or not.

What is counted (per image, the convention of the BNN papers: conv and fc MACs only):
- binary conv/linear: `BOPs = out_elements * C_in * k_h * k_w` binary multiply-accumulates
  (XNOR + popcount), `out_elements` taken before pooling;
- float conv/linear (the first conv and the classifier): `FLOPs` counted the same way, as
  multiply-accumulates (MACs), so 1 FLOP here = 1 MAC; the classifier's bias is not counted;
- `OPs = BOPs / 64 + FLOPs` (Bi-Real Net);
- BatchNorm, pooling, sign and the global average pool are *not* counted: at inference BN +
  sign folds into a per-channel threshold compare, and pooling costs no multiplies.

Model size: 1 bit per binary weight, 32 bits per float parameter: the first conv's weights,
the classifier's weights and bias, and 2 per BatchNorm channel (its running statistics fold
into the affine scale and shift at inference, so they are not stored separately).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from torch import nn

from bnnprune.models.chain import BNN, conv_out_hw, layer_specs


def count_ops(model: BNN | dict[str, Any]) -> dict[str, Any]:
    """{'layers': [one row per body layer + 'classifier'], 'total': {...}} for a model or the
    config that builds it (`channels` included, so pruned models are counted as they are)."""
    config = model.config if isinstance(model, nn.Module) else model
    specs, head = layer_specs(config)
    in_ch, h, w = config["in_shape"]
    spatial = True
    rows = []
    for i, spec in enumerate(specs):
        if spec.kind == "conv":
            out_h, out_w = conv_out_hw(replace(spec, pool=None), h, w)
            k2 = spec.kernel * spec.kernel
            macs = spec.out * out_h * out_w * in_ch * k2
            weights = spec.out * in_ch * k2
            h, w = conv_out_hw(spec, h, w)
        else:
            if spatial:
                in_ch, spatial = in_ch * h * w, False  # flatten (C, H, W) -> C*H*W
            macs = weights = spec.out * in_ch
        rows.append(_row(f"blocks.{i}", spec.kind, spec.binary, in_ch, spec.out, macs, weights,
                         float_params=2 * spec.out))  # BN scale + shift
        in_ch = spec.out
    features = in_ch * h * w if (spatial and head == "flatten") else in_ch
    classes = config["num_classes"]
    rows.append(_row("classifier", "linear", False, features, classes, features * classes,
                     features * classes, float_params=classes))  # bias
    total = {key: sum(r[key] for r in rows) for key in
             ("bops", "flops", "binary_params", "float_params", "size_bits")}
    total["ops"] = total["bops"] / 64 + total["flops"]
    total["size_bytes"] = total["size_bits"] / 8
    return {"layers": rows, "total": total}


def _row(name: str, kind: str, binary: bool, in_ch: int, out_ch: int, macs: int, weights: int,
         float_params: int) -> dict[str, Any]:
    bops, flops = (macs, 0) if binary else (0, macs)
    binary_params = weights if binary else 0
    float_params += 0 if binary else weights
    return {"name": name, "kind": kind, "binary": binary, "in_channels": in_ch,
            "out_channels": out_ch, "bops": bops, "flops": flops, "ops": bops / 64 + flops,
            "binary_params": binary_params, "float_params": float_params,
            "size_bits": binary_params + 32 * float_params}


def reduction_pct(before: float, after: float) -> float:
    """How much smaller `after` is than `before`, in % (0 when `before` is 0)."""
    return 100.0 * (before - after) / before if before else 0.0
