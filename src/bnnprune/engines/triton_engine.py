"""Whole-model Triton inference engine: a trained `BNN` on the Triton kernels (CUDA GPU).

    engine = TritonModel.from_model(model, "cuda")  # model in eval mode; weights packed once
    logits = engine(x)                               # x (B, C, H, W) float32, normalised, on
                                                     # the engine's device

The structure mirrors `engine.PackedModel`, with 32-bit words in int32 tensors
(`kernels/triton_kernels.py`). Per block of the model (layer -> pool -> BatchNorm):
- float layers (the first conv; any non-binary layer) run the model's own torch block;
- binary conv: `im2col_pack` of the float input (sign taken in the kernel, +1 padding), or
  `im2col_pack_bits` of the packed bits a fused previous conv emitted; XNOR-popcount GEMM ->
  int32, then the model's own pool + BN modules in torch on the (exact) integers as float32;
- binary linear: `pack_rows` of the input flattened in NCHW order (as `Block` flattens), or the
  packed rows a fused previous linear emitted; GEMM -> int32 -> the model's BN in torch;
- fused, when the next block is a binary layer of the same kind: without pooling, BN + sign is
  the GEMM's threshold epilogue (`binary_gemm_sign`, packed), which emits the packed bits the
  next layer reads: channels-last (B, OH, OW, ceil(M / 32)) for convs, (B, ceil(M / 32)) rows
  for linears. With max pooling (convs), the GEMM returns int32, the model's MaxPool2d runs in
  torch on those integers and the threshold after it: `s * acc - t`, which is >= 0 exactly
  where the model's sign(BN(acc)) is +1, is what the next conv's `im2col_pack` reads.
  (s, t) come from `engine.exact_bn_sign_threshold`: the model's float32 BatchNorm on the CPU
  evaluated at every reachable integer (|acc| <= K), so the binary middle reproduces torch's
  CPU model exactly, ties included; a channel that is not a single step keeps its block unfused.
- the head (flatten or global average) and the float classifier run in torch.
Average pooling between binary layers is not fused (torch pool + BN, then sign in the next
im2col). The float parts run on the device with TF32 switched off during a call, but GPU
float32 still sums in its own order: a float stem output within rounding of a BN threshold can
take the other sign than on the CPU, as with the packed CPU engine's numba stem.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from bnnprune.core.binary import BinaryConv2d, BinaryLinear
from bnnprune.engines.kernels import (
    triton_kernels as tk,  # attribute access: a reload stays visible
)
from bnnprune.engines.packed import LayerStep, exact_bn_sign_threshold
from bnnprune.engines.residual import Op, Program, lower
from bnnprune.models.chain import BNN


@dataclass
class _Step(LayerStep):  # words: (M, K_words) int32 on the device; fused: int32 (s, t)
    pooled: tuple[torch.Tensor, torch.Tensor] | None = None  # (s, t) float32 (M, 1, 1):
    # max pool on the int32 outputs, then the threshold in torch


@contextmanager
def _full_fp32() -> Iterator[None]:
    """cuDNN convs and CUDA matmuls in full float32 (torch allows TF32 for cuDNN convs by
    default on Ampere and newer); the flags are restored afterwards."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


