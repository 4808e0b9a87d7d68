"""CPU (numba) binary kernels: exact against the plain torch reference."""

import json
import platform

import numba
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bnnprune.core.binary import BinaryConv2d
from bnnprune.engines.kernels import cpu
from bnnprune.engines.kernels import reference as ref
from bnnprune.engines.kernels.pack import conv_weight_matrix, n_words, pack_pm1, unpack_pm1

GEMM_SHAPES = [  # (N, K, M): ragged K, K = 1, N = 1, M = 1, K = 64 and 128 exactly
    (1, 1, 1), (1, 64, 1), (3, 1, 5), (5, 31, 3), (7, 33, 1), (1, 65, 4), (6, 64, 7),
    (9, 128, 3), (17, 127, 33), (10, 129, 70), (33, 300, 16),
    (13, 216, 24), (9, 432, 48), (6, 864, 96),  # rounded pruned widths: 4, 7, 14 words
]


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def pm1(*shape, seed=0):
    return torch.where(rand(*shape, seed=seed) >= 0, 1.0, -1.0)


@pytest.mark.parametrize("k", [1, 31, 33, 63, 64, 65, 128, 200])
@pytest.mark.parametrize("word_bits", [32, 64])
def test_pack_roundtrip(k, word_bits):
    x = pm1(5, k, seed=k)
    words = pack_pm1(x, word_bits)
    assert words.shape == (5, n_words(k, word_bits))
    assert words.dtype == (np.uint64 if word_bits == 64 else np.uint32)
    assert (torch.from_numpy(unpack_pm1(words, k)).float() == x).all()
    tail = k % word_bits
    if tail:  # padded bits are zero
        assert (words[:, -1] >> np.array(tail, words.dtype) == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.int8])
@pytest.mark.parametrize("k", [1, 33, 64, 130])
def test_pack_rows_matches_numpy_packing(dtype, k):
    x = rand(9, k, seed=k)
    x = torch.where(x >= 0, 1, -1).to(dtype) if dtype == torch.int8 else x.to(dtype)
    x[0, 0] = 0  # zero is +1
    assert (cpu.pack_rows(x) == pack_pm1(x)).all()
    assert cpu.pack_rows(x)[0, 0] & np.uint64(1) == 1


@pytest.mark.parametrize("n,k,m", GEMM_SHAPES)
def test_gemm_exact(n, k, m):
    a, w = rand(n, k, seed=1), rand(m, k, seed=2)
    got = cpu.binary_gemm(cpu.pack_rows(a), cpu.pack_weight(w), k)
    assert got.dtype == np.int32 and got.shape == (n, m)
    assert (torch.from_numpy(got) == ref.binary_gemm_ref(a, w)).all()
    assert (got == ref.packed_dot_ref(pack_pm1(a), pack_pm1(w), k)).all()


def test_padding_invariance():
    """Extra zero words in both operands, or extra trailing -1/+1 pairs, never change a dot."""
    k = 70
    a, w = pm1(11, k, seed=3), pm1(6, k, seed=4)
    ap, wp = cpu.pack_rows(a), cpu.pack_weight(w)
    base = cpu.binary_gemm(ap, wp, k)
    a_wide = np.concatenate([ap, np.zeros((11, 2), np.uint64)], axis=1)
    w_wide = np.concatenate([wp, np.zeros((2, 6), np.uint64)], axis=0)
    assert (cpu._gemm(a_wide, w_wide, k, np.empty((11, 6), np.int32)) == base).all()
    # appending equal values to both (here +1) adds exactly the number of appended columns
    a2, w2 = F.pad(a, (0, 5), value=1.0), F.pad(w, (0, 5), value=1.0)
    assert (cpu.binary_gemm(cpu.pack_rows(a2), cpu.pack_weight(w2), k + 5) == base + 5).all()


def test_gemm_rejects_wrong_k():
    with pytest.raises(ValueError):
        cpu.binary_gemm(cpu.pack_rows(pm1(2, 70)), cpu.pack_weight(pm1(3, 70)), 200)


