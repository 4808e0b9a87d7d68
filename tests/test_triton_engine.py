"""Whole-model Triton engine vs the torch model, under the interpreter (TRITON_INTERPRET=1, CPU
tensors): tiny models, random weights and BatchNorm statistics.

The variable must be set before the kernel module is imported (it picks popcount and
autotuning at import), so it is set here before any bnnprune / triton import."""

import os

os.environ["TRITON_INTERPRET"] = "1"

import importlib  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

import bnnprune.engines.kernels.triton_kernels as tk  # noqa: E402
from bnnprune.engines.triton_engine import TritonModel  # noqa: E402

from conftest import tiny_bnn  # noqa: E402

if not tk.INTERPRET:  # imported earlier in compiled mode by another test module
    tk = importlib.reload(tk)  # in place: triton_engine reads the kernels off this module


def kinds(engine):
    """Per step: its kind, and for binary steps how its output leaves it."""
    return [s.kind if s.kind == "torch" else
            f"{s.kind}:" + ("bits" if s.fused is not None else
                            "pooled" if s.pooled is not None else "bn")
            for s in engine.steps]


# (arch, in_shape, width, channels, expected steps with fusion)
CASES = [
    ("cnn", [1, 8, 8], 0.25, None,
     ["torch", "conv:pooled", "conv:bits", "conv:pooled", "conv:bits", "conv:bn"]),
    # pruned, odd channel counts; 37 channels = 2 packed words between two fused convs
    ("cnn", [3, 8, 8], 0.25, [8, 5, 37, 9, 3, 7],
     ["torch", "conv:pooled", "conv:bits", "conv:pooled", "conv:bits", "conv:bn"]),
    # the default CNN's widths after prune.round_to 8: 24/48/48/96/96 (24 and 48 channels
    # leave part of a 32-bit word, 96 = 3 words)
    ("cnn", [1, 8, 8], 1.0, [32, 24, 48, 48, 96, 96],
     ["torch", "conv:pooled", "conv:bits", "conv:pooled", "conv:bits", "conv:bn"]),
    # flatten from a conv into binary linears; linear -> linear on packed rows
    ("alexnet", [1, 12, 12], 0.1, [6, 19, 7, 13, 9, 35, 11],
     ["torch", "conv:pooled", "conv:bits", "conv:bits", "conv:bn", "linear:bits",
      "linear:bn"]),
    # 1x1 and 5x5 convs, average pooling (not fused), global-average head
    ("nin", [1, 8, 8], 0.1, [7, 5, 9, 6, 5, 7, 5, 6],
     ["torch", "conv:bits", "conv:pooled", "conv:bits", "conv:bits", "conv:bn", "conv:bits",
      "conv:bn"]),
]


@pytest.mark.parametrize("arch,in_shape,width,channels,steps", CASES,
                         ids=[f"{c[0]}-{'x'.join(map(str, c[1]))}" for c in CASES])
def test_engine_matches_torch(arch, in_shape, width, channels, steps):
    model = tiny_bnn(arch, in_shape, width, channels)
    engine = TritonModel.from_model(model, "cpu")
    assert kinds(engine) == steps  # every path the case is meant to exercise is taken
    x = torch.randn(2, *in_shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(x)
    got = engine(x)
    assert got.shape == ref.shape == (2, 10)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(got.argmax(1), ref.argmax(1))


def test_unfused_matches_torch():
    """fuse=False: every binary layer's BN runs in torch on the int32 outputs."""
    model = tiny_bnn("cnn", [3, 8, 8], 0.25, [8, 5, 37, 9, 3, 7], seed=2)
    engine = TritonModel.from_model(model, "cpu", fuse=False)
    assert kinds(engine) == ["torch"] + ["conv:bn"] * 5
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = model(x)
    got = engine(x)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(got.argmax(1), ref.argmax(1))


def test_from_model_copies_and_needs_eval():
    model = tiny_bnn("cnn", [1, 8, 8], 0.25)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    engine = TritonModel.from_model(model, "cpu")
    assert engine.model is not model
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # weights packed once, 32-bit words in int32, K = kh * kw * Cin
    conv = engine.steps[1]
    assert conv.words.dtype == torch.int32
    assert conv.words.shape == (8, tk.n_words32(3 * 3 * 8)) and conv.k == 72
    with pytest.raises(ValueError, match="eval"):
        TritonModel.from_model(model.train(), "cpu")


@pytest.mark.parametrize("case", ["birealnet", "birealnet-pruned", "user-tiny-bireal"])
def test_residual_engine_matches_torch(case):
    """birealnet (baseline, pruned to odd widths) and a user's Bi-Real model: the same program
    as the packed CPU engine, on the Triton kernels (interpreter: 8x8 images, one image)."""
    from test_engine_residual import birealnet, pruned_birealnet, user_model

    from bnnprune.engines.triton_engine import TritonResidual

    model = {"birealnet": lambda: birealnet(0.25, 8),
             "birealnet-pruned": lambda: pruned_birealnet(0.25, 8),
             "user-tiny-bireal": user_model}[case]()
    engine = TritonModel.from_model(model, "cpu")
    assert isinstance(engine, TritonResidual) and engine.model is not model
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(x)
    got = engine(x)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    assert torch.equal(got.argmax(1), ref.argmax(1))


def test_residual_block_epilogue_bits_and_rows():
    """The epilogue kernel against the formula: int32 and float rows, shortcut BN, PReLU,
    37 channels (two 32-bit words), bits of y + nbias."""
    g = torch.Generator().manual_seed(0)
    n, m = 10, 37
    vec = lambda: torch.randn(m, generator=g)  # noqa: E731
    scale, a1, b1, a2, b2, nbias = (vec() for _ in range(6))
    slope = torch.rand(m, generator=g)
    src = torch.randint(-30, 30, (n, m), generator=g, dtype=torch.int32)
    res = torch.randn(n, m, generator=g)
    out, bits = tk.block_epilogue(src, scale, a1, b1, res, a2, b2, slope, nbias=nbias)
    y = src.float() * scale * a1 + b1 + (res * a2 + b2)
    y = torch.where(y > 0, y, y * slope)
    torch.testing.assert_close(out, y)
    want = ((y + nbias) >= 0).int()  # (N, M)
    got = ((bits[:, torch.arange(m) // 32] >> (torch.arange(m) % 32)) & 1)  # (N, M)
    near = (y + nbias).abs() < 1e-5
    assert ((got != want) <= near).all()
    out2, bits2 = tk.block_epilogue(res, torch.ones(m), torch.ones(m), torch.zeros(m),
                                    write_out=False, nbias=nbias)
    assert out2 is None and torch.equal(bits2[:, 0] & 1, ((res[:, 0] + nbias[0]) >= 0).int())