class TritonModel:
    """A `BNN` in eval mode compiled for the Triton kernels (see the module doc)."""

    def __init__(self, model: BNN, steps: list[_Step], device: torch.device):
        self.model = model  # a copy on the device; the caller's model is left alone
        self.steps = steps
        self.device = device

    @classmethod
    @torch.no_grad()
    def from_model(cls, model: nn.Module, device: torch.device | str,
                   fuse: bool = True) -> TritonModel | TritonResidual:
        """Copy `model` to `device`, pack its binary weights once and fold BN + sign where the
        next layer is binary (`fuse=False`: never, every BN runs in torch). A model that is not
        a chain `BNN` runs as a residual BNN (`TritonResidual`), or raises
        `residual.EngineUnsupported` naming the module and op it cannot run."""
        if model.training:
            raise ValueError("TritonModel.from_model: put the model in eval mode first")
        if not isinstance(model, BNN):
            return TritonResidual.from_model(model, device)
        device = torch.device(device)
        model = copy.deepcopy(model).cpu()  # thresholds are read off the CPU float32 BN
        steps: list[_Step] = []
        for block in model.blocks:
            layer = block.layer
            if isinstance(layer, BinaryConv2d):
                w = layer.weight.detach().to(device)  # (Cout, Cin, kh, kw)
                _, cin, kh, kw = w.shape
                steps.append(_Step("conv", block, tk.pack_conv_weight(w), kh * kw * cin, cin,
                                   kh, kw, layer.stride[0], layer.pad))
            elif isinstance(layer, BinaryLinear):
                w = layer.weight.detach().to(device)  # (M, F)
                steps.append(_Step("linear", block, tk.pack_rows(w), layer.in_features))
            else:
                steps.append(_Step("torch", block))
        if fuse:
            for step, nxt in zip(steps, steps[1:], strict=False):
                pool = step.block.pool
                maxpool = step.kind == "conv" and isinstance(pool, nn.MaxPool2d)
                if (step.kind not in ("conv", "linear") or nxt.kind != step.kind
                        or not (isinstance(pool, nn.Identity) or maxpool)):
                    continue
                st = exact_bn_sign_threshold(step.block.bn, step.k)
                if st is None:
                    continue
                s, t = (torch.from_numpy(v).to(device) for v in st)  # (M,) int64
                if maxpool:
                    step.pooled = s.float().view(-1, 1, 1), t.float().view(-1, 1, 1)
                else:
                    step.fused = s.int(), t.int()
        model.to(device)  # the copy: float blocks, BN, classifier
        return cls(model, steps, device)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C, H, W) float32 on the device -> logits (B, classes)."""
        with _full_fp32():
            h = x
            for step in self.steps:
                h = getattr(self, f"_{step.kind}")(step, h)
            if self.model.head == "gap" and h.dim() == 4:
                h = h.mean(dim=(2, 3))  # (B, C, H, W) -> (B, C)
            return self.model.classifier(h.flatten(1))

    forward = __call__

    def _torch(self, step: _Step, h: torch.Tensor) -> torch.Tensor:
        return step.block(h)

    def _conv(self, step: _Step, h: torch.Tensor) -> torch.Tensor:
        """h: float (B, Cin, H, W) any strides, or int32 packed bits (B, H, W, Cin_words) of a
        fused previous conv -> bits (B, OH, OW, M_words) if fused, else float (B, M, PH, PW)."""
        if h.dtype == torch.int32:
            b, hh, ww, _ = h.shape
            cols = tk.im2col_pack_bits(h, step.in_channels, step.kh, step.kw, step.stride,
                                       step.pad)
        else:
            b, _, hh, ww = h.shape
            cols = tk.im2col_pack(h, step.kh, step.kw, step.stride, step.pad)
        # cols (B * OH * OW, K_words)
        oh = (hh + 2 * step.pad - step.kh) // step.stride + 1
        ow = (ww + 2 * step.pad - step.kw) // step.stride + 1
        if step.fused is not None:
            bits = tk.binary_gemm_sign(cols, step.words, step.k, *step.fused, packed=True)
            return bits.view(b, oh, ow, -1)  # (B * OH * OW, M_words) -> (B, OH, OW, M_words)
        m = step.words.shape[0]
        acc = tk.binary_gemm(cols, step.words, step.k)  # (B * OH * OW, M) int32
        y = acc.view(b, oh, ow, m).permute(0, 3, 1, 2).float()  # (B, M, OH, OW) channels-last
        y = step.block.pool(y)  # the model's own pool, on exact integers
        if step.pooled is not None:
            s, t = step.pooled
            return s * y - t  # >= 0 exactly where sign(BN(y)) is +1: the next im2col's sign
        return step.block.bn(y)

    def _linear(self, step: _Step, h: torch.Tensor) -> torch.Tensor:
        """h: float (B, F) or (B, C, H, W), or int32 packed rows (B, F_words) of a fused
        previous linear -> bits (B, M_words) if fused, else float (B, M)."""
        a = h if h.dtype == torch.int32 else tk.pack_rows(h.flatten(1))  # (B, F_words)
        if step.fused is not None:
            return tk.binary_gemm_sign(a, step.words, step.k, *step.fused, packed=True)
        acc = tk.binary_gemm(a, step.words, step.k)  # (B, M) int32
        return step.block.bn(step.block.pool(acc.float()))


class TritonResidual:
    """A residual BNN on the Triton kernels: the program `residual.lower` makes (the packed CPU
    engine's), with 32-bit words. Binary convs: `im2col_pack_bits` of the packed signs and the
    XNOR-popcount GEMM -> int32; `block_epilogue` then applies scale, BatchNorm, the residual
    add and PReLU and writes the float stream and the next conv's packed signs in one pass;
    float convs, pools and the head run in torch on the device, channels-last."""

    def __init__(self, model: nn.Module, program: Program, device: torch.device):
        self.model = model  # a copy on the device
        self.program = program
        self.device = device
        self.consts: list[dict] = []
        for op in program.ops:
            c: dict = {k: v.to(device) for k, v in op.params.items()}
            if op.nbias is not None:
                c["nbias"] = op.nbias.to(device)
            if op.kind == "bin_conv":
                c["words"] = tk.pack_conv_weight(op.weight.to(device))  # (Cout, K_words)
            self.consts.append(c)

    @classmethod
    @torch.no_grad()
    def from_model(cls, model: nn.Module, device: torch.device | str) -> TritonResidual:
        device = torch.device(device)
        model = copy.deepcopy(model).cpu()
        program = lower(model)  # EngineUnsupported before anything goes to the device
        return cls(model.to(device), program, device)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C, H, W) float32 on the device -> logits (B, classes)."""
        env: list = [None] * self.program.n_slots
        with _full_fp32():
            for op, c in zip(self.program.ops, self.consts, strict=True):
                getattr(self, f"_{op.kind}")(op, c, env, x)
        return env[self.program.out]

    forward = __call__

    def _input(self, op: Op, c: dict, env: list, x: torch.Tensor) -> None:
        env[op.dst] = x.float().permute(0, 2, 3, 1).contiguous()  # (B, H, W, C)

    def _float_module(self, op: Op, c: dict, env: list, x: torch.Tensor) -> None:
        y = op.module(env[op.src].permute(0, 3, 1, 2))  # channels-last (B, C, H, W) view
        env[op.dst] = y.permute(0, 2, 3, 1).contiguous()  # (B, OH, OW, C)

    def _float_conv(self, op: Op, c: dict, env: list, x: torch.Tensor) -> None:
        h = env[op.src].permute(0, 3, 1, 2)  # channels-last (B, C, H, W) view
        if op.pool > 1:
            h = torch.nn.functional.avg_pool2d(h, op.pool)
        y = op.module(h)
        env[op.dst] = y.permute(0, 2, 3, 1).contiguous()  # (B, OH, OW, C)

    def _bin_conv(self, op: Op, c: dict, env: list, x: torch.Tensor) -> None:
        bits = env[op.src]  # (B, H, W, Cin_words) int32
        b, h, w, _ = bits.shape
        cout, cin, k, _ = op.weight.shape
        cols = tk.im2col_pack_bits(bits, cin, k, k, op.stride, op.pad)  # (B*OH*OW, K_words)
        acc = tk.binary_gemm(cols, c["words"], k * k * cin)  # (B * OH * OW, Cout) int32
        oh = (h + 2 * op.pad - k) // op.stride + 1
        env[op.dst] = acc.view(b, oh, -1, cout)  # (B, OH, OW, Cout)

    def _epilogue(self, op: Op, c: dict, env: list, x: torch.Tensor) -> None:
        src = env[op.src]
        b, h, w, m = src.shape
        res = env[op.res].reshape(-1, m) if op.res >= 0 else None
        out, bits = tk.block_epilogue(src.reshape(-1, m), c["scale"], c["a1"], c["b1"], res,
                                      c.get("a2"), c.get("b2"), c.get("slope"),
                                      write_out=op.dst >= 0, nbias=c.get("nbias"))
        if out is not None:
            env[op.dst] = out.view(b, h, w, m)
        if bits is not None:
            env[op.bits] = bits.view(b, h, w, -1)

    def _mean(self, op: Op, c: dict, env: list, x: torch.Tensor) -> None:
        env[op.dst] = env[op.src].mean(dim=(1, 2))  # (B, H, W, C) -> (B, C)

    def _flatten(self, op: Op, c: dict, env: list, x: torch.Tensor) -> None:
        env[op.dst] = env[op.src].permute(0, 3, 1, 2).flatten(1)  # (B, C*H*W), torch's order

    def _linear(self, op: Op, c: dict, env: list, x: torch.Tensor) -> None:
        env[op.dst] = op.module(env[op.src])
