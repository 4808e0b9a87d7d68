"""Triton kernels under the interpreter (TRITON_INTERPRET=1, CPU tensors): exact vs reference.

The variable must be set before the kernel module is imported (it picks popcount and
autotuning at import), so it is set here before any bnnprune / triton import."""

import os

os.environ["TRITON_INTERPRET"] = "1"

import importlib  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import bnnprune.engines.kernels.triton_kernels as tk  # noqa: E402
from bnnprune.engines.kernels import reference as ref  # noqa: E402
from bnnprune.engines.kernels.pack import pack_pm1, unpack_pm1  # noqa: E402

if not tk.INTERPRET:  # imported earlier in compiled mode by another test module
    tk = importlib.reload(tk)


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def bn_params(m, seed):
    gamma = rand(m, seed=seed)
    gamma[0] = 0.0  # a constant channel
    beta, mean = rand(m, seed=seed + 1), rand(m, seed=seed + 2) * 4
    var = rand(m, seed=seed + 3).abs() + 0.1
    return gamma, beta, mean, var


@pytest.mark.parametrize("k", [1, 31, 32, 33, 65, 100])
@pytest.mark.parametrize("dtype", [torch.float32, torch.int8])
def test_pack_rows(k, dtype):
    x = rand(5, k, seed=k)
    x = torch.where(x >= 0, 1, -1).to(dtype) if dtype == torch.int8 else x
    got = tk.pack_rows(x)
    assert got.dtype == torch.int32 and got.shape == (5, tk.n_words32(k))
    assert (got.numpy().view(np.uint32) == pack_pm1(x, 32)).all()
    unpacked = torch.from_numpy(unpack_pm1(got.numpy().view(np.uint32), k))
    assert (unpacked == torch.where(x >= 0, 1, -1)).all()


def test_pack_rows_strided():
    x = rand(33, 6, seed=1).T  # (6, 33), non-contiguous
    assert (tk.pack_rows(x).numpy().view(np.uint32) == pack_pm1(x, 32)).all()


@pytest.mark.parametrize("n,k,m", [(1, 1, 1), (3, 31, 3), (1, 33, 1), (9, 65, 3), (5, 64, 2),
                                   (17, 100, 35)])
def test_gemm_exact(n, k, m):
    a, w = rand(n, k, seed=2), rand(m, k, seed=3)
    got = tk.binary_gemm(tk.pack_rows(a), tk.pack_rows(w), k)
    assert got.dtype == torch.int32
    assert (got == ref.binary_gemm_ref(a, w)).all()


def test_gemm_rejects_wrong_k():
    with pytest.raises(ValueError):
        tk.binary_gemm(tk.pack_rows(rand(2, 33)), tk.pack_rows(rand(3, 33)), 100)


@pytest.mark.parametrize("n,k,m", [(1, 33, 1), (7, 65, 3), (10, 31, 33), (4, 40, 70),
                                   (5, 216, 24), (3, 432, 48), (2, 864, 96)])  # rounded widths
def test_gemm_sign(n, k, m):
    a, w = rand(n, k, seed=4), rand(m, k, seed=5)
    s, t = ref.fold_bn_sign(*bn_params(m, seed=6))
    want = ref.threshold_sign_ref(ref.binary_gemm_ref(a, w), s, t)
    ap, wp = tk.pack_rows(a), tk.pack_rows(w)
    got = tk.binary_gemm_sign(ap, wp, k, s, t)
    assert got.dtype == torch.int8 and (got == want).all()
    bits = tk.binary_gemm_sign(ap, wp, k, s, t, packed=True)
    assert bits.shape == (n, tk.n_words32(m))
    assert (torch.from_numpy(unpack_pm1(bits.numpy().view(np.uint32), m)) == want).all()


CONV_CASES = [  # (B, Cin, H, W, Cout, k, stride, padding)
    (1, 3, 5, 6, 2, 3, 1, 1), (2, 2, 7, 5, 3, 3, 2, 0), (1, 5, 6, 6, 1, 3, 2, 1),
    (1, 1, 7, 7, 2, 5, 1, 2), (1, 2, 6, 7, 2, 5, 2, 2), (2, 7, 4, 3, 3, 1, 1, 0),
    (1, 33, 3, 3, 2, 1, 2, 1), (1, 4, 3, 3, 2, 5, 1, 2),
]


