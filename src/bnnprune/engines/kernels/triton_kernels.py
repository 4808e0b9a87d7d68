"""Triton (GPU) backend: bit packing, XNOR-popcount GEMM, binary conv, folded BN + sign.

Words are 32 bits, stored in torch int32 tensors (bit convention in `pack.py`: value >= 0 is
bit 1, K contiguous, zero tail). Both GEMM operands are row-major packed rows:
activations (N, K_words), weights (M, K_words). Convolutions reduce over K = kh * kw * Cin in
channels-last order (tap, channel) like the CPU backend, and pad sign(x) with +1. im2col reads
real values (`im2col_pack`) or channels-last packed bits (`im2col_pack_bits`, the packed output
of a folded BN + sign), so conv -> conv can stay in bits.

Mode is fixed when this module is imported:
  * compiled (default): needs a CUDA GPU; popcount is `libdevice.popc`, kernels autotune.
  * interpreter: set ``TRITON_INTERPRET=1`` *before* importing this module (set it before
    importing triton at all, to be safe). The interpreter runs each launch on host copies of
    the tensor arguments (triton 3.9 copies every argument's storage to CPU and back), so
    plain CPU tensors work. It cannot call libdevice, so popcount is a SWAR bit count, and
    autotuning is bypassed with one fixed small config per kernel (the interpreter is slow;
    it caps a block at 2**20 elements).
Wrappers raise RuntimeError when neither a GPU nor the interpreter is available.

Folded BatchNorm + sign (`binary_gemm_sign`, `binary_conv2d_sign`): per output channel j an
int32 pair (s[j], t[j]) from `reference.fold_bn_sign`, and out = +1 iff s[j] * acc >= t[j]:
s = +1 means acc >= t (gamma > 0), s = -1 means acc <= -t (gamma < 0), s = 0 a constant
channel (gamma == 0; t = 0 gives +1, t = 1 gives -1). Output is ±1 int8, or bits packed along
the channels (N, ceil(M / 32)) int32 (bit 1 = +1), the next layer's packed input.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

EPILOGUE_ACC, EPILOGUE_INT8, EPILOGUE_BITS = 0, 1, 2

if INTERPRET:

    @triton.jit
    def _popc(x):
        """SWAR bit count of int32 words (the interpreter cannot call libdevice)."""
        u = x.to(tl.uint32, bitcast=True)
        u = u - ((u >> 1) & 0x55555555)
        u = (u & 0x33333333) + ((u >> 2) & 0x33333333)
        u = (u + (u >> 4)) & 0x0F0F0F0F
        u = u + (u >> 8)
        u = u + (u >> 16)
        return (u & 0x3F).to(tl.int32)

else:
    from triton.language.extra.cuda import libdevice

    @triton.jit
    def _popc(x):
        return libdevice.popc(x)


@triton.jit
def _or(a, b):
    return a | b


@triton.jit
def _bits_to_words(bit, BLOCK_W: tl.constexpr):
    """(R, BLOCK_W * 32) 0/1 int32, consecutive bits -> (R, BLOCK_W) int32 words."""
    shift = (tl.arange(0, BLOCK_W * 32) % 32).to(tl.uint32)
    bits = bit.to(tl.uint32) << shift[None, :]
    words = tl.reduce(tl.reshape(bits, (bit.shape[0], BLOCK_W, 32)), 2, _or)  # (R, BLOCK_W)
    return words.to(tl.int32, bitcast=True)


# ---------------------------------------------------------------------------- kernels


@triton.jit
def _pack_kernel(x_ptr, out_ptr, N, K, KWORDS, stride_xn, stride_xk,
                 BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr):
    """x (N, K) any real dtype -> out (N, KWORDS) int32, bit = x >= 0."""
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rw = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    k = tl.program_id(1) * BLOCK_W * 32 + tl.arange(0, BLOCK_W * 32)
    mask = (rn[:, None] < N) & (k[None, :] < K)  # (BLOCK_N, BLOCK_W * 32)
    x = tl.load(x_ptr + rn[:, None].to(tl.int64) * stride_xn + k[None, :] * stride_xk,
                mask=mask, other=0)
    words = _bits_to_words((mask & (x >= 0)).to(tl.int32), BLOCK_W)
    out_mask = (rn[:, None] < N) & (rw[None, :] < KWORDS)
    tl.store(out_ptr + rn[:, None].to(tl.int64) * KWORDS + rw[None, :], words, mask=out_mask)


@triton.jit
def _im2col_pack_kernel(x_ptr, out_ptr, C, H, W, OH, OW, NROWS, K, KWORDS, KWID,
                        stride_xb, stride_xc, stride_xh, stride_xw, STRIDE, PAD,
                        PACKED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr):
    """x (B, C, H, W) any strides -> out (B * OH * OW, KWORDS) int32, k = (i * KWID + j) * C + c,
    bit = sign(x) >= 0 inside the image and 1 (pad value +1) outside.
    PACKED: x holds int32 words of packed channels, element (b, c // 32, y, x) at the strides
    given, and the bit of channel c is bit c % 32 of that word."""
    r = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # output pixel (b, oy, ox)
    rw = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    k = tl.program_id(1) * BLOCK_W * 32 + tl.arange(0, BLOCK_W * 32)
    b, oy, ox = r // (OH * OW), (r // OW) % OH, r % OW
    tap, c = k // C, k % C
    iy = oy[:, None] * STRIDE + (tap // KWID)[None, :] - PAD  # (BLOCK_N, BLOCK_W * 32)
    ix = ox[:, None] * STRIDE + (tap % KWID)[None, :] - PAD
    valid = (r[:, None] < NROWS) & (k[None, :] < K)
    inside = valid & (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W)
    if PACKED:
        cidx = c // 32  # (BLOCK_W * 32,) index along the channel stride: the word of channel c
    else:
        cidx = c
    offs = b[:, None].to(tl.int64) * stride_xb + cidx[None, :] * stride_xc + iy * stride_xh
    x = tl.load(x_ptr + offs + ix * stride_xw, mask=inside, other=0)
    if PACKED:
        on = ((x >> (c % 32)[None, :]) & 1) != 0  # bit c % 32 of the word
    else:
        on = x >= 0
    bit = valid & (on | ~inside)
    words = _bits_to_words(bit.to(tl.int32), BLOCK_W)
    out_mask = (r[:, None] < NROWS) & (rw[None, :] < KWORDS)
    tl.store(out_ptr + r[:, None].to(tl.int64) * KWORDS + rw[None, :], words, mask=out_mask)


@triton.jit
def _gemm_kernel(a_ptr, w_ptr, out_ptr, s_ptr, t_ptr, N, M, K, KWORDS, OUT_COLS,
                 EPILOGUE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_KW: tl.constexpr):
    """a (N, KWORDS), w (M, KWORDS) int32 -> acc = K - 2 * popcount(a ^ w), then
    EPILOGUE 0: acc int32 (N, M); 1: ±1 int8 (N, M); 2: packed bits int32 (N, OUT_COLS)."""
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    a_rows = a_ptr + rn[:, None].to(tl.int64) * KWORDS
    w_rows = w_ptr + rm[:, None].to(tl.int64) * KWORDS
    diff = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.int32)
    for k0 in range(0, KWORDS, BLOCK_KW):
        rk = k0 + tl.arange(0, BLOCK_KW)
        a = tl.load(a_rows + rk[None, :], mask=(rn[:, None] < N) & (rk[None, :] < KWORDS),
                    other=0)  # (BLOCK_N, BLOCK_KW)
        w = tl.load(w_rows + rk[None, :], mask=(rm[:, None] < M) & (rk[None, :] < KWORDS),
                    other=0)  # (BLOCK_M, BLOCK_KW)
        diff += tl.sum(_popc(a[:, None, :] ^ w[None, :, :]), axis=2)  # (BLOCK_N, BLOCK_M)
    acc = K - 2 * diff
    out_rows = out_ptr + rn[:, None].to(tl.int64) * OUT_COLS
    mask = (rn[:, None] < N) & (rm[None, :] < M)
    if EPILOGUE == 0:
        tl.store(out_rows + rm[None, :], acc, mask=mask)
    else:
        s = tl.load(s_ptr + rm, mask=rm < M, other=0)
        t = tl.load(t_ptr + rm, mask=rm < M, other=0)
        hit = s[None, :] * acc >= t[None, :]
        if EPILOGUE == 1:
            tl.store(out_rows + rm[None, :], tl.where(hit, 1, -1).to(tl.int8), mask=mask)
        else:  # BLOCK_M is a multiple of 32: the tile owns whole output words
            words = _bits_to_words((hit & mask).to(tl.int32), BLOCK_M // 32)
            rw = tl.program_id(1) * (BLOCK_M // 32) + tl.arange(0, BLOCK_M // 32)
            wmask = (rn[:, None] < N) & (rw[None, :] < OUT_COLS)
            tl.store(out_rows + rw[None, :], words, mask=wmask)


# ---------------------------------------------------------------------------- tuning

_PACK_CONFIGS = [
    triton.Config({"BLOCK_N": bn, "BLOCK_W": bw}, num_warps=nw)
    for bn, bw, nw in [(32, 4, 4), (64, 2, 4), (16, 8, 4), (128, 1, 4), (64, 4, 8)]
]
_GEMM_CONFIGS = [
    triton.Config({"BLOCK_N": bn, "BLOCK_M": bm, "BLOCK_KW": bk}, num_warps=nw, num_stages=ns)
    for bn, bm, bk, nw, ns in [
        (64, 64, 4, 4, 2), (64, 64, 8, 8, 2), (128, 64, 2, 8, 2), (64, 128, 2, 8, 2),
        (128, 128, 2, 8, 2), (32, 64, 8, 4, 3), (64, 32, 8, 4, 3), (32, 32, 8, 2, 3),
        (128, 32, 4, 4, 2),
    ]
]
# Interpreter: one small config per kernel (BLOCK_M a multiple of 32 for packed output).
_PACK_FIXED = {"BLOCK_N": 4, "BLOCK_W": 2}
_GEMM_FIXED = {"BLOCK_N": 8, "BLOCK_M": 32, "BLOCK_KW": 2}

_pack_tuned = triton.autotune(_PACK_CONFIGS, key=["N", "KWORDS"])(_pack_kernel)
_im2col_tuned = triton.autotune(_PACK_CONFIGS, key=["NROWS", "KWORDS", "PACKED"])(
    _im2col_pack_kernel)
_gemm_tuned = triton.autotune(_GEMM_CONFIGS, key=["N", "M", "KWORDS", "EPILOGUE"])(_gemm_kernel)


def _launch(kernel, tuned, fixed: dict, grid, *args, **kwargs) -> None:
    """Autotuned launch on a GPU; the raw kernel with a fixed config under the interpreter.
    `grid` maps the meta-parameters to the launch grid."""
    if INTERPRET:
        kernel[grid(fixed)](*args, **kwargs, **fixed)
    else:
        tuned[grid](*args, **kwargs)


def _check(*tensors: torch.Tensor) -> torch.device:
    if not INTERPRET and not torch.cuda.is_available():
        raise RuntimeError("Triton kernels need a CUDA GPU, or TRITON_INTERPRET=1 set in the "
                           "environment before importing bnnprune.engines.kernels.triton_kernels")
    if not INTERPRET and not all(t.is_cuda for t in tensors):
        raise ValueError("Triton kernels need CUDA tensors (or TRITON_INTERPRET=1)")
    return tensors[0].device


def n_words32(k: int) -> int:
    return (k + 31) // 32


def _out_size(size: int, k: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - k) // stride + 1


# ---------------------------------------------------------------------------- public API


def pack_rows(x: torch.Tensor) -> torch.Tensor:
    """(N, K) any real dtype (bit = x >= 0) -> (N, ceil(K / 32)) int32 packed words."""
    dev = _check(x)
    n, k = x.shape
    kwords = n_words32(k)
    out = torch.empty((n, kwords), dtype=torch.int32, device=dev)
    def grid(meta):
        return triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(kwords, meta["BLOCK_W"])

    _launch(_pack_kernel, _pack_tuned, _PACK_FIXED, grid, x, out, n, k, kwords, x.stride(0),
            x.stride(1))
    return out


def pack_conv_weight(w: torch.Tensor) -> torch.Tensor:
    """(Cout, Cin, kh, kw) -> (Cout, K_words) int32 rows in channels-last K order."""
    return pack_rows(w.permute(0, 2, 3, 1).reshape(w.shape[0], -1))  # (Cout, kh * kw * Cin)


def im2col_pack(x: torch.Tensor, kh: int, kw: int, stride: int = 1,
                padding: int = 0) -> torch.Tensor:
    """x (B, Cin, H, W) any strides/real dtype -> (B * OH * OW, ceil(kh*kw*Cin / 32)) int32,
    sign(x) padded with +1."""
    b, c, h, w = x.shape
    return _im2col(x, x.stride(), b, c, h, w, kh, kw, stride, padding, packed=False)


def im2col_pack_bits(bits: torch.Tensor, channels: int, kh: int, kw: int, stride: int = 1,
                     padding: int = 0) -> torch.Tensor:
    """Like `im2col_pack`, on activations already packed channels-last: bits (B, H, W,
    ceil(channels / 32)) int32 (bit c % 32 of word c // 32 is channel c; the packed output of
    `binary_conv2d_sign(..., packed=True)`) -> (B * OH * OW, ceil(kh*kw*channels / 32)) int32,
    padded with +1."""
    b, h, w, cwords = bits.shape
    if cwords != n_words32(channels):
        raise ValueError(f"{cwords} channel words cannot hold {channels} channels")
    sb, sh, sw, sc = bits.stride()  # element (b, c // 32, y, x) of the kernel's NCHW view
    return _im2col(bits, (sb, sc, sh, sw), b, channels, h, w, kh, kw, stride, padding,
                   packed=True)


def _im2col(src: torch.Tensor, strides: tuple[int, ...], b: int, c: int, h: int, w: int,
            kh: int, kw: int, stride: int, padding: int, packed: bool) -> torch.Tensor:
    """Launch the im2col kernel on `src` seen as NCHW with `strides` (channel words when
    `packed`) -> (B * OH * OW, ceil(kh*kw*C / 32)) int32."""
    dev = _check(src)
    oh, ow = _out_size(h, kh, stride, padding), _out_size(w, kw, stride, padding)
    nrows, k = b * oh * ow, kh * kw * c
    kwords = n_words32(k)
    out = torch.empty((nrows, kwords), dtype=torch.int32, device=dev)

    def grid(meta):
        return triton.cdiv(nrows, meta["BLOCK_N"]), triton.cdiv(kwords, meta["BLOCK_W"])

    _launch(_im2col_pack_kernel, _im2col_tuned, _PACK_FIXED, grid, src, out, c, h, w, oh, ow,
            nrows, k, kwords, kw, *strides, stride, padding, PACKED=packed)
    return out


def _gemm(a: torch.Tensor, w: torch.Tensor, k: int, epilogue: int, s=None, t=None):
    dev = _check(a, w)
    n, m = a.shape[0], w.shape[0]
    kwords = n_words32(k)
    if a.shape[1] != kwords or w.shape[1] != kwords:
        raise ValueError(f"word counts differ: a {tuple(a.shape)}, w {tuple(w.shape)}, K={k}")
    a, w = a.contiguous(), w.contiguous()
    if epilogue == EPILOGUE_ACC:
        s = t = torch.zeros(1, dtype=torch.int32, device=dev)  # unused
        out = torch.empty((n, m), dtype=torch.int32, device=dev)
    else:
        s = s.to(device=dev, dtype=torch.int32).contiguous()
        t = t.to(device=dev, dtype=torch.int32).contiguous()
        if epilogue == EPILOGUE_INT8:
            out = torch.empty((n, m), dtype=torch.int8, device=dev)
        else:
            out = torch.empty((n, n_words32(m)), dtype=torch.int32, device=dev)
    def grid(meta):
        return triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(m, meta["BLOCK_M"])

    _launch(_gemm_kernel, _gemm_tuned, _GEMM_FIXED, grid, a, w, out, s, t, n, m, k, kwords,
            out.shape[1], EPILOGUE=epilogue)
    return out


def binary_gemm(a_packed: torch.Tensor, w_packed: torch.Tensor, k: int) -> torch.Tensor:
    """a (N, K_words), w (M, K_words) int32 packed, true length K -> (N, M) int32 dots."""
    return _gemm(a_packed, w_packed, k, EPILOGUE_ACC)


def binary_gemm_sign(a_packed: torch.Tensor, w_packed: torch.Tensor, k: int, s: torch.Tensor,
                     t: torch.Tensor, packed: bool = False) -> torch.Tensor:
    """GEMM with folded BN + sign: (N, M) int8 ±1, or (N, ceil(M / 32)) int32 bits if packed."""
    return _gemm(a_packed, w_packed, k, EPILOGUE_BITS if packed else EPILOGUE_INT8, s, t)


def binary_conv2d(x: torch.Tensor, w: torch.Tensor, stride: int = 1,
                  padding: int = 0) -> torch.Tensor:
    """x (B, Cin, H, W), w (Cout, Cin, kh, kw) -> (B, Cout, OH, OW) int32 with channels-last
    strides (a view of the (B, OH, OW, Cout) GEMM output); sign(x) padded with +1."""
    b, _, h, wd = x.shape
    cout, cin, kh, kw = w.shape
    cols = im2col_pack(x, kh, kw, stride, padding)  # (B * OH * OW, K_words)
    out = binary_gemm(cols, pack_conv_weight(w), kh * kw * cin)  # (B * OH * OW, Cout)
    oh, ow = _out_size(h, kh, stride, padding), _out_size(wd, kw, stride, padding)
    return out.view(b, oh, ow, cout).permute(0, 3, 1, 2)


def binary_conv2d_sign(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor, t: torch.Tensor,
                       stride: int = 1, padding: int = 0, packed: bool = False) -> torch.Tensor:
    """Binary conv + folded BN + sign. -> (B, Cout, OH, OW) int8 ±1 (channels-last strides),
    or packed channels-last bits (B, OH, OW, ceil(Cout / 32)) int32 if packed."""
    b, _, h, wd = x.shape
    cout, cin, kh, kw = w.shape
    cols = im2col_pack(x, kh, kw, stride, padding)  # (B * OH * OW, K_words)
    out = binary_gemm_sign(cols, pack_conv_weight(w), kh * kw * cin, s, t, packed)
    oh, ow = _out_size(h, kh, stride, padding), _out_size(wd, kw, stride, padding)
    out = out.view(b, oh, ow, -1)  # (B, OH, OW, Cout or Cout_words)
    return out if packed else out.permute(0, 3, 1, 2)


# ---------------------------------------------------------------------------- residual blocks


@triton.jit
def _epilogue_kernel(src_ptr, scale_ptr, a1_ptr, b1_ptr, res_ptr, a2_ptr, b2_ptr, slope_ptr,
                     out_ptr, nbias_ptr, bits_ptr, N, M, MWORDS,
                     HAS_RES: tl.constexpr, RES_AFFINE: tl.constexpr, PRELU: tl.constexpr,
                     WRITE_OUT: tl.constexpr, WRITE_BITS: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr):
    """The end of a residual BNN block on channels-last rows (the CPU `block_epilogue`):
    y = PReLU((src * scale) * a1 + b1 + [res * a2 + b2 | res]); out (N, M) float32 = y and
    bits (N, MWORDS) int32 = packed (y + nbias >= 0), 32 channels a word."""
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rw = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    c = tl.program_id(1) * BLOCK_W * 32 + tl.arange(0, BLOCK_W * 32)
    cm = c < M
    mask = (rn[:, None] < N) & cm[None, :]  # (BLOCK_N, BLOCK_W * 32)
    offs = rn[:, None].to(tl.int64) * M + c[None, :]
    y = tl.load(src_ptr + offs, mask=mask, other=0).to(tl.float32)
    y = y * tl.load(scale_ptr + c, mask=cm, other=0)[None, :]
    y = y * tl.load(a1_ptr + c, mask=cm, other=0)[None, :] + tl.load(b1_ptr + c, mask=cm,
                                                                     other=0)[None, :]
    if HAS_RES:
        r = tl.load(res_ptr + offs, mask=mask, other=0)
        if RES_AFFINE:
            r = r * tl.load(a2_ptr + c, mask=cm, other=0)[None, :] + tl.load(
                b2_ptr + c, mask=cm, other=0)[None, :]
        y = y + r
    if PRELU:
        y = tl.where(y > 0, y, y * tl.load(slope_ptr + c, mask=cm, other=0)[None, :])
    if WRITE_OUT:
        tl.store(out_ptr + offs, y, mask=mask)
    if WRITE_BITS:
        hit = (y + tl.load(nbias_ptr + c, mask=cm, other=0)[None, :]) >= 0
        words = _bits_to_words((hit & mask).to(tl.int32), BLOCK_W)
        wmask = (rn[:, None] < N) & (rw[None, :] < MWORDS)
        tl.store(bits_ptr + rn[:, None].to(tl.int64) * MWORDS + rw[None, :], words, mask=wmask)


_epilogue_tuned = triton.autotune(_PACK_CONFIGS, key=["N", "M", "HAS_RES", "WRITE_BITS"])(
    _epilogue_kernel)


def block_epilogue(src: torch.Tensor, scale: torch.Tensor, a1: torch.Tensor, b1: torch.Tensor,
                   res: torch.Tensor | None = None, a2: torch.Tensor | None = None,
                   b2: torch.Tensor | None = None, slope: torch.Tensor | None = None,
                   write_out: bool = True, nbias: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """src (N, M) int32 or float32 rows -> (out (N, M) float32 or None, bits (N, ceil(M / 32))
    int32 of sign(out + nbias) or None), as the CPU `block_epilogue` (module doc there);
    per-channel vectors (M,) float32 on the same device."""
    dev = _check(src)
    n, m = src.shape
    mwords = n_words32(m)
    src = src.contiguous()
    dummy = torch.zeros(1, dtype=torch.float32, device=dev)
    vec = lambda v: dummy if v is None else v.to(dev, torch.float32).contiguous()  # noqa: E731
    out = torch.empty((n, m), dtype=torch.float32, device=dev) if write_out else dummy
    bits = torch.empty((n, mwords), dtype=torch.int32, device=dev) if nbias is not None \
        else torch.zeros(1, dtype=torch.int32, device=dev)
    res_ = dummy if res is None else res.contiguous()

    def grid(meta):
        return triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(mwords, meta["BLOCK_W"])

    _launch(_epilogue_kernel, _epilogue_tuned, _PACK_FIXED, grid, src, vec(scale), vec(a1),
            vec(b1), res_, vec(a2), vec(b2), vec(slope), out, vec(nbias), bits, n, m, mwords,
            HAS_RES=res is not None, RES_AFFINE=a2 is not None, PRELU=slope is not None,
            WRITE_OUT=write_out, WRITE_BITS=nbias is not None)
    return (out if write_out else None), (bits if nbias is not None else None)
