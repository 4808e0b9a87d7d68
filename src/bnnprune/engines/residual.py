"""Packed CPU engine for residual BNNs (Bi-Real / ReActNet style): birealnet and users' models
built from the same blocks.

    engine = PackedResidual.from_model(model)   # eval mode; or PackedModel.from_model (dispatch)
    logits = engine(x)                          # x (B, C, H, W) float32, normalised
    logits = engine(x, times)                   # + seconds per layer, keyed as count_ops rows

The model's forward is traced with torch.fx (binary layers, BatchNorm, PReLU, pools, convs and
`GlobalAvgPoolHead` as leaves) and lowered to a short program (`lower`), shared with the Triton
engine (`triton_engine.TritonResidual`). What it runs:
- the block input's binarisation `sign(x + b)` (a learnable (1, C, 1, 1) threshold shift `b`,
  or none): never a float tensor; the signs are packed in the *producer's* epilogue, one pass
  that writes the float stream (when a float op reads it too) and the packed words
  (`cpu.block_epilogue`); the model input or a pool output is packed by the same kernel
  without the float write;
- binary 3x3 (any k, stride, +1 padding) convs: XNOR-popcount on packed channels-last words,
  im2col on packed words inside the GEMM (`cpu.conv_packed`), int32 outputs;
- the conv's per-output-channel scale (`output_scale()`), BatchNorm, the float residual add
  (identity, or a shortcut's BatchNorm folded in), PReLU (or ReLU): all in that epilogue, in
  float32 and in torch's order of operations;
- float convs (the stem, AvgPool + 1x1 downsample shortcuts, the pool fused into the 1x1 conv):
  numba on channels-last rows (`cpu.float_conv_rows`), their BatchNorm / PReLU in the
  epilogue; other pools and convs torch on channels-last tensors (zero-copy views of the
  engine's (B, H, W, C) arrays);
- the head: an AvgPool2d(k) + flatten(1) + linear or a global mean + linear at the end of the
  program runs as one numba op in the CPU runtime (`fuse_head`, `cpu.pool_linear`); any other
  head in torch.
A binary layer is accepted only after a probe shows it computes conv(sign(x) padded with +1,
sign(W)) [x a per-channel `output_scale()`] (project's `BinaryConv2d`, `ScaledBinaryConv2d`, or
a user's class, e.g. tests/usermodels/tiny_bireal.py's). Anything else (a module, function or
method the program does not know, a binary layer that is something else, zero padding, a
binary linear) raises `EngineUnsupported` naming the module and the op: never a wrong answer.

Memory: the values' buffers are allocated once per batch size, on transparent huge pages, and
shared (`PackedResidual(share_buffers=True)`): measured 2 threads, batch 64, min, interleaved,
against a buffer per op: birealnet 1.11-1.18x faster (huge pages alone 1.03-1.13x;
reports/engine-residual.md, "The buffers").

Exactness: every binary conv's integer outputs are torch's exactly (given the same input
signs); the float stream follows torch's operations in float32, but torch's BatchNorm and 1x1
convs may sum and fuse multiply-adds in another order, so a value within float rounding of a
sign threshold can take the other sign (a documented tie), and logits agree to float
tolerance.
"""

from __future__ import annotations

import math
import operator
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from bnnprune.core.binary import Binary, binary_layers
from bnnprune.engines.kernels import cpu
from bnnprune.engines.kernels.pack import n_words
from bnnprune.models.head import GlobalAvgPoolHead


class EngineUnsupported(ValueError):
    """A model the bit-packed engines cannot run; the message names the module and the op."""


# ---------------------------------------------------------------------------- the program


HUGE_PAGE = 1 << 21  # bytes: a transparent huge page on x86-64
HUGE_ADVISED = 1 << 22  # numpy asks Linux for huge pages on allocations this large (madvise)


