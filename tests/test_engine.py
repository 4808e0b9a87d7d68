"""Packed CPU engine vs the torch model: tiny models, random weights and BN statistics."""

import numpy as np
import pytest
import torch

from bnnprune.engines.kernels import cpu
from bnnprune.engines.kernels.pack import unpack_pm1
from bnnprune.engines.packed import PackedModel, exact_bn_sign_threshold

from conftest import tiny_bnn

CASES = [
    ("cnn", [1, 28, 28], 0.25, None),
    ("cnn", [3, 32, 32], 0.25, [8, 5, 13, 7, 3, 9]),  # pruned: odd channel counts
    ("cnn", [1, 28, 28], 1.0, [32, 67, 64, 70, 128, 65]),  # channel words > 1
    ("nin", [1, 28, 28], 0.1, None),
    ("nin", [3, 32, 32], 0.1, [19, 7, 11, 19, 5, 19, 3, 19]),
    ("alexnet", [1, 28, 28], 0.1, None),
    ("alexnet", [3, 32, 32], 0.1, [6, 19, 7, 26, 13, 71, 33]),
]


@pytest.mark.parametrize("arch,in_shape,width,channels", CASES)
def test_engine_matches_torch(arch, in_shape, width, channels):
    model = tiny_bnn(arch, in_shape, width, channels)
    engine = PackedModel.from_model(model)
    assert any(s.maxpool is not None for s in engine.steps)  # bit max-pool exercised
    assert engine.steps[0].kind == "stem" and engine.steps[-1].tail is not None  # numba ends
    x = torch.randn(7, *in_shape)
    with torch.no_grad():
        ref = model(x)
    got = engine(x)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(got.argmax(1), ref.argmax(1))
    # a second call reuses the buffers; another batch size reallocates them
    torch.testing.assert_close(engine(x[:3]), ref[:3], rtol=1e-5, atol=1e-5)


def test_fused_path_used_and_unfused_agrees():
    model = tiny_bnn("cnn", [1, 28, 28], 0.25, [8, 5, 13, 7, 3, 9])
    fused = PackedModel.from_model(model)
    plain = PackedModel.from_model(model, fuse=False)
    assert any(s.fused is not None and s.maxpool is None for s in fused.steps)
    assert any(s.maxpool is not None for s in fused.steps)  # max pool on packed bits
    assert all(s.fused is None for s in plain.steps)
    assert fused.steps[0].kind == "stem" and fused.steps[-1].tail is not None
    assert plain.steps[0].kind == "torch" and plain.steps[-1].tail is None
    x = torch.randn(5, 1, 28, 28)
    got, want = fused(x), plain(x)  # the binary middle is exact; the float ends round apart
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(got.argmax(1), want.argmax(1))


def test_stem_bits_are_torch_sign_except_at_rounding_ties():
    model = tiny_bnn("cnn", [1, 28, 28], 0.25, [8, 5, 13, 7, 3, 9])
    stem = PackedModel.from_model(model).steps[0]
    x = torch.randn(16, 1, 28, 28)
    with torch.no_grad():
        y = model.blocks[0](x)  # (B, C, H, W) float BN output, the next layer's sign input
    got = PackedModel.from_model(model)._stem(stem, x)
    want = cpu.pack_channels(y)
    differ = unpack_pm1(got, 8) != unpack_pm1(want, 8)  # (B, H, W, C)
    near_tie = y.permute(0, 2, 3, 1).abs().numpy() < 1e-5
    assert not (differ & ~near_tie).any()
    assert differ.sum() <= 1


def test_exact_threshold_matches_bn_sign():
    bn = torch.nn.BatchNorm2d(6).eval()
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.0, -2.0, 0.0, 0.0, 0.5, -0.1]))
        bn.bias.copy_(torch.tensor([0.3, 0.2, 1.0, -1.0, -5.0, 0.0]))
        bn.running_mean.copy_(torch.tensor([0.0, 3.0, 1.0, 1.0, 2.5, -7.0]))
        bn.running_var.copy_(torch.tensor([1.0, 4.0, 1.0, 1.0, 9.0, 1.0]))
    s, t = exact_bn_sign_threshold(bn, 20)
    acc = torch.arange(-20, 21, dtype=torch.float32)
    with torch.no_grad():
        ref = bn(acc.view(1, 1, -1, 1).expand(1, 6, -1, 1).contiguous())[0, :, :, 0] >= 0
    got = s[:, None] * np.arange(-20, 21)[None] >= t[:, None]
    assert np.array_equal(got, ref.numpy())


def test_training_mode_rejected():
    model = tiny_bnn("cnn", [1, 28, 28], 0.25).train()
    with pytest.raises(ValueError, match="eval mode"):
        PackedModel.from_model(model)