def test_gemm_sign_matches_folded_bn():
    n, k, m = 37, 75, 67
    a, w = rand(n, k, seed=5), rand(m, k, seed=6)
    gamma = rand(m, seed=7)
    gamma[:3] = 0.0  # constant channels
    beta, mean, var = rand(m, seed=8), rand(m, seed=9) * 5, rand(m, seed=10).abs() + 0.1
    s, t = ref.fold_bn_sign(gamma, beta, mean, var)
    acc = ref.binary_gemm_ref(a, w)
    want = ref.threshold_sign_ref(acc, s, t)
    assert (want == ref.bn_sign_ref(acc, gamma, beta, mean, var)).all()
    bits = cpu.binary_gemm_sign(cpu.pack_rows(a), cpu.pack_weight(w), k, s, t)
    assert bits.shape == (n, n_words(m))
    assert (torch.from_numpy(unpack_pm1(bits, m)) == want).all()


def test_conv_reference_matches_binary_conv2d_layer():
    layer = BinaryConv2d(3, 4, 3, stride=2, padding=1)
    x = rand(2, 3, 9, 8, seed=11)
    with torch.no_grad():
        want = layer(x).round().to(torch.int32)
    assert (ref.binary_conv2d_ref(x, layer.weight, 2, 1) == want).all()


CONV_CASES = [  # (B, Cin, H, W, Cout, k, stride, padding)
    (2, 3, 9, 8, 4, 3, 1, 1), (2, 3, 9, 8, 4, 3, 2, 0), (2, 5, 9, 9, 3, 3, 2, 1),
    (1, 1, 7, 7, 1, 5, 1, 2), (2, 2, 11, 10, 3, 5, 2, 2), (1, 7, 5, 6, 2, 1, 1, 0),
    (1, 7, 5, 6, 2, 1, 2, 1), (2, 32, 6, 6, 5, 3, 1, 1), (1, 64, 5, 5, 3, 3, 2, 1),
    (1, 70, 6, 5, 66, 3, 1, 1), (1, 130, 4, 4, 2, 3, 1, 2), (1, 3, 3, 3, 2, 5, 1, 2),
    (2, 24, 7, 7, 48, 3, 1, 1), (3, 48, 14, 14, 96, 3, 1, 1),  # rounded pruned widths
]


@pytest.mark.parametrize("b,cin,h,w,cout,k,stride,pad", CONV_CASES)
def test_conv_exact(b, cin, h, w, cout, k, stride, pad):
    x, wt = rand(b, cin, h, w, seed=12), rand(cout, cin, k, k, seed=13)
    want = ref.binary_conv2d_ref(x, wt, stride, pad)
    got = cpu.binary_conv2d(x, wt, stride, pad)
    assert got.dtype == np.int32 and got.shape == tuple(want.shape)
    assert (torch.from_numpy(np.ascontiguousarray(got)) == want).all()


@pytest.mark.parametrize("b,cin,h,w,cout,k,stride,pad", CONV_CASES[::3])
def test_conv_input_forms(b, cin, h, w, cout, k, stride, pad):
    """int8 ±1, channels-last float and pre-packed channel words give the same result."""
    x, wt = rand(b, cin, h, w, seed=14), rand(cout, cin, k, k, seed=15)
    want = ref.binary_conv2d_ref(x, wt, stride, pad).numpy()
    pw = cpu.pack_conv_weight(wt)
    x_i8 = torch.where(x >= 0, 1, -1).to(torch.int8)
    for xin in (x_i8, x.to(memory_format=torch.channels_last), cpu.pack_channels(x)):
        assert (cpu.binary_conv2d(xin, pw, stride, pad) == want).all()


