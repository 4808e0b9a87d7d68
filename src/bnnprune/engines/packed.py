"""Packed inference engine: a trained `BNN` compiled to the bit-packed numba CPU kernels.

    engine = PackedModel.from_model(model)      # model in eval mode; weights packed once
    logits = engine(x)                           # x (B, C, H, W) float32, normalised

Per block of the model (layer -> pool -> BatchNorm):
- float layers (the first conv; any non-binary layer) run the model's own torch block;
- binary conv: sign(x) packed channels-last (or the packed bits a fused previous block made),
  packed im2col with +1 padding, XNOR-popcount GEMM -> int32, then the model's own pool + BN
  modules in torch on the (exact) integer outputs as float32;
- binary linear: sign(x) packed along features (NCHW flatten order, as `Block` flattens),
  binary GEMM -> int32 -> the model's BN in torch;
- fused path: when a binary block has no pooling (or, for convs, max pooling) and the next
  block is a binary layer of the same kind, BN + sign is folded into the GEMM
  (`binary_gemm_sign`), which emits the packed bits the next layer reads. Max pooling then runs
  on the bits: sign(BN(max acc)) is the OR of the window's bits where BN increases in acc
  (s >= 0) and the AND where it decreases (s < 0); padded positions are left out, as
  MaxPool2d's -inf padding never wins. The per-channel (s, t) threshold is read off the
  model's own float32 BatchNorm evaluated at every reachable integer conv output
  (|acc| <= K), so it reproduces torch's rounding exactly, ties included; a channel whose
  float32 BN sign is not a single step in acc (never seen in practice) makes the block fall
  back to the unfused path.
- float stem: a float first conv followed by a binary conv runs as one numba kernel
  (`float_conv_sign`: conv, BatchNorm as torch's per-channel alpha * y + beta, sign, packed
  bits; max pooling then on the bits as above). Its float32 sums are not torch's summation
  order, so a value within float rounding of the BN threshold can take the other sign; the
  benchmark stage counts prediction mismatches on the whole test set to show it does not
  matter.
- float tail: the last binary layer, its max pool and BatchNorm, the head (flatten or global
  average) and the classifier run in numba too (`classify`), so with the default models no
  torch op runs at inference and the cores are never handed between two thread pools.
Blocks none of this covers (average pooling between binary layers) run as torch modules.
Threads: the kernels obey `numba.set_num_threads`, torch fallbacks `torch.set_num_threads`.
Per-layer time: `engine(x, times)` adds each layer's seconds to the dict `times`, keyed as
`ops.count_ops` names its rows (`blocks.<i>.layer`, `classifier`: the head and classifier), so time
and work line up layer by layer; a block's im2col, GEMM, pooling and packing count to it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from bnnprune.core.binary import BinaryConv2d, BinaryLinear
from bnnprune.engines.kernels import cpu
from bnnprune.engines.kernels.pack import n_words
from bnnprune.engines.residual import PackedResidual
from bnnprune.engines.residual import bn_affine as residual_bn_affine
from bnnprune.models.chain import BNN


@torch.no_grad()
def exact_bn_sign_threshold(bn: nn.Module, k: int) -> tuple[np.ndarray, np.ndarray] | None:
    """(s, t) int64 per channel with `sign(bn(acc)) == +1  <=>  s * acc >= t` for every integer
    acc in [-k, k], as torch's float32 BN computes it; None if some channel is not a step."""
    c = bn.num_features
    acc = torch.arange(-k, k + 1, dtype=torch.float32)  # (2k+1,)
    vals = acc.view(1, 1, -1).expand(1, c, -1).contiguous()  # (1, C, 2k+1)
    if isinstance(bn, nn.BatchNorm2d):
        vals = vals.unsqueeze(-1)  # (1, C, 2k+1, 1)
    bits = (bn(vals).reshape(c, -1) >= 0).numpy()  # (C, 2k+1): the next layer's sign rule
    s = np.zeros(c, np.int64)
    t = np.zeros(c, np.int64)
    accs = np.arange(-k, k + 1)
    for ch in range(c):
        b = bits[ch]
        if b.all() or not b.any():
            s[ch], t[ch] = 0, 0 if b[0] else 1
            continue
        on = accs[b]
        if b[-1] and not b[0]:  # increasing step: acc >= first on
            s[ch], t[ch] = 1, on[0]
        elif b[0] and not b[-1]:  # decreasing step: acc <= last on  <=>  -acc >= -last
            s[ch], t[ch] = -1, -on[-1]
        else:
            return None
        if not np.array_equal(s[ch] * accs >= t[ch], b):
            return None
    return s, t


