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
Then the head (global average pool or flatten) and the float classifier in torch.
Threads: the kernels obey `numba.set_num_threads`, the torch parts `torch.set_num_threads`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from bnnprune.binary import BinaryConv2d, BinaryLinear
from bnnprune.kernels import cpu
from bnnprune.kernels.pack import n_words
from bnnprune.models import BNN


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
class _Step:
    kind: str  # "torch" | "conv" | "linear"
    block: nn.Module
    words: np.ndarray | None = None  # packed weight, words-major (K_words, M)
    k: int = 0  # true reduction length
    in_channels: int = 0
    kh: int = 0
    kw: int = 0
    stride: int = 1
    pad: int = 0
    fused: tuple[np.ndarray, np.ndarray] | None = None  # (s, t): emit packed bits
    maxpool: tuple[int, int, int] | None = None  # (kernel, stride, padding) on fused bits
    masks: tuple[np.ndarray, np.ndarray] | None = None  # channel words: BN increasing / not
    buffers: dict = field(default_factory=dict)

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


def _maxpool_bits(bits: np.ndarray, k: int, stride: int, pad: int, inc: np.ndarray,
                  dec: np.ndarray) -> np.ndarray:
    """Max pool of sign(BN(acc)) on packed channels-last bits (B, H, W, C_words): OR over the
    window for channels where BN increases, AND where it decreases; padding never counts."""
    b, h, w, cw = bits.shape
    ph, pw = (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1
    widths = ((0, 0), (pad, pad), (pad, pad), (0, 0))
    por = np.pad(bits, widths, constant_values=0) if pad else bits
    pand = np.pad(bits, widths, constant_values=cpu.ALL_ONES) if pad else bits
    any_ = np.zeros((b, ph, pw, cw), np.uint64)
    all_ = np.full((b, ph, pw, cw), cpu.ALL_ONES)
    for i in range(k):
        for j in range(k):
            rows = slice(i, i + stride * (ph - 1) + 1, stride)
            cols = slice(j, j + stride * (pw - 1) + 1, stride)
            any_ |= por[:, rows, cols]
            all_ &= pand[:, rows, cols]
    return (any_ & inc) | (all_ & dec)


def _sign_pm1(w: torch.Tensor) -> np.ndarray:
    return torch.where(w >= 0, 1.0, -1.0).to(torch.float32).numpy()


class PackedModel:
    """A `BNN` in eval mode compiled for the packed CPU kernels (see the module doc)."""

    def __init__(self, model: BNN, steps: list[_Step]):
        self.model = model
        self.steps = steps

    @classmethod
    @torch.no_grad()
    def from_model(cls, model: BNN, fuse: bool = True) -> PackedModel:
        if model.training:
            raise ValueError("PackedModel.from_model: put the model in eval mode first")
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
        if fuse:
            for step, nxt in zip(steps, steps[1:], strict=False):
                pool = step.block.pool
                maxpool = _maxpool_params(pool) if step.kind == "conv" else None
                if (step.kind in ("conv", "linear") and nxt.kind == step.kind
                        and (isinstance(pool, nn.Identity) or maxpool is not None)):
                    step.fused = exact_bn_sign_threshold(step.block.bn, step.k)
                    if step.fused is not None and maxpool is not None:
                        step.maxpool = maxpool
                        step.masks = _channel_masks(step.fused[0])
        return cls(model, steps)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        h: torch.Tensor | np.ndarray = x
        for step in self.steps:
            h = getattr(self, f"_{step.kind}")(step, h)
        model = self.model
        if model.head == "gap" and h.dim() == 4:
            h = h.mean(dim=(2, 3))
        return model.classifier(h.flatten(1))

    forward = __call__

    def _torch(self, step: _Step, h: torch.Tensor) -> torch.Tensor:
        return step.block(h)

    def _conv(self, step: _Step, h: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
        xc = h if isinstance(h, np.ndarray) else cpu.pack_channels(h)  # (B, H, W, Cin_words)
        b, hh, ww, _ = xc.shape
        oh = (hh + 2 * step.pad - step.kh) // step.stride + 1
        ow = (ww + 2 * step.pad - step.kw) // step.stride + 1
        cols = step.buffer("cols", (b * oh * ow, n_words(step.k)), np.uint64)
        cpu.im2col_packed(xc, step.in_channels, step.kh, step.kw, step.stride, step.pad, cols)
        m = step.words.shape[1]
        if step.fused is not None:
            out = step.buffer("bits", (b * oh * ow, n_words(m)), np.uint64)
            cpu.binary_gemm_sign(cols, step.words, step.k, *step.fused, out=out)
            bits = out.reshape(b, oh, ow, -1)  # packed channels-last: the next conv's input
            return bits if step.maxpool is None else _maxpool_bits(bits, *step.maxpool,
                                                                   *step.masks)
        acc = step.buffer("acc", (b * oh * ow, m), np.int32)
        cpu.binary_gemm(cols, step.words, step.k, out=acc)
        y = torch.from_numpy(acc).view(b, oh, ow, m).permute(0, 3, 1, 2).float()
        return step.block.bn(step.block.pool(y.contiguous()))

    def _linear(self, step: _Step, h: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
        a = h if isinstance(h, np.ndarray) else cpu.pack_rows(h.flatten(1).contiguous())
        m = step.words.shape[1]
        if step.fused is not None:
            out = step.buffer("bits", (a.shape[0], n_words(m)), np.uint64)
            return cpu.binary_gemm_sign(a, step.words, step.k, *step.fused, out=out)
        acc = step.buffer("acc", (a.shape[0], m), np.int32)
        cpu.binary_gemm(a, step.words, step.k, out=acc)
        return step.block.bn(step.block.pool(torch.from_numpy(acc).float()))