def test_conv_packing_layout():
    x, wt = rand(2, 70, 4, 3, seed=16), rand(3, 70, 3, 3, seed=17)
    xc = cpu.pack_channels(x)  # (B, H, W, C_words)
    assert (xc == pack_pm1(x.permute(0, 2, 3, 1))).all()
    cols = cpu.im2col_packed(xc, 70, 3, 3, 1, 1)  # (B * OH * OW, K_words)
    xp = F.pad(torch.where(x >= 0, 1.0, -1.0), (1,) * 4, value=1.0)
    unfold = F.unfold(xp, 3).reshape(2, 70, 9, -1).permute(0, 3, 2, 1).reshape(2 * 12, -1)
    assert (cols == pack_pm1(unfold)).all()  # channels-last K order (tap, channel)
    assert (pack_pm1(conv_weight_matrix(wt)) == cpu.pack_conv_weight(wt).words.T).all()


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 only")
def test_swar_popcount_compiles_to_popcnt():
    """LLVM turns the SWAR bit count into the hardware instruction (vpopcntq with AVX-512)."""

    @numba.njit
    def row_counts(aq, wq, acc):  # the GEMM's inner loop over M
        for j in range(wq.shape[0]):
            acc[j] += cpu.popcount64(aq ^ wq[j])

    row_counts(np.uint64(3), np.zeros(8, np.uint64), np.zeros(8, np.int32))
    asm = "".join(row_counts.inspect_asm().values())
    assert "popcnt" in asm


def test_conv_sign_chain():
    """conv -> folded BN + sign (packed bits) -> conv on the packed bits, as at inference."""
    x = rand(2, 3, 9, 9, seed=18)
    w1, w2 = rand(70, 3, 3, 3, seed=19), rand(5, 70, 3, 3, seed=20)
    gamma, beta = rand(70, seed=21), rand(70, seed=22)
    mean, var = rand(70, seed=23) * 4, rand(70, seed=24).abs() + 0.1
    s, t = ref.fold_bn_sign(gamma, beta, mean, var)
    acc1 = ref.binary_conv2d_ref(x, w1, 2, 1).permute(0, 2, 3, 1)  # (B, OH, OW, 70)
    h1 = ref.bn_sign_ref(acc1, gamma, beta, mean, var)  # ±1 int8 channels-last
    bits = cpu.binary_conv2d_sign(x, w1, s, t, 2, 1)  # (B, OH, OW, 2) uint64
    assert bits.shape == (2, 5, 5, 2)
    assert (torch.from_numpy(unpack_pm1(bits, 70)) == h1).all()
    want = ref.binary_conv2d_ref(h1.permute(0, 3, 1, 2).float(), w2, 1, 1)
    assert (cpu.binary_conv2d(bits, w2, 1, 1) == want.numpy()).all()


def test_out_buffers_are_reused_and_fully_overwritten():
    x, wt = rand(2, 70, 5, 4, seed=25), rand(6, 70, 3, 3, seed=26)
    s, t = ref.fold_bn_sign(rand(6, seed=27), rand(6, seed=28), rand(6, seed=29), torch.ones(6))
    xc, pw, k = cpu.pack_channels(x), cpu.pack_conv_weight(wt), 9 * 70
    cols = cpu.im2col_packed(xc, 70, 3, 3, 2, 1)
    acc = cpu.binary_gemm(cols, pw.words, k)
    bits = cpu.binary_gemm_sign(cols, pw.words, k, s, t)
    dirty = np.uint64(0xFFFFFFFFFFFFFFFF)
    cols_buf, bits_buf = np.full_like(cols, dirty), np.full_like(bits, dirty)
    acc_buf = np.full_like(acc, 7)
    assert cpu.im2col_packed(xc, 70, 3, 3, 2, 1, out=cols_buf) is cols_buf
    assert (cols_buf == cols).all()
    assert (cpu.binary_gemm(cols, pw.words, k, out=acc_buf) == acc).all()
    assert (cpu.binary_gemm_sign(cols, pw.words, k, s, t, out=bits_buf) == bits).all()
    rows = x.reshape(10, -1)  # (10, 280): 5 words
    assert (cpu.pack_rows(rows, out=np.full((10, 5), dirty)) == pack_pm1(rows)).all()
    with pytest.raises(ValueError):
        cpu.binary_gemm(cols, pw.words, k, out=np.empty((3, 3), np.int32))