@dataclass
class LayerStep:
    """One block of a BNN as an inference engine runs it (the CPU and the Triton engine)."""
    kind: str  # "torch" | "conv" | "linear" (| "stem" on the CPU)
    block: nn.Module
    words: Any = None  # packed sign(weight): numpy (K_words, M) on CPU, torch (M, K_words) GPU
    k: int = 0  # true reduction length
    in_channels: int = 0
    kh: int = 0
    kw: int = 0
    stride: int = 1
    pad: int = 0
    fused: tuple | None = None  # (s, t) of `exact_bn_sign_threshold`: emit packed bits


@dataclass
class _Step(LayerStep):
    limits: tuple[np.ndarray, np.ndarray] | None = None  # the same as `cpu.mismatch_limits`
    maxpool: tuple[int, int, int] | None = None  # (kernel, stride, padding) on fused bits
    masks: tuple[np.ndarray, np.ndarray] | None = None  # channel words: BN increasing / not
    stem: tuple | None = None  # (weight, alpha, beta): float conv + BN + sign in numba
    tail: tuple | None = None  # (pool, alpha, beta, gap, weight, bias): BN -> head -> classifier
    buffers: dict = field(default_factory=dict)
    name: str = ""  # `blocks.<i>.layer`, as `ops.count_ops` names the layer

    def buffer(self, name: str, shape: tuple[int, ...], dtype) -> np.ndarray:
        buf = self.buffers.get(name)
        if buf is None or buf.shape != shape:
            buf = self.buffers[name] = np.empty(shape, dtype)
        return buf


def _maxpool_params(pool: nn.Module) -> tuple[int, int, int] | None:
    """(kernel, stride, padding) of a square, undilated, floor-mode MaxPool2d, else None."""
    if not isinstance(pool, nn.MaxPool2d) or pool.ceil_mode:
        return None
    vals = [pool.kernel_size, pool.stride, pool.padding, pool.dilation]
    vals = [v if isinstance(v, tuple) else (v, v) for v in vals]
    if any(a != b for a, b in vals) or vals[3][0] != 1:
        return None
    return vals[0][0], vals[1][0], vals[2][0]