@pytest.mark.parametrize("b,cin,h,w,cout,k,stride,pad", CONV_CASES)
def test_conv_exact(b, cin, h, w, cout, k, stride, pad):
    x, wt = rand(b, cin, h, w, seed=7), rand(cout, cin, k, k, seed=8)
    want = ref.binary_conv2d_ref(x, wt, stride, pad)
    got = tk.binary_conv2d(x, wt, stride, pad)
    assert got.dtype == torch.int32 and got.shape == want.shape and (got == want).all()


def test_conv_input_forms():
    """int8 ±1 and channels-last inputs give the same result as float NCHW."""
    x, wt = rand(2, 3, 5, 4, seed=9), rand(2, 3, 3, 3, seed=10)
    want = ref.binary_conv2d_ref(x, wt, 1, 1)
    for xin in (torch.where(x >= 0, 1, -1).to(torch.int8), x.to(memory_format=torch.channels_last)):
        assert (tk.binary_conv2d(xin, wt, 1, 1) == want).all()


@pytest.mark.parametrize("b,cin,h,w,cout,k,stride,pad", [(1, 3, 5, 6, 3, 3, 1, 1),
                                                         (2, 2, 5, 5, 33, 3, 2, 2)])
def test_conv_sign(b, cin, h, w, cout, k, stride, pad):
    x, wt = rand(b, cin, h, w, seed=11), rand(cout, cin, k, k, seed=12)
    gamma, beta, mean, var = bn_params(cout, seed=13)
    s, t = ref.fold_bn_sign(gamma, beta, mean, var)
    acc = ref.binary_conv2d_ref(x, wt, stride, pad).permute(0, 2, 3, 1)  # (B, OH, OW, Cout)
    want = ref.bn_sign_ref(acc, gamma, beta, mean, var)
    assert (want == ref.threshold_sign_ref(acc, s, t)).all()
    got = tk.binary_conv2d_sign(x, wt, s, t, stride, pad)
    assert got.dtype == torch.int8 and (got == want.permute(0, 3, 1, 2)).all()
    bits = tk.binary_conv2d_sign(x, wt, s, t, stride, pad, packed=True)  # (B, OH, OW, Cw)
    unpacked = unpack_pm1(bits.numpy().view(np.uint32), cout)
    assert (torch.from_numpy(unpacked) == want).all()


def test_error_without_gpu_or_interpreter():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    code = ("import torch, bnnprune.engines.kernels.triton_kernels as tk\n"
            "try:\n    tk.pack_rows(torch.ones(2, 3))\n"
            "except RuntimeError as e:\n    print('RuntimeError', e)\n")
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120)
    assert "RuntimeError" in out.stdout and "TRITON_INTERPRET=1" in out.stdout, out.stderr


@pytest.mark.parametrize("b,cin,h,w,k,stride,pad", [
    (2, 1, 4, 5, 3, 1, 1), (1, 5, 5, 4, 3, 2, 2), (1, 32, 3, 3, 3, 1, 1), (2, 33, 3, 4, 1, 1, 0),
    (1, 40, 4, 4, 5, 2, 2)])
def test_im2col_pack_bits(b, cin, h, w, k, stride, pad):
    """Packed channels-last bits in, the same columns as `im2col_pack` of the values."""
    x = rand(b, cin, h, w, seed=cin)
    bits = tk.pack_rows(x.permute(0, 2, 3, 1).reshape(-1, cin)).view(b, h, w, -1)
    want = tk.im2col_pack(x, k, k, stride, pad)
    got = tk.im2col_pack_bits(bits, cin, k, k, stride, pad)
    assert got.dtype == torch.int32 and got.shape == want.shape and (got == want).all()


