"""Packed CPU engine on residual BNNs vs torch: birealnet (baseline and pruned), a user's
Bi-Real-style model, and models it must refuse. Tiny widths, a few images."""

import re
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bnnprune
from bnnprune.core.binary import binary_layers
from bnnprune.engines.kernels.pack import unpack_pm1
from bnnprune.engines.packed import PackedModel
from bnnprune.engines.residual import (
    HUGE_PAGE,
    EngineUnsupported,
    PackedResidual,
    huge_page_bytes,
    huge_page_empty,
)
from bnnprune.models import build_model, model_config

from conftest import REPO

TIE = 1e-5  # |x + b| below this: float rounding order may decide the sign (a documented tie)


def randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random BatchNorm statistics (one gamma < 0), PReLU slopes and thresholds, so every
    epilogue term matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(torch.randn(n, generator=g))
                m.bias.copy_(torch.randn(n, generator=g))
                m.running_mean.copy_(torch.randn(n, generator=g))
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            elif isinstance(m, nn.PReLU):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g))
        for p in model.parameters():
            if p.dim() == 4 and p.shape[0] == 1:  # (1, C, 1, 1) sign thresholds
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval()


def birealnet(width: float = 0.25, size: int = 28) -> nn.Module:
    return randomise(build_model(model_config("birealnet", width, [1, size, size], 10), seed=0))


def pruned_birealnet(width: float = 0.25, size: int = 28) -> nn.Module:
    """Pruned by the flip rule on made-up flip counts to odd widths (6/12/27 of 8/16/32)."""
    model = birealnet(width, size)
    g = torch.Generator().manual_seed(0)
    counts = {n: torch.randint(0, 20, m.weight.shape, generator=g)
              for n, m in binary_layers(model).items()}
    pruned, _ = bnnprune.prune(model, torch.zeros(1, 1, size, size), counts, method="flip",
                               target_bop_reduction=0.4, round_to=1, min_channels=1, seed=0)
    return pruned.eval()


def user_model() -> nn.Module:
    sys.path.insert(0, str(REPO / "tests"))
    try:
        model = build_model(model_config("usermodels.tiny_bireal:build", 1.0, [1, 28, 28], 10,
                                         {"width": 8}, ["usermodels.tiny_bireal:MyBinaryConv"]),
                            seed=0)
    finally:
        sys.path.remove(str(REPO / "tests"))
    return randomise(model)


def binary_inputs(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """What each binary layer of the torch model reads (x + b), by layer name."""
    seen: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_hook(lambda m, a, o, n=n: seen.__setitem__(n, a[0]))
             for n, m in binary_layers(model).items()]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return seen


def check_exact(model: nn.Module, engine: PackedResidual, x: torch.Tensor) -> None:
    """Logits to float tolerance, the same predictions; every binary conv's int32 outputs
    are torch's conv of the signs it read, exactly; those signs are torch's except at ties."""
    with torch.no_grad():
        ref = model(x)
    got = engine(x)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    assert torch.equal(got.argmax(1), ref.argmax(1))
    # the engine shares buffers between values; one with its own buffer per op computes the
    # same logits, bit for bit, and keeps every intermediate value for the checks below
    engine = PackedResidual(engine.model, engine.program, share_buffers=False)
    assert torch.equal(engine(x), got)
    inputs = binary_inputs(model, x)
    ops = engine.program.ops
    convs = [op for op in ops if op.kind == "bin_conv"]
    assert [op.layer for op in convs] == list(binary_layers(model))
    for op in convs:
        producer = next(p for p in ops if p.kind == "epilogue" and p.bits == op.src)
        cin = op.weight.shape[1]
        bits = producer.buffers["bits"]  # (B * H * W, Cin_words), this call's
        b, _, h, w = inputs[op.layer].shape
        signs = torch.from_numpy(unpack_pm1(bits.reshape(b, h, w, -1), cin)).float()
        signs = signs.permute(0, 3, 1, 2)  # (B, H, W, Cin) -> (B, Cin, H, W)
        want = torch.where(inputs[op.layer] >= 0, 1.0, -1.0)
        assert ((signs != want) <= (inputs[op.layer].abs() < TIE)).all(), op.layer
        acc = torch.from_numpy(op.buffers["acc"]).view(b, -1, op.weight.shape[0])
        dots = F.conv2d(F.pad(signs, (op.pad,) * 4, value=1.0), op.weight, None, op.stride)
        assert torch.equal(acc.float(), dots.flatten(2).transpose(1, 2)), op.layer


@pytest.mark.parametrize("make", [birealnet, pruned_birealnet, user_model],
                         ids=["birealnet", "birealnet-pruned", "user-tiny-bireal"])
def test_engine_matches_torch(make):
    model = make()
    engine = PackedModel.from_model(model)  # dispatches: not a chain BNN
    assert isinstance(engine, PackedResidual)
    assert engine.ops[-1].kind == "pool_linear"  # both heads: pool 2 / flatten, and the mean
    x = torch.randn(6, 1, 28, 28)
    check_exact(model, engine, x)
    check_exact(model, engine, x[:2])  # other batch size: buffers reallocated
    first = engine(x[:2])
    kept = first.clone()
    engine(x[2:4])
    assert torch.equal(first, kept)  # an earlier call's logits are not overwritten