def test_bench_kernels_smoke(tmp_path):
    from bnnprune.engines import bench_kernels

    out = tmp_path / "bench.json"
    result = bench_kernels.main(["--threads", "1", "--shapes", "37x33x5,8x64x3", "--repeats", "2",
                                 "--warmup", "1", "--out", str(out)])
    assert [(r["n"], r["k"], r["m"]) for r in result["gemm"]] == [(37, 33, 5), (8, 64, 3)]
    assert all(r["exact"] and r["speedup_gemm"] > 0 for r in result["gemm"])
    assert json.loads(out.read_text())["threads"] == 1
    conv = bench_kernels.run([(4, 9, 2)], threads=1, repeats=1, warmup=0, convs=[(1, 3, 5, 5, 4)])
    assert conv["conv"][0]["exact"]


FLOAT_CONV_CASES = [  # (B, Cin, H, W, Cout, k, stride, padding): ragged Cout, > 64 channels
    (2, 1, 9, 8, 5, 3, 1, 1), (1, 3, 10, 9, 70, 5, 2, 2), (3, 2, 6, 6, 1, 1, 1, 0),
]


@pytest.mark.parametrize("b,cin,h,w,cout,k,stride,pad", FLOAT_CONV_CASES)
def test_float_conv_sign_matches_torch(b, cin, h, w, cout, k, stride, pad):
    x, wt = rand(b, cin, h, w, seed=30), rand(cout, cin, k, k, seed=31)
    alpha, beta = rand(cout, seed=32), rand(cout, seed=33)
    alpha[0] = 0.0  # a constant channel: the sign of beta
    y = F.conv2d(x, wt, None, stride, pad) * alpha.view(1, -1, 1, 1) + beta.view(1, -1, 1, 1)
    got = cpu.float_conv_sign(x, wt, alpha, beta, stride, pad)  # (B, OH, OW, Cout_words)
    assert got.shape == (b, y.shape[2], y.shape[3], n_words(cout))
    want = y.permute(0, 2, 3, 1) >= 0  # (B, OH, OW, Cout)
    differ = (unpack_pm1(got, cout) > 0) != want.numpy()
    assert not (differ & (y.permute(0, 2, 3, 1).abs().numpy() > 1e-5)).any()  # ties only
    if cout % 64:  # padding bits stay zero
        assert (got[..., -1] >> np.uint64(cout % 64) == 0).all()


FLOAT_ROWS_CASES = [  # (B, Cin, H, W, Cout, k, stride, padding, pool)
    (1, 1, 28, 28, 32, 3, 1, 1, 1),  # birealnet's stem at full width: 784 pixels, 13 tasks
    (3, 1, 9, 7, 5, 3, 2, 1, 1),  # stride 2, odd sizes, Cout not a multiple of 4
    (3, 3, 11, 10, 33, 3, 1, 1, 1),  # 330 pixels: tasks start mid-row and span images
    (1, 3, 10, 9, 13, 5, 2, 2, 1),  # padding 2: taps of a row fully outside
    (3, 2, 7, 5, 7, 3, 1, 0, 1),  # no padding; 45 pixels: one task, a ragged last block
    (3, 32, 28, 28, 64, 1, 1, 0, 2),  # birealnet's first shortcut: AvgPool(2) + 1x1
    (1, 64, 15, 13, 128, 1, 1, 0, 2),  # odd sizes: AvgPool drops the last row and column
    (3, 3, 10, 11, 6, 1, 1, 0, 3),  # pool 3 (1 / 9 not exact in float32)
    (3, 5, 12, 12, 9, 3, 2, 1, 2),  # a pooled 3x3 stride-2 conv (the kernel allows it)
    (2, 4, 9, 11, 6, 3, 1, 1, 2),  # pooled 4x5, padded: taps past the right and bottom edge
]