def test_im2col_pack_bits_reads_fused_conv_output():
    """Chained: conv -> BN + sign as packed bits -> im2col_pack_bits -> conv, vs the reference."""
    x, w1, w2 = rand(2, 3, 5, 5, seed=20), rand(35, 3, 3, 3, seed=21), rand(2, 35, 3, 3, seed=22)
    s, t = ref.fold_bn_sign(*bn_params(35, seed=23))
    bits = tk.binary_conv2d_sign(x, w1, s, t, 1, 1, packed=True)  # (2, 5, 5, 2)
    pm1 = tk.binary_conv2d_sign(x, w1, s, t, 1, 1)  # (2, 35, 5, 5) int8 ±1
    cols = tk.im2col_pack_bits(bits, 35, 3, 3, 2, 1)
    got = tk.binary_gemm(cols, tk.pack_conv_weight(w2), 3 * 3 * 35).view(2, 3, 3, 2)
    assert (got.permute(0, 3, 1, 2) == ref.binary_conv2d_ref(pm1.float(), w2, 2, 1)).all()


def test_im2col_pack_bits_rejects_wrong_word_count():
    with pytest.raises(ValueError, match="channel words"):
        tk.im2col_pack_bits(torch.zeros(1, 3, 3, 2, dtype=torch.int32), 32, 3, 3)


COMPILE_CHECK = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import bnnprune.engines.kernels.triton_kernels as tk

assert not tk.INTERPRET
ints = lambda *names: {n: "i32" for n in names}  # noqa: E731
im2col = {**ints("C", "H", "W", "OH", "OW", "NROWS", "K", "KWORDS", "KWID", "stride_xb",
                 "stride_xc", "stride_xh", "stride_xw", "STRIDE", "PAD"),
          "PACKED": "constexpr", "BLOCK_N": "constexpr", "BLOCK_W": "constexpr"}
gemm = {"a_ptr": "*i32", "w_ptr": "*i32", "out_ptr": "*i32", "s_ptr": "*i32", "t_ptr": "*i32",
        **ints("N", "M", "K", "KWORDS", "OUT_COLS"), "EPILOGUE": "constexpr",
        "BLOCK_N": "constexpr", "BLOCK_M": "constexpr", "BLOCK_KW": "constexpr"}
epilogue = {"src_ptr": "*i32", **{p: "*fp32" for p in ("scale_ptr", "a1_ptr", "b1_ptr",
            "res_ptr", "a2_ptr", "b2_ptr", "slope_ptr", "out_ptr", "nbias_ptr")},
            "bits_ptr": "*i32", **ints("N", "M", "MWORDS"),
            **{k: "constexpr" for k in ("HAS_RES", "RES_AFFINE", "PRELU", "WRITE_OUT",
                                        "WRITE_BITS", "BLOCK_N", "BLOCK_W")}}
for fn, sig, const in [
        (tk._im2col_pack_kernel, {"x_ptr": "*i32", "out_ptr": "*i32", **im2col},
         {"PACKED": True, "BLOCK_N": 32, "BLOCK_W": 4}),
        (tk._im2col_pack_kernel, {"x_ptr": "*fp32", "out_ptr": "*i32", **im2col},
         {"PACKED": False, "BLOCK_N": 32, "BLOCK_W": 4}),
        (tk._gemm_kernel, gemm, {"EPILOGUE": 2, "BLOCK_N": 64, "BLOCK_M": 64, "BLOCK_KW": 4}),
        (tk._epilogue_kernel, epilogue,  # residual blocks: int32 conv outputs in, both out
         {"HAS_RES": True, "RES_AFFINE": True, "PRELU": True, "WRITE_OUT": True,
          "WRITE_BITS": True, "BLOCK_N": 32, "BLOCK_W": 4})]:
    names = list(sig)
    src = ASTSource(fn=fn, signature=sig,
                    constexprs={(names.index(k),): v for k, v in const.items()})
    for arch in (80, 90):
        kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                options={"num_warps": 4})
        assert kernel.asm["cubin"], (fn, arch)
        if fn is tk._gemm_kernel:
            assert "popc" in kernel.asm["ptx"]
print("compiled")
"""


def test_kernels_compile_for_a_gpu_target(tmp_path):
    """Compiled mode (not the interpreter) builds PTX and a cubin for sm_80 and sm_90 ahead of
    time, with triton's bundled ptxas; no GPU needed. Covers the packed-bits im2col, the bits
    GEMM and the residual blocks' epilogue (float stream + packed signs)."""
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_CACHE_DIR": str(tmp_path),
           "TRITON_DEFAULT_FP_FUSION": "1"}
    out = subprocess.run([sys.executable, "-c", COMPILE_CHECK], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.stdout.strip().endswith("compiled"), out.stderr[-3000:]