def test_shared_buffers_hold_each_value_until_its_last_reader():
    """The default engine reuses a value's buffer once its last reader has run: the same
    logits as private buffers, bit for bit, call after call and across batch sizes, in less
    memory; every buffer starts on a huge page."""
    model = birealnet()
    shared = PackedResidual.from_model(model)
    private = PackedResidual.from_model(model, share_buffers=False)
    for b in (5, 5, 2, 5):  # a new batch size drops the old buffers
        x = torch.randn(b, 1, 28, 28, generator=torch.Generator().manual_seed(b))
        assert torch.equal(shared(x), private(x))
    own = [buf for op in private.ops for name, buf in op.buffers.items()
           if name in ("out", "acc", "bits")]
    assert len(own) == 22  # stem conv, 7 ends (6 with bits), 6 binary convs, 2 shortcuts
    starts = {a.ctypes.data for a in shared._plan.values()}  # one per buffer, at its start
    assert len(shared._plan) == len(own) and 0 < len(starts) <= len(own) // 3
    assert all(start % HUGE_PAGE == 0 for start in starts)


def test_huge_page_buffers_are_aligned_and_large_enough():
    for n in (1, HUGE_PAGE - 1, HUGE_PAGE, 3 * HUGE_PAGE + 5):
        raw = huge_page_bytes(n)
        assert raw.ctypes.data % HUGE_PAGE == 0 and raw.nbytes >= n and raw.nbytes % HUGE_PAGE == 0
    a = huge_page_empty((3, 5), np.int32)
    assert a.shape == (3, 5) and a.dtype == np.int32 and a.flags.c_contiguous


def test_structure_packs_in_the_producers_epilogue():
    """birealnet: every binary conv reads bits a fused epilogue wrote (the stem's or the last
    block's), no separate pack pass, downsample BN folded, layers timed as count_ops rows."""
    model = birealnet()
    engine = PackedResidual.from_model(model)
    kinds = [op.kind for op in engine.program.ops]
    assert kinds.count("bin_conv") == 6 and kinds.count("epilogue") == 7  # stem + 6 blocks
    floats = [(op.layer, op.pool) for op in engine.program.ops if op.kind == "float_conv"]
    assert floats == [("stem.0", 1), ("blocks.2.shortcut.1", 2), ("blocks.4.shortcut.1", 2)]
    # the shortcuts' AvgPool fused into their 1x1 convs; the head's AvgPool, flatten(1) in
    # torch's (C, H, W) order and the linear layer are one op in the CPU runtime
    assert [op.module for op in engine.program.ops if op.kind == "float_module"] == [
        model.head.pool]
    assert kinds[-3:] == ["float_module", "flatten", "linear"]
    head = engine.ops[-1]
    assert [op.kind for op in engine.ops[:-1]] == kinds[:-3]
    assert (head.kind, head.pool, head.module, head.layer) == (
        "pool_linear", 2, model.head.classifier, "head.classifier")
    for op in engine.program.ops:
        if op.kind == "epilogue" and op.bits >= 0:
            assert op.src != 0 and op.layer is not None  # never a pack of the model input
    downs = [op for op in engine.program.ops if op.kind == "epilogue" and "a2" in op.params]
    assert [op.layer for op in downs] == ["blocks.2.conv", "blocks.4.conv"]
    times: dict[str, float] = {}
    engine(torch.randn(2, 1, 28, 28), times)
    assert list(times) == [r["name"] for r in bnnprune.count_ops(model).layers]
    assert all(t > 0 for t in times.values())


@pytest.mark.parametrize("batch", [1, 3])
def test_float_convs_match_torch(batch):
    """The stem and the AvgPool + 1x1 shortcut convs (`cpu.float_conv_rows`) at full width:
    each op's output rows are the torch module's output (the shortcut's on the pooled input)
    to float32 rounding (the sums run in another order)."""
    model = randomise(build_model(model_config("birealnet", 1.0, [1, 28, 28], 10), seed=0))
    engine = PackedResidual.from_model(model, share_buffers=False)  # keeps each op's output
    ops = [op for op in engine.program.ops if op.kind == "float_conv"]
    seen: dict[str, torch.Tensor] = {}
    hooks = [op.module.register_forward_hook(
        lambda m, a, o, n=op.layer: seen.__setitem__(n, o)) for op in ops]
    x = torch.randn(batch, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    engine(x)
    assert [op.layer for op in ops] == ["stem.0", "blocks.2.shortcut.1", "blocks.4.shortcut.1"]
    for op in ops:
        want = seen[op.layer].permute(0, 2, 3, 1).reshape(-1, op.module.out_channels)
        got = torch.from_numpy(op.buffers["out"])  # (B * OH * OW, Cout), this call's
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=op.layer)


class ZeroPadBinaryConv(nn.Module):
    """sign conv with zero padding: not what the packed kernels compute."""

    def __init__(self, c: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(c, c, 3, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(torch.where(x >= 0, 1.0, -1.0), torch.where(self.weight >= 0, 1.0, -1.0),
                        padding=1)


class Odd(nn.Module):
    def __init__(self, conv: nn.Module, act: nn.Module):
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.conv, self.act = conv, act
        self.fc = nn.Linear(8, 10)
        self.bnnprune_binary = [type(conv)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        return self.fc(self.act(self.conv(h) + h).mean(dim=(2, 3)))


@pytest.mark.parametrize("model,message", [
    (Odd(ZeroPadBinaryConv(8), nn.PReLU(8)),
     "conv (ZeroPadBinaryConv): its output is not conv(sign(x) padded with +1, sign(W))"),
    (Odd(bnnprune.BinaryConv2d(8, 8, 3, 1, 1), nn.Hardtanh()),
     "Odd: module act (Hardtanh): not a module the engine runs"),
], ids=["zero-padded-binary-conv", "hardtanh"])
def test_unsupported_block_is_named(model, message):
    with pytest.raises(EngineUnsupported, match=re.escape(message)):
        PackedModel.from_model(model.eval())


def test_training_mode_rejected():
    with pytest.raises(ValueError, match="eval mode"):
        PackedModel.from_model(birealnet().train())