@pytest.mark.parametrize("b,cin,h,w,cout,k,stride,pad,pool", FLOAT_ROWS_CASES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_float_conv_rows_matches_torch(b, cin, h, w, cout, k, stride, pad, pool, with_bias):
    """conv2d(avg_pool2d(x, pool)) + bias on channels-last rows, to float32 rounding (the sums
    run in another order): |diff| <= 1e-5 * (1 + |torch|); the output buffer fully written."""
    x, wt = rand(b, cin, h, w, seed=40), rand(cout, cin, k, k, seed=41)
    bias = rand(cout, seed=42) if with_bias else None
    xp = F.avg_pool2d(x, pool) if pool > 1 else x
    y = F.conv2d(xp, wt, bias, stride, pad)  # (B, Cout, OH, OW)
    want = y.permute(0, 2, 3, 1).reshape(-1, cout).numpy()  # (B * OH * OW, Cout)
    out = np.full(want.shape, np.nan, np.float32)  # stale values must not survive
    x_nhwc = x.permute(0, 2, 3, 1).contiguous().numpy()  # (B, H, W, Cin)
    got = cpu.float_conv_rows(x_nhwc, wt, bias, stride, pad, pool, out)
    assert got is out
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_float_conv_rows_rejects_wrong_shapes():
    x = np.zeros((1, 5, 5, 3), np.float32)
    with pytest.raises(ValueError, match="input has 3 channels, the weight 2"):
        cpu.float_conv_rows(x, np.zeros((4, 2, 3, 3), np.float32), None)
    with pytest.raises(ValueError, match="out must be"):
        cpu.float_conv_rows(x, np.zeros((4, 3, 3, 3), np.float32), None, 1, 1,
                            out=np.zeros((24, 4), np.float32))


@pytest.mark.parametrize("pool,gap", [((1, 1, 0), False), ((2, 2, 0), False), ((3, 2, 1), True)])
def test_classify_matches_torch_head(pool, gap):
    b, h, w, c, classes = 3, 7, 7, 70, 10
    acc = torch.randint(-50, 51, (b, h, w, c), generator=torch.Generator().manual_seed(34),
                        dtype=torch.int32)
    alpha, beta = rand(c, seed=35), rand(c, seed=36)
    y = acc.permute(0, 3, 1, 2).float()  # (B, C, H, W)
    y = F.max_pool2d(y, pool[0], pool[1], pool[2]) if pool[0] > 1 else y
    y = y * alpha.view(1, -1, 1, 1) + beta.view(1, -1, 1, 1)
    feats = y.mean(dim=(2, 3)) if gap else y.flatten(1)  # torch's NCHW flatten order
    linear = torch.nn.Linear(feats.shape[1], classes)
    with torch.no_grad():
        want = linear(feats)
        weight = linear.weight.detach() if gap else (  # -> channels-last feature order (PH, PW, C)
            linear.weight.detach().view(classes, c, y.shape[2], y.shape[3]).permute(0, 2, 3, 1)
            .reshape(classes, -1))
    got = cpu.classify(acc.numpy(), *pool, alpha, beta, gap, weight, linear.bias)
    torch.testing.assert_close(torch.from_numpy(got), want, rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="features"):
        cpu.classify(acc.numpy(), *pool, alpha, beta, gap, weight[:, 1:], linear.bias)


@pytest.mark.parametrize("pool,h,w,bias", [(2, 7, 7, True), (0, 7, 5, True), (1, 3, 4, False),
                                          (3, 9, 6, True)])
def test_pool_linear_matches_torch_head(pool, h, w, bias):
    """The residual engine's head: AvgPool2d(pool) (0: the global mean), torch's (C, PH, PW)
    flatten order, linear; odd sizes leave pixels out as AvgPool2d does."""
    b, c, classes = 3, 19, 7
    x = torch.randn(b, c, h, w, generator=torch.Generator().manual_seed(40))
    y = x.mean(dim=(2, 3)) if pool == 0 else F.avg_pool2d(x, pool).flatten(1)
    linear = torch.nn.Linear(y.shape[1], classes, bias=bias)
    with torch.no_grad():
        want = linear(y)
    got = cpu.pool_linear(x.permute(0, 2, 3, 1).numpy(), pool, linear.weight.detach(),
                          linear.bias)
    torch.testing.assert_close(torch.from_numpy(got), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="features"):
        cpu.pool_linear(x.permute(0, 2, 3, 1).numpy(), pool, linear.weight.detach()[:, 1:], None)


def test_pool_linear_rejects_a_pool_larger_than_the_map():
    x = np.zeros((1, 3, 4, 2), np.float32)
    with pytest.raises(ValueError,
                       match=r"pool 5 does not fit a 3x4 map \(allowed: 0 = global, 1..3\)"):
        cpu.pool_linear(x, 5, np.zeros((2, 2), np.float32), None)


def test_mismatch_limits_are_the_threshold_compare_and_pruned_widths_stay_exact():
    """`(mismatches <= limit) ^ flip` == `s * acc >= t` for every reachable acc, and ragged
    (pruned) output widths, padded to whole vectors inside the GEMM, give exact results."""
    k, m = 75, 25
    s = torch.tensor([1, -1, 0, 0, 1, -1] * 4 + [1])
    t = torch.tensor([-80, 3, 0, 1, 75, -76, 10, 0, 0, 5, -3, 77] * 2 + [76])
    limit, flip = cpu.mismatch_limits(s, t, k)
    flips = unpack_pm1(flip[None], m)[0] > 0
    for mism in range(k + 1):
        acc = k - 2 * mism
        want = (s * acc >= t).numpy()
        assert ((mism <= limit[:m]) ^ flips == want).all(), mism
    assert (limit[m:] == -1).all() and len(limit) == 32  # padding channels: never set
    a, w = rand(9, k, seed=40), rand(m, k, seed=41)
    ap, wp = cpu.pack_rows(a), cpu.pack_weight(w)
    assert cpu.pad_columns(wp).shape == (2, 32)
    bits = cpu.binary_gemm_limits(ap, wp, limit, flip)
    want = ref.threshold_sign_ref(ref.binary_gemm_ref(a, w), s, t)
    assert (torch.from_numpy(unpack_pm1(bits, m)) == want).all()
    with pytest.raises(ValueError, match="-1, 0 or \\+1"):
        cpu.mismatch_limits(s * 2, t, k)
    with pytest.raises(ValueError, match="shapes differ"):
        cpu.binary_gemm_limits(ap, wp, limit[1:], flip)


def test_peak_xor_popcount_counts_its_work():
    from bnnprune.engines.bench_kernels import PEAK_WORDS, PeakXorPopcount, _xor_popcount_loop

    peak = PeakXorPopcount(threads=2, reps=3)
    assert len(_xor_popcount_loop.signatures) == 1  # compiled at construction, not when timed
    assert peak.macs == 64 * 2 * PEAK_WORDS * 3
    got = peak().copy()
    c0 = np.uint64(0x9E3779B97F4A7C15)
    for t in range(2):  # the same sums in numpy
        want = sum(int(np.bitwise_count(peak.buf[t] ^ (c0 + np.uint64(t + r))).sum())
                   for r in range(3))
        assert int(got[t]) == want
    assert len(_xor_popcount_loop.signatures) == 1  # the call compiled nothing more


@pytest.mark.parametrize("k,stride,pad", [(2, 2, 0), (3, 2, 1), (3, 1, 1)])
def test_maxpool_bits_is_maxpool_of_the_signs(k, stride, pad):
    """OR of the window where BN increases, AND where it decreases == sign(BN(maxpool(acc)))
    with -inf padding, on packed bits of 70 channels (two words)."""
    g = torch.Generator().manual_seed(40)
    acc = torch.randint(-9, 10, (2, 70, 7, 6), generator=g).float()  # (B, C, H, W)
    s = torch.randint(0, 2, (70,), generator=g) * 2 - 1  # +1 increasing, -1 decreasing
    t = torch.randint(-3, 4, (70,), generator=g)
    sign = lambda a: (s.view(1, -1, 1, 1) * a >= t.view(1, -1, 1, 1)).float() * 2 - 1  # noqa: E731
    want = sign(torch.nn.functional.max_pool2d(acc, k, stride, pad))
    bits = cpu.pack_channels(sign(acc))  # (B, H, W, 2)
    inc = pack_pm1(torch.where(s > 0, 1.0, -1.0))
    dec = pack_pm1(torch.where(s < 0, 1.0, -1.0))
    dec[-1] &= np.uint64(2**6 - 1)  # padding channels set in neither mask
    got = cpu.maxpool_bits(bits, k, stride, pad, inc, dec)
    assert (got == cpu.pack_channels(want)).all()


@pytest.mark.parametrize("b,cin,h,w,cout,k,stride,pad", [
    (3, 1, 28, 28, 32, 3, 1, 1), (2, 2, 9, 11, 70, 3, 2, 1), (2, 3, 8, 8, 5, 5, 1, 2),
    (1, 1, 7, 7, 4, 3, 1, 0)])
def test_float_conv_sign_bits_are_the_tap_ordered_float32_sums(b, cin, h, w, cout, k, stride,
                                                               pad):
    """Bit-exact against float32 sums taken tap by tap in (c, i, j) order from 0 (numpy, one
    rounding per multiply and per add), the order the stem kernel keeps."""
    rng = np.random.default_rng(b * 100 + cout)
    x = rng.standard_normal((b, cin, h, w)).astype(np.float32)
    wt = rng.standard_normal((cout, cin, k, k)).astype(np.float32)
    alpha, beta = (rng.standard_normal(cout).astype(np.float32) for _ in range(2))
    oh, ow = (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    acc = np.zeros((b, oh, ow, cout), np.float32)
    for c in range(cin):
        for i in range(k):
            for j in range(k):
                ys, xs = slice(i, i + stride * (oh - 1) + 1, stride), slice(
                    j, j + stride * (ow - 1) + 1, stride)
                xs = xp[:, c, ys, xs]
                acc = acc + xs[..., None] * wt[:, c, i, j]
    want = cpu.pack_rows((acc * alpha + beta).reshape(-1, cout)).reshape(b, oh, ow, -1)
    got = cpu.float_conv_sign(x, wt, alpha, beta, stride, pad)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("m", [37, 130])  # one / three words, rows not a whole task
@pytest.mark.parametrize("res_kind", ["affine", "plain", "none"])
@pytest.mark.parametrize("prelu", [True, False])
@pytest.mark.parametrize("parts", ["both", "bits", "out"])
def test_block_epilogue_is_the_formula_in_float32(m, res_kind, prelu, parts):
    """cpu.block_epilogue against numpy in float32 and torch's order of operations, bit for
    bit: every combination of shortcut, PReLU and outputs, int32 and float rows, into stale
    buffers."""
    rng = np.random.default_rng(m)
    n = 70  # 2 tasks of EPILOGUE_ROWS and a ragged one
    vec = lambda: rng.standard_normal(m).astype(np.float32)  # noqa: E731
    scale, a1, b1, a2, b2, nbias, slope = (vec() for _ in range(7))
    for src in (rng.integers(-30, 30, (n, m)).astype(np.int32),
                rng.standard_normal((n, m)).astype(np.float32)):
        res = rng.standard_normal((n, m)).astype(np.float32)
        y = src.astype(np.float32) * scale * a1 + b1
        if res_kind == "affine":
            y = y + (res * a2 + b2)
        elif res_kind == "plain":
            y = y + res
        if prelu:
            y = np.where(y > 0, y, y * slope)
        out = np.full((n, m), np.nan, np.float32) if parts != "bits" else None
        bits = np.full((n, n_words(m)), 7, np.uint64) if parts != "out" else None
        got_out, got_bits = cpu.block_epilogue(
            src, scale, a1, b1, None if res_kind == "none" else res,
            a2 if res_kind == "affine" else None, b2 if res_kind == "affine" else None,
            slope if prelu else None, out, nbias if parts != "out" else None, bits)
        if parts != "bits":
            assert np.array_equal(got_out, y)
        else:
            assert got_out.shape[0] == 0
        if parts != "out":
            assert np.array_equal(unpack_pm1(got_bits, m) > 0, y + nbias >= 0)
        else:
            assert got_bits.shape[0] == 0