def _channel_masks(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Channel-bit masks (C_words,) uint64: channels with s >= 0, and with s < 0."""
    inc = np.zeros(n_words(len(s)) * 64, bool)
    dec = np.zeros_like(inc)
    inc[:len(s)], dec[:len(s)] = s >= 0, s < 0
    pack = lambda m: np.packbits(m, bitorder="little").view("<u8").astype(np.uint64)  # noqa: E731
    return pack(inc), pack(dec)


def bn_affine(bn: nn.Module) -> tuple[np.ndarray, np.ndarray]:
    """`residual.bn_affine` as numpy arrays (float32) for the chain kernels."""
    alpha, beta = residual_bn_affine(bn)
    return alpha.numpy(), beta.numpy()


def _stem_params(step: _Step) -> tuple | None:
    """(weight, alpha, beta) when `step` is a plain float conv the numba stem can run."""
    layer = step.block.layer
    if type(layer) is not nn.Conv2d or layer.bias is not None or layer.groups != 1:
        return None
    if (layer.padding_mode != "zeros" or isinstance(layer.padding, str)
            or layer.dilation != (1, 1) or len(set(layer.stride)) != 1
            or len(set(layer.padding)) != 1):
        return None
    return (layer.weight.detach().numpy().copy(), *bn_affine(step.block.bn))


def _tail_params(step: _Step, model: BNN) -> tuple | None:
    """(pool, alpha, beta, gap, weight, bias) for `cpu.classify` on the last binary step."""
    pool = step.block.pool
    params = (1, 1, 0) if isinstance(pool, nn.Identity) else _maxpool_params(pool)
    if params is None or (step.kind == "linear" and params != (1, 1, 0)):
        return None
    weight = np.ascontiguousarray(model.classifier.weight.detach().float().numpy())  # (classes, F)
    gap = model.head == "gap" and step.kind == "conv"
    if step.kind == "conv" and not gap:  # NCHW flatten order -> channels-last (PH, PW, C)
        weight = cpu.channels_last_weight(weight, step.words.shape[1], *model.feature_hw)
    bias = cpu.bias_vector(model.classifier.bias, weight.shape[0]).copy()
    return (params, *bn_affine(step.block.bn), gap, weight, bias)


def _lap(times: dict[str, float], name: str, since: float) -> float:
    """Add the seconds since `since` to times[name]; the new clock reading."""
    now = time.perf_counter()
    times[name] = times.get(name, 0.0) + now - since
    return now


def _sign_pm1(w: torch.Tensor) -> np.ndarray:
    return torch.where(w >= 0, 1.0, -1.0).to(torch.float32).numpy()


class PackedModel:
    """A `BNN` in eval mode compiled for the packed CPU kernels (see the module doc)."""

    def __init__(self, model: BNN, steps: list[_Step]):
        self.model = model
        self.steps = steps

    @classmethod
    @torch.no_grad()
    def from_model(cls, model: nn.Module, fuse: bool = True) -> PackedModel | PackedResidual:
        """The engine for `model` (eval mode): a chain `BNN` here, any other model as a residual
        BNN (`residual.PackedResidual`), which raises `residual.EngineUnsupported` naming the
        module and op it cannot run."""
        if model.training:
            raise ValueError("PackedModel.from_model: put the model in eval mode first")
        if not isinstance(model, BNN):
            return PackedResidual.from_model(model)
        blocks = list(model.blocks)
        steps: list[_Step] = []
        for block in blocks:
            layer = block.layer
            if isinstance(layer, BinaryConv2d):
                cout, cin, kh, kw = layer.weight.shape
                pw = cpu.pack_conv_weight(_sign_pm1(layer.weight))
                steps.append(_Step("conv", block, pw.words, kh * kw * cin, cin, kh, kw,
                                   layer.stride[0], layer.pad))
            elif isinstance(layer, BinaryLinear):
                words = cpu.pack_weight(_sign_pm1(layer.weight))
                steps.append(_Step("linear", block, words, layer.in_features))
            else:
                steps.append(_Step("torch", block))
        for i, step in enumerate(steps):
            step.name = f"blocks.{i}.layer"
        if fuse:
            for step, nxt in zip(steps, steps[1:], strict=False):
                pool = step.block.pool
                maxpool = _maxpool_params(pool) if step.kind == "conv" else None
                if (step.kind in ("conv", "linear") and nxt.kind == step.kind
                        and (isinstance(pool, nn.Identity) or maxpool is not None)):
                    step.fused = exact_bn_sign_threshold(step.block.bn, step.k)
                    if step.fused is not None:
                        step.limits = cpu.mismatch_limits(*step.fused, step.k)
                    if step.fused is not None and maxpool is not None:
                        step.maxpool = maxpool
                        step.masks = _channel_masks(step.fused[0])
            first = steps[0]
            pool = first.block.pool
            maxpool = _maxpool_params(pool)
            if (first.kind == "torch" and len(steps) > 1 and steps[1].kind == "conv"
                    and (isinstance(pool, nn.Identity) or maxpool is not None)):
                first.stem = _stem_params(first)
                if first.stem is not None:
                    first.kind = "stem"
                    if maxpool is not None:
                        first.maxpool = maxpool
                        first.masks = _channel_masks(first.stem[1])  # alpha >= 0: increasing
            last = steps[-1]
            if last.kind in ("conv", "linear") and last.fused is None:
                last.tail = _tail_params(last, model)
        return cls(model, steps)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, times: dict[str, float] | None = None) -> torch.Tensor:
        """x (B, C, H, W) float32 -> logits (B, classes); `times`, if given, gets each layer's
        seconds added (keys `blocks.<i>.layer` and `classifier`)."""
        clock = time.perf_counter()
        h: torch.Tensor | np.ndarray = x
        for step in self.steps:
            h = getattr(self, f"_{step.kind}")(step, h)
            if times is not None:
                clock = _lap(times, step.name, clock)
        last = self.steps[-1]
        if last.tail is not None:
            logits = self._classify(last, h)  # h: the last layer's int32 outputs
        else:
            if self.model.head == "gap" and h.dim() == 4:
                h = h.mean(dim=(2, 3))
            logits = self.model.classifier(h.flatten(1))
        if times is not None:
            _lap(times, "classifier", clock)
        return logits

    forward = __call__

    def _torch(self, step: _Step, h: torch.Tensor) -> torch.Tensor:
        return step.block(h)

    def _stem(self, step: _Step, h: torch.Tensor) -> np.ndarray:
        w, alpha, beta = step.stem
        layer = step.block.layer
        b, _, hh, ww = h.shape
        kh, kw = w.shape[2:]
        oh = (hh + 2 * layer.padding[0] - kh) // layer.stride[0] + 1
        ow = (ww + 2 * layer.padding[1] - kw) // layer.stride[1] + 1
        out = step.buffer("bits", (b, oh, ow, n_words(w.shape[0])), np.uint64)
        bits = cpu.float_conv_sign(h, w, alpha, beta, layer.stride[0], layer.padding[0], out)
        return bits if step.maxpool is None else self._maxpool(step, bits)

    def _maxpool(self, step: _Step, bits: np.ndarray) -> np.ndarray:
        k, stride, pad = step.maxpool
        b, h, w, cw = bits.shape
        shape = (b, (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1, cw)
        return cpu.maxpool_bits(bits, k, stride, pad, *step.masks,
                                out=step.buffer("pooled", shape, np.uint64))

    def _classify(self, step: _Step, acc: np.ndarray) -> torch.Tensor:
        """acc (B, H, W, M) int32 channels-last -> logits (B, classes), a new tensor."""
        pool, alpha, beta, gap, weight, bias = step.tail
        logits = np.empty((acc.shape[0], weight.shape[0]), np.float32)
        cpu.classify(acc, *pool, alpha, beta, gap, weight, bias, logits)
        return torch.from_numpy(logits)

    def _conv(self, step: _Step, h: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
        xc = h if isinstance(h, np.ndarray) else cpu.pack_channels(h)  # (B, H, W, Cin_words)
        b, hh, ww, _ = xc.shape
        oh = (hh + 2 * step.pad - step.kh) // step.stride + 1
        ow = (ww + 2 * step.pad - step.kw) // step.stride + 1
        m = step.words.shape[1]
        pw = cpu.PackedConvWeight(step.words, step.in_channels, step.kh, step.kw)
        if step.fused is not None:  # im2col + GEMM + BN-sign in one kernel, bits out
            out = step.buffer("bits", (b * oh * ow, n_words(m)), np.uint64)
            cpu.conv_packed(xc, pw, step.stride, step.pad, step.limits, out)
            bits = out.reshape(b, oh, ow, -1)  # packed channels-last: the next conv's input
            return bits if step.maxpool is None else self._maxpool(step, bits)
        acc = step.buffer("acc", (b * oh * ow, m), np.int32)
        cpu.conv_packed(xc, pw, step.stride, step.pad, out=acc)
        if step.tail is not None:
            return acc.reshape(b, oh, ow, m)  # `__call__` classifies (timed as `classifier`)
        y = torch.from_numpy(acc).view(b, oh, ow, m).permute(0, 3, 1, 2).float()
        return step.block.bn(step.block.pool(y.contiguous()))

    def _linear(self, step: _Step, h: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
        a = h if isinstance(h, np.ndarray) else cpu.pack_rows(h.flatten(1).contiguous())
        m = step.words.shape[1]
        if step.fused is not None:
            out = step.buffer("bits", (a.shape[0], n_words(m)), np.uint64)
            return cpu.binary_gemm_limits(a, step.words, *step.limits, out=out)
        acc = step.buffer("acc", (a.shape[0], m), np.int32)
        cpu.binary_gemm(a, step.words, step.k, out=acc)
        if step.tail is not None:
            return acc.reshape(a.shape[0], 1, 1, m)
        return step.block.bn(step.block.pool(torch.from_numpy(acc).float()))