def huge_page_bytes(n: int) -> np.ndarray:
    """A uint8 array of n bytes or more (whole huge pages) that starts on a huge-page boundary,
    in an allocation numpy made large enough to ask Linux for transparent huge pages."""
    size = -(-n // HUGE_PAGE) * HUGE_PAGE
    raw = np.empty(max(size + HUGE_PAGE, HUGE_ADVISED), np.uint8)
    start = -raw.ctypes.data % HUGE_PAGE
    return raw[start:start + size]


def as_array(raw: np.ndarray, shape: tuple[int, ...], dtype) -> np.ndarray:
    """The first bytes of `raw` as a C-contiguous array of shape and dtype."""
    n = math.prod(shape) * np.dtype(dtype).itemsize
    return raw[:n].view(dtype).reshape(shape)


def huge_page_empty(shape: tuple[int, ...], dtype) -> np.ndarray:
    """np.empty(shape, dtype) on huge pages (`huge_page_bytes`), however small the array."""
    return as_array(huge_page_bytes(math.prod(shape) * np.dtype(dtype).itemsize), shape, dtype)


@dataclass
class Op:
    """One step of a lowered model. `layer`: the `count_ops` row its time counts to; slots
    index the program's values (set at run time)."""
    kind: str  # input | float_module | float_conv | bin_conv | epilogue | mean | flatten | linear
    #            | pool_linear (the CPU runtime's fused head, `fuse_head`)
    layer: str | None
    src: int = -1
    dst: int = -1
    module: nn.Module | None = None  # float_module / linear: the model's own module
    # bin_conv: sign(W) (Cout, Cin, kh, kw) float32 +-1, stride, pad
    weight: torch.Tensor | None = None
    stride: int = 1
    pad: int = 0
    pool: int = 1  # float_conv: average-pool the input pool x pool first (a shortcut's AvgPool)
    # epilogue: y = PReLU((src * scale) * a1 + b1 + (res * a2 + b2 | res)); out dst, bits
    params: dict[str, torch.Tensor] = field(default_factory=dict)  # scale a1 b1 a2 b2 slope
    res: int = -1
    bits: int = -1  # slot of sign(y + nbias) packed
    nbias: torch.Tensor | None = None
    buffers: dict = field(default_factory=dict)

    def buffer(self, name: str, shape: tuple[int, ...], dtype) -> np.ndarray:
        buf = self.buffers.get(name)
        if buf is None or buf.shape != shape:
            buf = self.buffers[name] = huge_page_empty(shape, dtype)
        return buf


@dataclass
class _Expr:
    """A value pending in an epilogue: PReLU(base * scale * a1 + b1 + residual)."""
    node: fx.Node
    base: int  # slot: int32 binary conv outputs or a float tensor
    layer: str | None
    params: dict[str, torch.Tensor] = field(default_factory=dict)
    res: int = -1
    op: Op | None = None  # the epilogue, once emitted
    slot: int = -1  # its float output (-1: none written)
    channels: int = 0

    @property
    def plain(self) -> bool:  # nothing after the base yet but maybe a scale
        return "a1" not in self.params and self.res < 0 and "slope" not in self.params


@dataclass
class _Mat:
    slot: int
    dims: int  # 4: (B, H, W, C) float, 2: (B, F)
    channels: int = 0


@dataclass
class _Signed:
    """sign(value + bias): read only by binary convs."""
    value: Any
    bias: torch.Tensor  # (C,)


@dataclass
class _Pooled:
    """AvgPool2d(pool) of a float map, left to the 1x1 conv that alone reads it."""
    value: _Mat
    pool: int


@dataclass
class _Param:
    tensor: torch.Tensor
    name: str


@dataclass
class Program:
    ops: list[Op]
    n_slots: int
    out: int  # slot of the logits


def _probe_binary_conv(name: str, module: nn.Module) -> tuple[torch.Tensor, int, int, bool]:
    """(sign(W), stride, padding, scaled) of a binary layer, after checking on random inputs
    that it computes conv(sign(x) padded with +1, sign(W)) [x output_scale() per channel]."""
    what = f"{name} ({type(module).__name__})"
    w = module.weight.detach()
    if w.dim() != 4:
        raise EngineUnsupported(f"{what}: a binary layer with a {w.dim()}-D weight; the engine "
                                f"runs binary convs (4-D weights) only")
    cout, cin, kh, kw = w.shape
    if kh != kw:
        raise EngineUnsupported(f"{what}: a {kh}x{kw} binary conv; square kernels only")
    g = torch.Generator().manual_seed(0)
    sizes = (kh + 5, kh + 6)
    xs = [torch.randn(2, cin, s, s, generator=g) for s in sizes]
    try:
        outs = [module(x) for x in xs]
    except Exception as e:  # noqa: BLE001 - any failure: the layer is not what we run
        raise EngineUnsupported(f"{what}: probing it failed ({e})") from e
    sw = torch.where(w >= 0, 1.0, -1.0)
    scaled = hasattr(module, "output_scale")
    scale = module.output_scale().view(1, -1, 1, 1) if scaled else None
    for stride in (1, 2, 3):
        for pad in range(kh):
            shapes = [(2, cout, (s + 2 * pad - kh) // stride + 1, (s + 2 * pad - kh) // stride + 1)
                      for s in sizes]
            if [tuple(o.shape) for o in outs] != shapes:
                continue
            refs = [F.conv2d(F.pad(torch.where(x >= 0, 1.0, -1.0), (pad,) * 4, value=1.0), sw,
                             None, stride) for x in xs]
            if scale is not None:
                refs = [r * scale for r in refs]
            if all(torch.allclose(o, r, rtol=1e-6, atol=1e-6)
                   for o, r in zip(outs, refs, strict=True)):
                return sw.float().contiguous(), stride, pad, scaled
    raise EngineUnsupported(f"{what}: its output is not conv(sign(x) padded with +1, sign(W))"
                            + (" * output_scale()" if scaled else "") + " for any stride and "
                            "padding (zero padding, other scales or ops are not supported)")


class _Tracer(fx.Tracer):
    def __init__(self, leaves: set[int]):
        super().__init__()
        self.leaves = leaves

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return (id(m) in self.leaves or isinstance(m, GlobalAvgPoolHead)
                or super().is_leaf_module(m, qualname))


def _is_flatten_1(node: fx.Node) -> bool:
    """x.flatten(1) / torch.flatten(x, 1): (N, C, H, W) -> (N, C*H*W) in torch's order."""
    if not ((node.op == "call_method" and node.target == "flatten")
            or (node.op == "call_function" and node.target is torch.flatten)):
        return False
    args = {**dict(zip(("input", "start_dim", "end_dim"), node.args, strict=False)),
            **node.kwargs}
    return args.get("start_dim", 0) == 1 and args.get("end_dim", -1) == -1


def _is_mean_hw(node: fx.Node) -> bool:
    """x.mean(dim=(2, 3)) / torch.mean(x, (2, 3)) / (-2, -1), keepdim False."""
    if not ((node.op == "call_method" and node.target == "mean")
            or (node.op == "call_function" and node.target is torch.mean)):
        return False
    dims = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
    keep = node.kwargs.get("keepdim", node.args[2] if len(node.args) > 2 else False)
    return (isinstance(dims, tuple | list) and sorted(d % 4 for d in dims) == [2, 3]
            and not keep)


def _is_add(node: fx.Node) -> bool:
    return ((node.op == "call_function" and node.target in (operator.add, torch.add))
            or (node.op == "call_method" and node.target == "add")) and not node.kwargs


@torch.no_grad()
def bn_affine(bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode BatchNorm as y * alpha + beta per channel (float32), folded as torch folds it
    (the one place the engines fold a BatchNorm)."""
    alpha = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        alpha = alpha * bn.weight
    beta = -bn.running_mean * alpha
    if bn.bias is not None:
        beta = beta + bn.bias
    return alpha.float().detach().clone(), beta.float().detach().clone()


def _plain_conv(m: nn.Conv2d) -> bool:
    """A square, undilated, ungrouped, zero-padded conv with one stride and padding (what
    `cpu.float_conv_rows` runs)."""
    return (m.groups == 1 and m.padding_mode == "zeros" and not isinstance(m.padding, str)
            and m.dilation == (1, 1) and m.kernel_size[0] == m.kernel_size[1]
            and m.stride[0] == m.stride[1] and m.padding[0] == m.padding[1])


def _pool_size(m: nn.Module) -> int:
    """k of an AvgPool2d(k) with stride k, no padding, floor mode; else 0."""
    if not isinstance(m, nn.AvgPool2d) or m.ceil_mode or m.divisor_override:
        return 0
    vals = [v if isinstance(v, tuple) else (v, v) for v in (m.kernel_size, m.stride, m.padding)]
    k, st, pd = vals
    return k[0] if k[0] == k[1] and st == k and pd == (0, 0) else 0


def arch_name(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    arch = config.get("arch") if isinstance(config, dict) else None
    return arch or type(model).__name__


@torch.no_grad()
def lower(model: nn.Module, binary: Binary = None) -> Program:
    """The model's forward as a `Program` of engine ops; `EngineUnsupported` names the first
    module / op it cannot run."""
    if model.training:
        raise ValueError("the packed engines: put the model in eval mode first")
    arch = arch_name(model)
    try:
        binaries = binary_layers(model, binary)
    except ValueError as e:
        raise EngineUnsupported(f"{arch}: {e}") from e
    try:
        graph = _Tracer({id(m) for m in binaries.values()}).trace(model)
    except Exception as e:  # noqa: BLE001 - fx raises many kinds
        raise EngineUnsupported(f"{arch}: torch.fx cannot trace its forward ({e}); the engine "
                                f"runs models whose forward is a traceable graph") from e
    return _Lowering(model, arch, binaries).run(graph)


class _Lowering:
    def __init__(self, model: nn.Module, arch: str, binaries: dict[str, nn.Module]):
        self.model, self.arch, self.binaries = model, arch, binaries
        self.modules = dict(model.named_modules())
        self.ops: list[Op] = []
        self.n_slots = 0
        self.env: dict[fx.Node, Any] = {}
        self.packs: dict[tuple[int, int], int] = {}  # (float slot, id(bias)) -> bits slot

    def fail(self, node: fx.Node, what: str) -> EngineUnsupported:
        if node.op == "call_module":
            m = self.modules[node.target]
            where = f"module {node.target} ({type(m).__name__})"
        else:
            where = f"{node.op} {getattr(node.target, '__name__', node.target)} ({node.name})"
        return EngineUnsupported(f"{self.arch}: {where}: {what}; the packed engines run "
                                 f"residual BNN blocks (sign with a (1, C, 1, 1) threshold, "
                                 f"binary convs, BatchNorm, residual add, PReLU, AvgPool + "
                                 f"1x1 conv shortcuts, a float stem, a GAP + linear head) and "
                                 f"chain BNNs")

    def slot(self) -> int:
        self.n_slots += 1
        return self.n_slots - 1

    def emit(self, op: Op) -> Op:
        self.ops.append(op)
        return op

    # values ---------------------------------------------------------------------------

    def only_signs(self, node: fx.Node) -> bool:
        """Is every reader of `node` a sign (a binary conv, or a threshold add read only by
        binary convs)?"""
        for user in node.users:
            if user.op == "call_module" and user.target in self.binaries:
                continue
            if _is_add(user) and isinstance(self.env.get(user), _Signed):
                continue
            if _is_add(user) and self._threshold_add(user) is not None:
                continue
            return False
        return True

    def mat(self, v: Any, node: fx.Node) -> _Mat:
        """A float tensor of the value (the pending epilogue emitted, its float written)."""
        if isinstance(v, _Mat):
            return v
        if isinstance(v, _Expr):
            if v.op is None:
                v.slot = self.slot()
                v.op = self.emit(Op("epilogue", v.layer, src=v.base, dst=v.slot,
                                    params=self.full(v.params, v.channels), res=v.res))
            elif v.slot < 0:  # emitted for signs only so far: write the float too
                v.slot = v.op.dst = self.slot()
            return _Mat(v.slot, 4, v.channels)
        raise self.fail(node, "its input is not a float feature map")

    def bits(self, v: Any, bias: torch.Tensor, layer: str, node: fx.Node) -> int:
        """Slot of sign(v + bias) packed channels-last, from v's epilogue when possible."""
        if isinstance(v, _Expr):
            if v.op is None:
                writes = not self.only_signs(v.node)
                v.slot = self.slot() if writes else -1
                v.op = self.emit(Op("epilogue", v.layer, src=v.base, dst=v.slot,
                                    params=self.full(v.params, v.channels), res=v.res))
            if v.op.bits < 0:
                v.op.bits, v.op.nbias = self.slot(), bias
                return v.op.bits
            if v.op.nbias is bias:
                return v.op.bits
            v = self.mat(v, node)
        if not isinstance(v, _Mat) or v.dims != 4:
            raise self.fail(node, "its input is not a float feature map")
        key = (v.slot, id(bias))
        if key not in self.packs:
            ones = torch.ones(v.channels)
            op = self.emit(Op("epilogue", layer, src=v.slot, params={
                "scale": ones, "a1": ones, "b1": torch.zeros(v.channels)}))
            op.bits, op.nbias = self.slot(), bias
            self.packs[key] = op.bits
        return self.packs[key]

    def _threshold_add(self, node: fx.Node) -> tuple[fx.Node, torch.Tensor] | None:
        """(x, b) for `x + b` with b a (1, C, 1, 1) parameter or buffer read only by binary
        convs, else None."""
        if not _is_add(node) or len(node.args) != 2:
            return None
        a, b = node.args
        pa, pb = (isinstance(self.env.get(n), _Param) if isinstance(n, fx.Node) else False
                  for n in (a, b))
        if pa == pb:
            return None
        x, p = (b, a) if pa else (a, b)
        t = self.env[p].tensor
        if t.dim() != 4 or t.shape[0] != 1 or t.shape[2:] != (1, 1):
            return None
        if not node.users or not all(u.op == "call_module" and u.target in self.binaries
                                     for u in node.users):
            return None
        return x, t.detach().reshape(-1).float().clone()

    # the walk --------------------------------------------------------------------------

    def run(self, graph: fx.Graph) -> Program:
        out = -1
        for node in graph.nodes:
            if node.op == "placeholder":
                if self.env:
                    raise self.fail(node, "a second input")
                s = self.slot()
                self.emit(Op("input", None, dst=s))
                self.env[node] = _Mat(s, 4, int(self.model_in_channels()))
            elif node.op == "get_attr":
                t = self.model.get_parameter(node.target) if node.target in dict(
                    self.model.named_parameters()) else self.model.get_buffer(node.target)
                self.env[node] = _Param(t, node.target)
            elif node.op == "call_module":
                self.env[node] = self.module(node)
            elif node.op in ("call_function", "call_method"):
                self.env[node] = self.function(node)
            elif node.op == "output":
                v = self.env.get(node.args[0]) if isinstance(node.args[0], fx.Node) else None
                if not (isinstance(v, _Mat) and v.dims == 2 and getattr(v, "logits", False)):
                    raise self.fail(node, "the output is not a linear layer's logits")
                out = v.slot
        # ops without a layer of their own (pools, means, packs of the input) count to the
        # next op that has one, or to the last one
        pending: list[Op] = []
        last = None
        for op in self.ops:
            if op.layer is None:
                pending.append(op)
                continue
            for p in pending:
                p.layer = op.layer
            pending, last = [], op.layer
        for p in pending:
            p.layer = last
        return Program(self.ops, self.n_slots, out)

    def model_in_channels(self) -> int:
        config = getattr(self.model, "config", None)
        if isinstance(config, dict) and "in_shape" in config:
            return config["in_shape"][0]
        first = next((m for m in self.model.modules() if isinstance(m, nn.Conv2d)), None)
        return first.in_channels if first is not None else 0

    def arg(self, node: fx.Node, i: int = 0) -> Any:
        a = node.args[i]
        if not isinstance(a, fx.Node) or a not in self.env:
            raise self.fail(node, f"argument {i} is not a tensor the engine computed")
        return self.env[a]

    def module(self, node: fx.Node) -> Any:
        name, m = node.target, self.modules[node.target]
        if len(node.args) != 1 or node.kwargs:
            raise self.fail(node, "called with more than one input")
        src = node.args[0]
        v = self.arg(node)
        single = len(src.users) == 1 and (not isinstance(v, _Expr) or len(v.node.users) == 1)
        if name in self.binaries:
            w, stride, pad, scaled = _probe_binary_conv(name, m)
            if isinstance(v, _Signed):
                x, bias = v.value, v.bias
            else:
                x, bias = v, torch.zeros(w.shape[1])
            bits = self.bits(x, bias, name, node)
            acc = self.slot()
            self.emit(Op("bin_conv", name, src=bits, dst=acc, weight=w, stride=stride,
                         pad=pad))
            params = {"scale": m.output_scale().detach().float().clone() if scaled
                      else torch.ones(w.shape[0])}
            return _Expr(node, acc, name, params, channels=w.shape[0])
        if type(m) is nn.Identity:
            return v
        if isinstance(m, nn.Conv2d):
            if m.groups != 1 or m.padding_mode != "zeros":
                raise self.fail(node, "a grouped or non-zero-padded float conv")
            pool = 1
            if isinstance(v, _Pooled):
                v, pool = v.value, v.pool
            x = self.mat(v, src)
            out = self.slot()
            if _plain_conv(m):  # numba, channels-last rows (the AvgPool before it fused in)
                self.emit(Op("float_conv", name, src=x.slot, dst=out, module=m,
                             stride=m.stride[0], pad=m.padding[0], pool=pool))
            else:
                if pool > 1:  # cannot happen: _Pooled is only made for a plain 1x1 conv
                    raise self.fail(node, "a pooled input to a conv the engine cannot fuse")
                self.emit(Op("float_module", name, src=x.slot, dst=out, module=m))
            ones = torch.ones(m.out_channels)
            return _Expr(node, out, name, {"scale": ones}, channels=m.out_channels)
        if isinstance(m, nn.AvgPool2d | nn.MaxPool2d):
            x = self.mat(v, src)
            users = list(node.users)
            pool = _pool_size(m)
            if (pool and len(users) == 1 and users[0].op == "call_module"
                    and isinstance(conv := self.modules[users[0].target], nn.Conv2d)
                    and _plain_conv(conv) and conv.kernel_size == (1, 1)
                    and conv.stride == (1, 1) and conv.padding == (0, 0)):
                return _Pooled(x, pool)
            out = self.slot()
            self.emit(Op("float_module", None, src=x.slot, dst=out, module=m))
            return _Mat(out, 4, x.channels)
        if isinstance(m, nn.BatchNorm2d):
            alpha, beta = bn_affine(m)
            if isinstance(v, _Expr) and v.plain and single and v.op is None:
                v.params = {**v.params, "a1": alpha, "b1": beta}
                v.node = node
                return v
            x = self.mat(v, src)
            return _Expr(node, x.slot, None, {"scale": torch.ones(len(alpha)), "a1": alpha,
                                              "b1": beta}, channels=len(alpha))
        if isinstance(m, nn.PReLU | nn.ReLU):
            if isinstance(m, nn.ReLU):
                c = v.channels if isinstance(v, _Expr | _Mat) else 0
                slope = torch.zeros(c)
            else:
                c = v.channels if isinstance(v, _Expr | _Mat) else m.num_parameters
                slope = m.weight.detach().float().reshape(-1).expand(c).clone()
            if isinstance(v, _Expr) and single and v.op is None and "slope" not in v.params:
                v.params = {**self.full(v.params, v.channels), "slope": slope}
                v.node = node
                return v
            x = self.mat(v, src)
            return _Expr(node, x.slot, None, {**self.full({}, x.channels), "slope": slope},
                         channels=x.channels)
        if isinstance(m, GlobalAvgPoolHead):
            x = self.mat(v, src)
            pooled = self.slot()
            self.emit(Op("mean", None, src=x.slot, dst=pooled))
            return self.linear(node, m.classifier, f"{name}.classifier", pooled)
        if isinstance(m, nn.Linear):
            if not (isinstance(v, _Mat) and v.dims == 2):
                raise self.fail(node, "a linear layer on a feature map (pool it first)")
            return self.linear(node, m, name, v.slot)
        raise self.fail(node, "not a module the engine runs")

    @staticmethod
    def full(params: dict[str, torch.Tensor], c: int) -> dict[str, torch.Tensor]:
        """params with the scale and BatchNorm an epilogue needs (identity where missing)."""
        ones = torch.ones(c)
        return {"scale": ones, "a1": ones, "b1": torch.zeros(c), **params}

    def linear(self, node: fx.Node, m: nn.Linear, name: str, src: int) -> _Mat:
        out = self.slot()
        self.emit(Op("linear", name, src=src, dst=out, module=m))
        v = _Mat(out, 2, m.out_features)
        v.logits = True  # type: ignore[attr-defined]
        return v

    def function(self, node: fx.Node) -> Any:
        if _is_add(node):
            th = self._threshold_add(node)
            if th is not None:
                x, bias = th
                return _Signed(self.env[x], bias)
            if len(node.args) != 2 or not all(isinstance(a, fx.Node) for a in node.args):
                raise self.fail(node, "an add that is not of two feature maps")
            a, b = (self.env[n] for n in node.args)
            if any(isinstance(v, _Param | _Signed) for v in (a, b)):
                raise self.fail(node, "an add of a parameter whose result a float op reads")
            # the main branch: an epilogue still open (single reader); the other is the shortcut
            def open_(v: Any, n: fx.Node) -> bool:
                return (isinstance(v, _Expr) and v.op is None and v.res < 0
                        and "slope" not in v.params and len(n.users) == 1
                        and len(v.node.users) == 1)

            if open_(a, node.args[0]):
                main, other, onode = a, b, node.args[1]
            elif open_(b, node.args[1]):
                main, other, onode = b, a, node.args[0]
            else:  # two materialised maps: y = a + b
                x = self.mat(a, node.args[0])
                main = _Expr(node, x.slot, None, self.full({}, x.channels),
                             channels=x.channels)
                other, onode = b, node.args[1]
            params = self.full(main.params, main.channels)
            if (isinstance(other, _Expr) and other.op is None and len(onode.users) == 1
                    and len(other.node.users) == 1
                    and set(other.params) <= {"scale", "a1", "b1"}
                    and bool((other.params.get("scale", torch.ones(1)) == 1).all())):
                params.update(a2=other.params.get("a1", torch.ones(other.channels)),
                              b2=other.params.get("b1", torch.zeros(other.channels)))
                res = other.base  # the shortcut's BatchNorm folded into this epilogue
            else:
                res = self.mat(other, onode).slot
            main.params, main.res, main.node = params, res, node
            return main
        if _is_mean_hw(node):
            x = self.mat(self.arg(node), node.args[0])
            out = self.slot()
            self.emit(Op("mean", None, src=x.slot, dst=out))
            return _Mat(out, 2, x.channels)
        if _is_flatten_1(node):
            x = self.mat(self.arg(node), node.args[0])
            if x.dims == 2:
                return x
            out = self.slot()
            self.emit(Op("flatten", None, src=x.slot, dst=out))
            return _Mat(out, 2, 0)
        raise self.fail(node, "not an operation the engine runs")


# ---------------------------------------------------------------------------- CPU runtime


def _np(t: torch.Tensor | None) -> np.ndarray | None:
    return None if t is None else np.ascontiguousarray(t.detach().float().numpy())


def _nhwc(a: np.ndarray) -> torch.Tensor:
    """(B, H, W, C) array -> a (B, C, H, W) channels-last tensor, no copy."""
    return torch.from_numpy(a).permute(0, 3, 1, 2)


def fuse_head(ops: list[Op]) -> list[Op]:
    """ops with a trailing AvgPool2d(k) -> flatten -> linear, or mean -> linear, as one
    `pool_linear` op (pool k; 0 for the mean), when nothing else reads the values between."""
    def reads(slot: int) -> int:
        return sum(o.src == slot or o.res == slot for o in ops)

    tail = [o.kind for o in ops[-3:]]
    if tail == ["float_module", "flatten", "linear"]:
        pool_op, flat, lin = ops[-3:]
        pool = _pool_size(pool_op.module)
        chained = flat.src == pool_op.dst and lin.src == flat.dst
        if pool and chained and reads(pool_op.dst) == 1 and reads(flat.dst) == 1:
            return ops[:-3] + [Op("pool_linear", lin.layer, src=pool_op.src, dst=lin.dst,
                                  module=lin.module, pool=pool)]
    if tail[-2:] == ["mean", "linear"]:
        mean, lin = ops[-2:]
        if lin.src == mean.dst and reads(mean.dst) == 1:
            return ops[:-2] + [Op("pool_linear", lin.layer, src=mean.src, dst=lin.dst,
                                  module=lin.module, pool=0)]
    return ops


def _lap(times: dict[str, float], name: str, since: float) -> float:
    now = time.perf_counter()
    times[name] = times.get(name, 0.0) + now - since
    return now


class PackedResidual:
    """A residual BNN lowered to the packed numba kernels (see the module doc)."""

    def __init__(self, model: nn.Module, program: Program, share_buffers: bool = True):
        self.model = model
        self.program = program
        self.ops = fuse_head(program.ops)
        # share_buffers: a value's buffer (bytes on huge pages) is reused once its last
        # reader has run, so the engine's memory stays near the largest set of values alive at
        # once (birealnet, batch 64: 27 MB in 4 buffers, against 64 MB in 22, which outgrew
        # the 32 MB L3); off, every op keeps its own (to inspect values after a call). Either
        # way one engine runs one call at a time.
        self.share_buffers = share_buffers
        self._last_read: dict[int, int] = {}
        for i, op in enumerate(self.ops):
            for slot in (op.src, op.res):
                if slot >= 0:
                    self._last_read[slot] = i
        self._plan: dict[int, np.ndarray] = {}  # value slot -> its array, this batch size
        self._plan_batch = -1
        self._free: list[np.ndarray] = []  # while planning: bytes no value holds
        self._held: dict[int, np.ndarray] = {}  # while planning: slot -> its bytes
        for op in self.ops:  # per-op constants in the kernels' layouts, once
            if op.kind == "bin_conv":
                op.buffers["weight"] = cpu.pack_conv_weight(op.weight.numpy())
            if op.kind == "float_conv":
                op.buffers["weight"] = _np(op.module.weight)
                op.buffers["bias"] = _np(op.module.bias)
            if op.kind == "epilogue":
                op.buffers["vec"] = {k: _np(v) for k, v in op.params.items()}
                op.buffers["nbias"] = _np(op.nbias)

    @classmethod
    def from_model(cls, model: nn.Module, binary: Binary = None,
                   share_buffers: bool = True) -> PackedResidual:
        """Lower `model` (eval mode); `EngineUnsupported` if a block cannot run."""
        return cls(model, lower(model, binary), share_buffers)

    @property
    def layers(self) -> list[str]:
        """The layers `engine(x, times)` clocks, in order (count_ops row names)."""
        return list(dict.fromkeys(op.layer for op in self.ops if op.layer))

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, times: dict[str, float] | None = None) -> torch.Tensor:
        """x (B, C, H, W) float32 -> logits (B, classes); `times` gets each layer's seconds."""
        env: list[Any] = [None] * self.program.n_slots
        planning = self.share_buffers and len(x) != self._plan_batch
        if planning:  # the first call at this batch size hands out the buffers (`_buffer`)
            self._plan, self._plan_batch, self._free, self._held = {}, -1, [], {}
        clock = time.perf_counter()
        for i, op in enumerate(self.ops):
            getattr(self, f"_{op.kind}")(op, env, x)
            if planning:
                for slot in (op.dst, op.bits, op.src, op.res):  # values no later op reads
                    if slot in self._held and self._last_read.get(slot, i) <= i:
                        self._free.append(self._held.pop(slot))
            if times is not None:
                clock = _lap(times, op.layer, clock)
        if planning:  # later calls at this batch size take the same buffers, planned
            self._plan_batch = len(x)
        return env[self.program.out]

    def _buffer(self, op: Op, name: str, slot: int, shape: tuple[int, ...], dtype
                ) -> np.ndarray:
        """The array that holds value `slot` (op's output `name`) until its last reader. The
        first call at a batch size chooses it: the smallest free buffer it fits in (of those,
        the one freed last: still in cache), or a new one; later calls find it planned."""
        if not self.share_buffers:
            return op.buffer(name, shape, dtype)
        planned = self._plan.get(slot)
        if planned is not None:
            return planned
        n = math.prod(shape) * np.dtype(dtype).itemsize
        fits = [i for i, raw in enumerate(self._free) if raw.nbytes >= n]
        if fits:
            raw = self._free.pop(min(reversed(fits), key=lambda i: self._free[i].nbytes))
        else:
            raw = huge_page_bytes(n)
        self._held[slot] = raw
        self._plan[slot] = as_array(raw, shape, dtype)
        return self._plan[slot]

    forward = __call__

    def _input(self, op: Op, env: list, x: torch.Tensor) -> None:
        env[op.dst] = np.ascontiguousarray(x.detach().float().permute(0, 2, 3, 1).numpy())

    def _float_module(self, op: Op, env: list, x: torch.Tensor) -> None:
        y = op.module(_nhwc(env[op.src]))  # channels-last in, channels-last out
        env[op.dst] = y.permute(0, 2, 3, 1).contiguous().numpy()  # (B, OH, OW, C), no copy

    def _float_conv(self, op: Op, env: list, x: torch.Tensor) -> None:
        src = env[op.src]  # (B, H, W, Cin)
        b, h, w, _ = src.shape
        m = op.module
        k = m.kernel_size[0]
        oh = (h // op.pool + 2 * op.pad - k) // op.stride + 1
        ow = (w // op.pool + 2 * op.pad - k) // op.stride + 1
        out = self._buffer(op, "out", op.dst, (b * oh * ow, m.out_channels), np.float32)
        cpu.float_conv_rows(src, op.buffers["weight"], op.buffers["bias"], op.stride, op.pad,
                            op.pool, out)
        env[op.dst] = out.reshape(b, oh, ow, -1)

    def _bin_conv(self, op: Op, env: list, x: torch.Tensor) -> None:
        xc = env[op.src]  # (B, H, W, Cin_words) uint64
        b, h, w, _ = xc.shape
        cout, cin, k, _ = op.weight.shape
        oh = (h + 2 * op.pad - k) // op.stride + 1
        ow = (w + 2 * op.pad - k) // op.stride + 1
        pw = cpu.PackedConvWeight(op.buffers["weight"].words, cin, k, k)
        acc = self._buffer(op, "acc", op.dst, (b * oh * ow, cout), np.int32)
        cpu.conv_packed(xc, pw, op.stride, op.pad, out=acc)
        env[op.dst] = acc.reshape(b, oh, ow, cout)

    def _epilogue(self, op: Op, env: list, x: torch.Tensor) -> None:
        src = env[op.src]
        b, h, w, m = src.shape
        vec = op.buffers["vec"]
        res = env[op.res].reshape(-1, m) if op.res >= 0 else None
        n = b * h * w
        out = self._buffer(op, "out", op.dst, (n, m), np.float32) if op.dst >= 0 else None
        bits = (self._buffer(op, "bits", op.bits, (n, n_words(m)), np.uint64) if op.bits >= 0
                else None)
        cpu.block_epilogue(src.reshape(-1, m), vec["scale"], vec["a1"], vec["b1"], res,
                           vec.get("a2"), vec.get("b2"), vec.get("slope"), out,
                           op.buffers["nbias"], bits)
        if out is not None:
            env[op.dst] = out.reshape(b, h, w, m)
        if bits is not None:
            env[op.bits] = bits.reshape(b, h, w, -1)

    def _mean(self, op: Op, env: list, x: torch.Tensor) -> None:
        env[op.dst] = _nhwc(env[op.src]).mean(dim=(2, 3))  # (B, C)

    def _flatten(self, op: Op, env: list, x: torch.Tensor) -> None:
        env[op.dst] = _nhwc(env[op.src]).flatten(1)  # (B, C*H*W), torch's (C, H, W) order

    def _linear(self, op: Op, env: list, x: torch.Tensor) -> None:
        env[op.dst] = op.module(env[op.src])

    def _pool_linear(self, op: Op, env: list, x: torch.Tensor) -> None:
        m = op.module  # a new array each call: the logits outlive the call
        env[op.dst] = torch.from_numpy(cpu.pool_linear(env[op.src], op.pool, m.weight.detach(),
                                                       m.bias))
