"""CPU backend: numba-compiled, multi-threaded XNOR-popcount kernels on uint64 words.

Layouts (see `pack.py` for the bit convention):
  activations  (N, K_words) uint64, one packed row per output pixel / sample
  weights      (K_words, M) uint64, *words-major*: for each activation row the kernel keeps
               a vector of M counts and its inner loop runs over M, which LLVM vectorises
               (AVX-512 VPOPCNTDQ where available; the SWAR popcount below becomes popcnt).
  conv input   packed channels-last (B, H, W, C_words) uint64, bit c % 64 of word c // 64.

Threads: every kernel is a `prange` loop, so `numba.set_num_threads(n)` bounds it.
Functions accept numpy arrays or CPU torch tensors and return numpy arrays.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numba import njit, prange

from bnnprune.engines.kernels.pack import Array, as_numpy, conv_weight_matrix, n_words

ALL_ONES = np.uint64(0xFFFFFFFFFFFFFFFF)
ROWS = 4  # pixels per GEMM block: each weight word loaded once feeds 4 of them
LANES = 8  # uint64 lanes of an AVX-512 vector: weights are padded to whole vectors of M


@njit(inline="always")
def popcount64(x):
    x = x - ((x >> np.uint64(1)) & np.uint64(0x5555555555555555))
    x = (x & np.uint64(0x3333333333333333)) + ((x >> np.uint64(2)) & np.uint64(0x3333333333333333))
    x = (x + (x >> np.uint64(4))) & np.uint64(0x0F0F0F0F0F0F0F0F)
    return np.int32((x * np.uint64(0x0101010101010101)) >> np.uint64(56))


@njit(inline="always")
def tail_mask(nbits):
    """Word with the low `nbits` bits set, 1 <= nbits <= 64."""
    return ALL_ONES >> np.uint64(64 - nbits)


# ---------------------------------------------------------------------------- packing


@njit(parallel=True, cache=True)
def _pack_rows(x, out):
    n, k = x.shape  # out (N, K_words)
    kw_full = k // 64
    for r in prange(n):
        row = x[r]
        for w in range(kw_full):  # fixed trip count of 64: vectorises
            word = np.uint64(0)
            for j in range(64):
                word |= np.uint64(row[w * 64 + j] >= 0) << np.uint64(j)
            out[r, w] = word
        word = np.uint64(0)
        for k_ in range(kw_full * 64, k):
            word |= np.uint64(row[k_] >= 0) << np.uint64(k_ - kw_full * 64)
        if k % 64:
            out[r, kw_full] = word
    return out


@njit(parallel=True, cache=True)
def _pack_channels_nchw(x):
    b, c, h, w = x.shape
    cw = (c + 63) // 64
    out = np.empty((b, h, w, cw), np.uint64)  # packed channels-last
    for bh in prange(b * h):
        bi, hi = bh // h, bh % h
        acc = np.zeros((cw, w), np.uint64)  # (C_words, W): inner loop over W is contiguous
        for ci in range(c):
            word, shift = ci // 64, np.uint64(ci % 64)
            for wi in range(w):
                acc[word, wi] |= np.uint64(x[bi, ci, hi, wi] >= 0) << shift
        for wi in range(w):
            for word in range(cw):
                out[bi, hi, wi, word] = acc[word, wi]
    return out


@njit(inline="always")
def _padding_pixel(c, cw):
    """The +1 padding pixel's channel words: all ones, the last word's tail zero."""
    ones = np.full(cw, ALL_ONES)
    ones[cw - 1] = tail_mask(c - 64 * (cw - 1))
    return ones


@njit(parallel=True, cache=True)
def _im2col_packed(xc, c, kh, kw, stride, pad, out):
    """Packed channels-last (B, H, W, C_words) -> out (B * OH * OW, K_words), K = kh*kw*C."""
    b, h, w, cw = xc.shape
    oh = (h + 2 * pad - kh) // stride + 1
    ow = (w + 2 * pad - kw) // stride + 1
    ones = _padding_pixel(c, cw)
    for bo in prange(b * oh):
        cols, where = _task_cols(xc, c, kh, kw, stride, pad, bo // oh, bo % oh, 1, ow, ones,
                                 out.shape[1])
        for ox in range(ow):
            for q in range(out.shape[1]):
                out[bo * ow + ox, q] = cols[q, where[ox]]
    return out


@njit(inline="always")
def _task_cols(xc, c, kh, kw, stride, pad, bi, oy0, nb, ow, ones, kwords):
    """The im2col columns of output rows oy0..oy0+nb-1 of image bi (nb 1 if stride > 1): cols
    (K_words, positions) and where (nb * OW,): the column of each output pixel.

    Tap t = i * kw + j contributes the pixel's C channel bits at bit offset t * C, so no bit is
    wasted between taps. The task first copies the input rows it reads, once each, into one
    padded stream xp[word, :] (rows WS = WQ * stride apart, WQ = the padded width / stride; +1
    outside the image, as the pad value). Output pixel (t, ox) is position P = t * WQ + ox,
    and tap (i, j) reads xp[word, P * stride + i * WS + j] for every P at once: long,
    branch-free loops over contiguous positions, which vectorise. The WQ - OW positions past
    each row's end are computed and left out (`where`)."""
    _, h, w, cw = xc.shape
    wq = (w + 2 * pad + stride - 1) // stride
    ws = wq * stride
    npos = nb * wq
    xp = np.empty((cw, (nb + kh) * ws + kw), np.uint64)  # (word, stream)
    for word in range(cw):
        xp[word, :] = ones[word]
    for r in range((nb - 1) * stride + kh):
        iy = oy0 * stride + r - pad
        if 0 <= iy < h:
            for word in range(cw):
                row = xp[word, r * ws + pad:r * ws + pad + w]
                for x in range(w):
                    row[x] = xc[bi, iy, x, word]
    cols = np.zeros((kwords, npos), np.uint64)  # (K_words, positions)
    for i in range(kh):
        for j in range(kw):
            for word in range(cw):
                pos = (i * kw + j) * c + 64 * word
                q, sh = pos // 64, np.uint64(pos % 64)
                spill = pos % 64 + min(64, c - 64 * word) > 64  # straddles two words
                if stride == 1:
                    src = xp[word, i * ws + j:i * ws + j + npos]
                    dst = cols[q]
                    for p in range(npos):  # vectorised over positions
                        dst[p] |= src[p] << sh
                    if spill:
                        dst = cols[q + 1]
                        back = np.uint64(64) - sh
                        for p in range(npos):
                            dst[p] |= src[p] >> back
                else:
                    for p in range(npos):
                        v = xp[word, p * stride + i * ws + j]
                        cols[q, p] |= v << sh
                        if spill:
                            cols[q + 1, p] |= v >> (np.uint64(64) - sh)
    where = np.empty(nb * ow, np.int64)
    for t in range(nb):
        for ox in range(ow):
            where[t * ow + ox] = t * wq + ox
    return cols, where


# ---------------------------------------------------------------------------- GEMM


@njit(inline="always")
def _popc(x):
    """popcount64 left in uint64 (two counts are summed before one narrowing to int32)."""
    x = x - ((x >> np.uint64(1)) & np.uint64(0x5555555555555555))
    x = (x & np.uint64(0x3333333333333333)) + ((x >> np.uint64(2)) & np.uint64(0x3333333333333333))
    x = (x + (x >> np.uint64(4))) & np.uint64(0x0F0F0F0F0F0F0F0F)
    return (x * np.uint64(0x0101010101010101)) >> np.uint64(56)


@njit(inline="always")
def _mismatch_counts(a, where, n, w, r0, acc):
    """acc (ROWS, M) = popcount(a[:, where[r0 + rr]] ^ w[:, j]) summed over words, for the
    pixels r0..r0+3 (those below n) whose columns of a (K_words, positions) `where` gives.

    Two words of K per pass over M: each load and store of the (ROWS, M) counts then carries
    two XOR-popcounts (measured 1 thread: 0.77 -> 0.96 TMAC/s at K_words 18, M 128)."""
    kwords = a.shape[0]
    m = w.shape[1]
    if r0 + ROWS > n:
        acc[:] = 0
        for rr in range(n - r0):
            for q in range(kwords):
                aq = a[q, where[r0 + rr]]
                for j in range(m):
                    acc[rr, j] += np.int64(_popc(aq ^ w[q, j]))
        return
    c0, c1, c2, c3 = where[r0], where[r0 + 1], where[r0 + 2], where[r0 + 3]
    q = 0
    if kwords >= 2:  # the first two words set the counts (no zeroing pass)
        a0, a1, a2, a3 = a[0, c0], a[0, c1], a[0, c2], a[0, c3]
        b0, b1, b2, b3 = a[1, c0], a[1, c1], a[1, c2], a[1, c3]
        for j in range(m):  # vectorised over M
            wq, wr = w[0, j], w[1, j]
            acc[0, j] = np.int64(_popc(a0 ^ wq) + _popc(b0 ^ wr))
            acc[1, j] = np.int64(_popc(a1 ^ wq) + _popc(b1 ^ wr))
            acc[2, j] = np.int64(_popc(a2 ^ wq) + _popc(b2 ^ wr))
            acc[3, j] = np.int64(_popc(a3 ^ wq) + _popc(b3 ^ wr))
        q = 2
    else:
        acc[:] = 0
    while q + 1 < kwords:
        a0, a1, a2, a3 = a[q, c0], a[q, c1], a[q, c2], a[q, c3]
        b0, b1, b2, b3 = a[q + 1, c0], a[q + 1, c1], a[q + 1, c2], a[q + 1, c3]
        for j in range(m):
            wq, wr = w[q, j], w[q + 1, j]
            acc[0, j] += np.int64(_popc(a0 ^ wq) + _popc(b0 ^ wr))
            acc[1, j] += np.int64(_popc(a1 ^ wq) + _popc(b1 ^ wr))
            acc[2, j] += np.int64(_popc(a2 ^ wq) + _popc(b2 ^ wr))
            acc[3, j] += np.int64(_popc(a3 ^ wq) + _popc(b3 ^ wr))
        q += 2
    if q < kwords:
        a0, a1, a2, a3 = a[q, c0], a[q, c1], a[q, c2], a[q, c3]
        for j in range(m):
            wq = w[q, j]
            acc[0, j] += np.int64(_popc(a0 ^ wq))
            acc[1, j] += np.int64(_popc(a1 ^ wq))
            acc[2, j] += np.int64(_popc(a2 ^ wq))
            acc[3, j] += np.int64(_popc(a3 ^ wq))


@njit(inline="always")
def _store_dots(acc, nrows, k, out, o0):
    """out[o0 + rr, :M] = K - 2 * mismatches for the block's first `nrows` rows."""
    for rr in range(nrows):
        for j in range(out.shape[1]):
            out[o0 + rr, j] = k - 2 * acc[rr, j]


@njit(inline="always")
def _store_sign_bits(acc, nrows, limit, flip, out, o0):
    """out[o0 + rr] = packed bits (mismatches[j] <= limit[j]) ^ flip bit j.

    A whole block's ROWS rows are packed in one loop over the channels of each word (ROWS
    OR-reductions share each limit load and the loop's set-up: measured 1 thread, 14x14,
    batch 64, M 48: 0.135 -> 0.096 ms)."""
    m = limit.shape[0]
    if nrows < ROWS:
        for rr in range(nrows):
            for q in range(out.shape[1]):
                base = 64 * q
                word = np.uint64(0)  # in a register, from a loop starting at 0: vectorises
                for j in range(min(64, m - base)):
                    word |= np.uint64(acc[rr, base + j] <= limit[base + j]) << np.uint64(j)
                out[o0 + rr, q] = word ^ flip[q]
        return
    for q in range(out.shape[1]):
        base = 64 * q
        w0 = w1 = w2 = w3 = np.uint64(0)
        for j in range(min(64, m - base)):
            lim, sh = limit[base + j], np.uint64(j)
            w0 |= np.uint64(acc[0, base + j] <= lim) << sh
            w1 |= np.uint64(acc[1, base + j] <= lim) << sh
            w2 |= np.uint64(acc[2, base + j] <= lim) << sh
            w3 |= np.uint64(acc[3, base + j] <= lim) << sh
        f = flip[q]
        out[o0, q], out[o0 + 1, q], out[o0 + 2, q], out[o0 + 3, q] = w0 ^ f, w1 ^ f, w2 ^ f, w3 ^ f


@njit(parallel=True, cache=True)
def _gemm(a, w, k, out):
    """out (N, M) int32; w (K_words, >= M): columns past M (padding) are computed, not kept."""
    n = a.shape[0]
    rows = np.arange(n)  # `where`: pixel r is column r of a.T
    for blk in prange((n + ROWS - 1) // ROWS):
        r0 = blk * ROWS
        acc = np.empty((ROWS, w.shape[1]), np.int64)
        _mismatch_counts(a.T, rows, n, w, r0, acc)  # a.T: (K_words, N), a view
        _store_dots(acc, min(ROWS, n - r0), k, out, r0)
    return out


@njit(parallel=True, cache=True)
def _gemm_sign(a, w, limit, flip, out):
    """GEMM + folded BatchNorm/sign on mismatch counts: bit j of an output row =
    (mismatches[j] <= limit[j]) ^ flip bit j (see `binary_gemm_sign`); out (N, M_words), w and
    limit padded to whole vectors."""
    n = a.shape[0]
    rows = np.arange(n)  # `where`: pixel r is column r of a.T
    for blk in prange((n + ROWS - 1) // ROWS):
        r0 = blk * ROWS
        acc = np.empty((ROWS, w.shape[1]), np.int64)
        _mismatch_counts(a.T, rows, n, w, r0, acc)  # a.T: (K_words, N), a view
        _store_sign_bits(acc, min(ROWS, n - r0), limit, flip, out, r0)
    return out


@njit(inline="always")
def _row_group(ow, oh, b, stride):
    """Output rows per task of the fused conv, all from one image: at least 64 pixels (long
    im2col loops) while the batch still makes 4 tasks; 1 row if stride > 1 (batch 64: OW 28
    -> 3 rows, 14 -> 5, 7 -> 7)."""
    g = 1
    while stride == 1 and g < oh and g * ow < 64 and b * ((oh + g) // (g + 1)) >= 4:
        g += 1
    return g


@njit(parallel=True, cache=True)
def _conv(xc, c, kh, kw, stride, pad, w, k, limit, flip, dots, bits):
    """im2col fused into the GEMM: each task packs the im2col columns of a few output rows
    (`_task_cols`, a buffer that stays in L1) and multiplies them right away, so the
    (N, K_words) im2col matrix never goes through memory. Epilogue: int32 dots into `dots`
    (N, M) if `bits` is empty, else the folded BN + sign as packed bits into `bits`
    (N, M_words)."""
    b, h, wd, cw = xc.shape
    oh = (h + 2 * pad - kh) // stride + 1
    ow = (wd + 2 * pad - kw) // stride + 1
    g = _row_group(ow, oh, b, stride)
    per_image = (oh + g - 1) // g
    ones = _padding_pixel(c, cw)
    sign = bits.shape[0] > 0
    for task in prange(b * per_image):
        bi, oy0 = task // per_image, task % per_image * g
        nb = min(g, oh - oy0)
        cols, where = _task_cols(xc, c, kh, kw, stride, pad, bi, oy0, nb, ow, ones, w.shape[0])
        acc = np.empty((ROWS, w.shape[1]), np.int64)
        n = nb * ow
        o0 = (bi * oh + oy0) * ow
        for r0 in range(0, n, ROWS):
            _mismatch_counts(cols, where, n, w, r0, acc)
            if sign:
                _store_sign_bits(acc, min(ROWS, n - r0), limit, flip, bits, o0 + r0)
            else:
                _store_dots(acc, min(ROWS, n - r0), k, dots, o0 + r0)
    return dots, bits


@njit(parallel=True, cache=True)
def _maxpool_bits(bits, k, stride, pad, inc, dec, out):
    """out (B, PH, PW, C_words) = (OR of the window & inc) | (AND of the window & dec) over
    packed channels-last bits (B, H, W, C_words); positions outside the image are left out."""
    b, h, w, cw = bits.shape
    _, ph, pw, _ = out.shape
    for bp in prange(b * ph):
        bi, py = bp // ph, bp % ph
        for px in range(pw):
            for q in range(cw):
                any_ = np.uint64(0)
                all_ = ALL_ONES
                for i in range(k):
                    iy = py * stride + i - pad
                    if 0 <= iy < h:
                        for j in range(k):
                            ix = px * stride + j - pad
                            if 0 <= ix < w:
                                v = bits[bi, iy, ix, q]
                                any_ |= v
                                all_ &= v
                out[bi, py, px, q] = (any_ & inc[q]) | (all_ & dec[q])
    return out


# ---------------------------------------------------------------------------- public API


class PackedConvWeight(NamedTuple):
    words: np.ndarray  # (K_words, Cout) uint64, words-major, K in channels-last order
    in_channels: int
    kh: int
    kw: int


def _buffer(out: np.ndarray | None, shape: tuple[int, ...], dtype) -> np.ndarray:
    """`out` checked against shape/dtype, or a new array. Reusing buffers across calls saves
    the page faults of fresh multi-MB allocations (~1 ms per conv layer here)."""
    if out is None:
        return np.empty(shape, dtype)
    if out.shape != shape or out.dtype != dtype or not out.flags.c_contiguous:
        raise ValueError(f"out must be C-contiguous {np.dtype(dtype)} {shape}, got "
                         f"{out.dtype} {out.shape}")
    return out


def pack_rows(x: Array, out: np.ndarray | None = None) -> np.ndarray:
    """(N, K) float/int ±1 (sign rule x >= 0) -> (N, K_words) uint64, compiled and parallel."""
    x = np.ascontiguousarray(as_numpy(x))
    return _pack_rows(x, _buffer(out, (x.shape[0], n_words(x.shape[1])), np.uint64))


def pack_weight(w: Array) -> np.ndarray:
    """(M, K) ±1 weight -> (K_words, M) uint64 words-major layout for `binary_gemm`."""
    return np.ascontiguousarray(pack_rows(w).T)


def pack_conv_weight(w: Array) -> PackedConvWeight:
    """(Cout, Cin, kh, kw) ±1 weight -> words-major packed weight for `binary_conv2d`."""
    _, cin, kh, kw = as_numpy(w).shape
    return PackedConvWeight(pack_weight(conv_weight_matrix(w)), cin, kh, kw)


def pack_channels(x: Array) -> np.ndarray:
    """(B, C, H, W) activations (any strides; sign rule x >= 0) -> packed channels-last
    (B, H, W, C_words) uint64."""
    x = as_numpy(x)
    b, c, h, w = x.shape
    nhwc = x.transpose(0, 2, 3, 1)  # (B, H, W, C)
    if nhwc.flags.c_contiguous:  # channels-last memory: rows of C are contiguous
        return pack_rows(nhwc.reshape(b * h * w, c)).reshape(b, h, w, -1)
    return _pack_channels_nchw(np.ascontiguousarray(x))


def im2col_packed(xc: np.ndarray, in_channels: int, kh: int, kw: int, stride: int = 1,
                  padding: int = 0, out: np.ndarray | None = None) -> np.ndarray:
    """Packed channels-last (B, H, W, C_words) -> (B * OH * OW, K_words) rows, K = kh*kw*C,
    padding with +1."""
    b, h, w, _ = xc.shape
    rows = b * ((h + 2 * padding - kh) // stride + 1) * ((w + 2 * padding - kw) // stride + 1)
    out = _buffer(out, (rows, n_words(kh * kw * in_channels)), np.uint64)
    return _im2col_packed(xc, in_channels, kh, kw, stride, padding, out)


def pad_columns(words: np.ndarray) -> np.ndarray:
    """Words-major weight (K_words, M) -> (K_words, M rounded up to LANES), zero columns added.

    The GEMM's inner loop over M vectorises in whole vectors of LANES output channels; a ragged
    M (a pruned layer: 25, 49, 98 channels) would leave a scalar remainder loop that costs as
    much as the vectors (measured: M = 49 as slow as 64, M = 56 as fast as 48 + 8)."""
    extra = -words.shape[1] % LANES
    if not extra:
        return np.ascontiguousarray(words)
    out = np.zeros((words.shape[0], words.shape[1] + extra), np.uint64)
    out[:, :words.shape[1]] = words
    return out


def _check_words(a_packed: np.ndarray, w_packed: np.ndarray, k: int) -> None:
    if a_packed.shape[1] != w_packed.shape[0] or a_packed.shape[1] != n_words(k):
        raise ValueError(f"word counts differ: a {a_packed.shape}, w {w_packed.shape}, K={k}")


def binary_gemm(a_packed: np.ndarray, w_packed: np.ndarray, k: int,
                out: np.ndarray | None = None) -> np.ndarray:
    """a (N, K_words), w words-major (K_words, M), true length K -> (N, M) int32 dot products."""
    _check_words(a_packed, w_packed, k)
    out = _buffer(out, (a_packed.shape[0], w_packed.shape[1]), np.int32)
    return _gemm(np.ascontiguousarray(a_packed), pad_columns(w_packed), k, out)


def binary_gemm_sign(a_packed: np.ndarray, w_packed: np.ndarray, k: int, s: Array, t: Array,
                     out: np.ndarray | None = None) -> np.ndarray:
    """`binary_gemm` with the next BatchNorm + sign folded in (see `reference.fold_bn_sign`):
    -> (N, M_words) uint64 packed bits, bit j = (s[j] * acc[j] >= t[j]) (1 means +1)."""
    _check_words(a_packed, w_packed, k)
    return binary_gemm_limits(a_packed, w_packed, *mismatch_limits(s, t, k), out)


def binary_gemm_limits(a_packed: np.ndarray, w_packed: np.ndarray, limit: np.ndarray,
                       flip: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """`binary_gemm_sign` with the thresholds already in `mismatch_limits` form (compute them
    once per layer: they cost more than a small layer's GEMM) -> (N, M_words) uint64 bits."""
    m = w_packed.shape[1]
    if (a_packed.shape[1] != w_packed.shape[0] or len(limit) != m + (-m % LANES)
            or len(flip) != n_words(m)):
        raise ValueError(f"shapes differ: a {a_packed.shape}, w {w_packed.shape}, limit "
                         f"{len(limit)}, flip {len(flip)}")
    out = _buffer(out, (a_packed.shape[0], n_words(m)), np.uint64)
    return _gemm_sign(np.ascontiguousarray(a_packed), pad_columns(w_packed), limit, flip, out)


def mismatch_limits(s: Array, t: Array, k: int) -> tuple[np.ndarray, np.ndarray]:
    """`s * acc >= t` with acc = K - 2 * mismatches, rewritten as one compare on the mismatch
    count: `(mismatches <= limit) ^ flip` -> (limit int32, flip (M_words,) uint64). `limit`
    is padded to whole vectors of LANES channels with -1, like the weight columns, so the
    packing loop runs over whole vectors and the padding bits come out 0.

    s = +1:  mismatches <= floor((K - t) / 2)
    s = -1:  mismatches >= ceil((K + t) / 2)  = not (mismatches <= ceil((K + t) / 2) - 1)
    s =  0:  constant 0 >= t: limit K (always) or -1 (never)"""
    s64, t64 = as_numpy(s).astype(np.int64), as_numpy(t).astype(np.int64)
    m = len(s64)
    if not np.isin(s64, (-1, 0, 1)).all():
        raise ValueError(f"s must hold -1, 0 or +1 per channel, got {np.unique(s64).tolist()}")
    limit = np.where(s64 > 0, (k - t64) // 2, -((-(k + t64)) // 2) - 1)
    limit = np.where(s64 == 0, np.where(t64 <= 0, k, -1), limit)
    bits = np.zeros(n_words(m) * 64, bool)
    bits[:m] = s64 < 0
    flip = np.packbits(bits, bitorder="little").view("<u8").astype(np.uint64)
    padded = np.full(m + (-m % LANES), -1, np.int32)  # padding channels: never set, bit 0
    padded[:m] = np.clip(limit, -1, k)
    return padded, flip


def conv_packed(xc: np.ndarray, w: PackedConvWeight, stride: int = 1, padding: int = 0,
                limits: tuple[np.ndarray, np.ndarray] | None = None,
                out: np.ndarray | None = None) -> np.ndarray:
    """Binary conv on packed channels-last input (B, H, W, Cin_words) with im2col fused into
    the GEMM (`_conv`) -> (B * OH * OW, Cout) int32 dots, or with `limits` (the layer's
    `mismatch_limits`: folded BN + sign) (B * OH * OW, Cout_words) packed bits."""
    b, h, wd, cw = xc.shape
    if cw != n_words(w.in_channels):
        raise ValueError(f"input has {cw} channel words, weight Cin={w.in_channels}")
    k = w.kh * w.kw * w.in_channels
    if w.words.shape[0] != n_words(k):
        raise ValueError(f"weight has {w.words.shape[0]} words, K={k} needs {n_words(k)}")
    m = w.words.shape[1]
    n = b * ((h + 2 * padding - w.kh) // stride + 1) * ((wd + 2 * padding - w.kw) // stride + 1)
    words = pad_columns(w.words)
    xc = np.ascontiguousarray(xc)
    if limits is None:
        dots = _buffer(out, (n, m), np.int32)
        _conv(xc, w.in_channels, w.kh, w.kw, stride, padding, words, k, np.zeros(0, np.int32),
              np.zeros(0, np.uint64), dots, np.zeros((0, 1), np.uint64))
        return dots
    limit, flip = limits
    if len(limit) != words.shape[1] or len(flip) != n_words(m):
        raise ValueError(f"limits for {len(limit)} channels, flip {len(flip)} words; the weight "
                         f"has {m} channels")
    bits = _buffer(out, (n, n_words(m)), np.uint64)
    _conv(xc, w.in_channels, w.kh, w.kw, stride, padding, words, k, limit, flip,
          np.zeros((0, m), np.int32), bits)
    return bits


def _conv_input(x: Array, w: Array | PackedConvWeight, stride: int, padding: int
                ) -> tuple[np.ndarray, PackedConvWeight, tuple[int, int, int]]:
    """Packed channels-last input, the packed weight and (B, OH, OW)."""
    pw = w if isinstance(w, PackedConvWeight) else pack_conv_weight(w)
    xn = as_numpy(x)
    xc = xn if xn.dtype == np.uint64 else pack_channels(xn)  # (B, H, W, Cin_words)
    b, h, wd, _ = xc.shape
    oh = (h + 2 * padding - pw.kh) // stride + 1
    ow = (wd + 2 * padding - pw.kw) // stride + 1
    return xc, pw, (b, oh, ow)


def binary_conv2d(x: Array, w: Array | PackedConvWeight, stride: int = 1,
                  padding: int = 0) -> np.ndarray:
    """Binary conv, sign(x) padded with +1 -> (B, Cout, OH, OW) int32.

    x: (B, Cin, H, W) float/int8 (sign rule x >= 0; NCHW or channels-last strides), or
       already packed channels-last (B, H, W, Cin_words) uint64.
    w: (Cout, Cin, kh, kw) ±1 or a `PackedConvWeight` (pack once, reuse).
    The result has NCHW shape with channels-last strides (a view of the (B, OH, OW, Cout)
    GEMM output, like torch.channels_last); np.ascontiguousarray makes it NCHW-contiguous."""
    xc, pw, (b, oh, ow) = _conv_input(x, w, stride, padding)
    out = conv_packed(xc, pw, stride, padding)  # (B*OH*OW, Cout)
    return out.reshape(b, oh, ow, -1).transpose(0, 3, 1, 2)  # (B, Cout, OH, OW)


def binary_conv2d_sign(x: Array, w: Array | PackedConvWeight, s: Array, t: Array,
                       stride: int = 1, padding: int = 0) -> np.ndarray:
    """Binary conv + folded BatchNorm + sign (`reference.fold_bn_sign`) -> packed channels-last
    (B, OH, OW, Cout_words) uint64, bit = (s * acc >= t); the next `binary_conv2d` input."""
    xc, pw, (b, oh, ow) = _conv_input(x, w, stride, padding)
    limits = mismatch_limits(s, t, pw.kh * pw.kw * pw.in_channels)
    return conv_packed(xc, pw, stride, padding, limits).reshape(b, oh, ow, -1)


# ---------------------------------------------------------------------------- float ends
# The float first layer and the float tail (BN -> head -> classifier) of a BNN, so the packed
# engine runs without a torch op (and without handing the cores between two thread pools).


STEM_ROWS = 16  # output rows per task of the float stem (OW 28: 448 pixels)
STEM_GROUP = 4  # output channels summed per pass over the pixels (a0..a3 in the stem)


@njit(parallel=True, cache=True)
def _float_conv_sign(x, wt, alpha, beta, stride, pad, kh, kw, out):
    """sign(alpha * conv(x, w) + beta) with zero padding -> packed channels-last bits.

    x (B, Cin, H, W) float32; wt (Cin * kh * kw, >= Cout) float32, tap-major; out
    (B, OH, OW, Cout_words) uint64, bit = (alpha * acc + beta >= 0).

    A task takes STEM_ROWS output rows of one image: it copies their float im2col into a
    (taps, pixels) buffer (zeros outside the image); then, for STEM_GROUP output channels at
    a time, loops over contiguous pixels (they vectorise) sum the taps in order, three per
    pass, each input load feeding the STEM_GROUP sums (wt's columns are padded to whole groups
    with zeros; the padding channels' sums are dropped). Each channel's bit is set in 32-bit
    half words (16 pixels per vector), joined into words at the end."""
    b, cin, h, w = x.shape
    _, oh, ow, cw = out.shape
    cout = alpha.shape[0]
    taps = cin * kh * kw
    per_image = (oh + STEM_ROWS - 1) // STEM_ROWS
    for task in prange(b * per_image):
        bi, oy0 = task // per_image, task % per_image * STEM_ROWS
        nr = min(STEM_ROWS, oh - oy0)
        n = nr * ow
        cols = np.zeros((taps, n), np.float32)  # (taps, pixels)
        for c in range(cin):
            for i in range(kh):
                for r in range(nr):
                    iy = (oy0 + r) * stride + i - pad
                    if 0 <= iy < h:
                        for j in range(kw):
                            t = (c * kh + i) * kw + j
                            for ox in range(ow):
                                ix = ox * stride + j - pad
                                if 0 <= ix < w:
                                    cols[t, r * ow + ox] = x[bi, c, iy, ix]
        acc = np.empty((STEM_GROUP, n), np.float32)  # (channels of a group, pixels)
        a0, a1, a2, a3 = acc[0], acc[1], acc[2], acc[3]
        halves = np.zeros((2 * cw, n), np.uint32)  # (Cout half words, pixels)
        for co in range(0, cout, STEM_GROUP):
            acc[:] = 0
            for t in range(0, taps - taps % 3, 3):
                x0, x1, x2 = cols[t], cols[t + 1], cols[t + 2]
                u0, u1, u2, u3 = wt[t, co:co + STEM_GROUP]  # scalars: kept in registers
                v0, v1, v2, v3 = wt[t + 1, co:co + STEM_GROUP]
                z0, z1, z2, z3 = wt[t + 2, co:co + STEM_GROUP]
                for p in range(n):  # vectorised over pixels; each sum in tap order
                    y0, y1, y2 = x0[p], x1[p], x2[p]
                    a0[p] = ((a0[p] + u0 * y0) + v0 * y1) + z0 * y2
                    a1[p] = ((a1[p] + u1 * y0) + v1 * y1) + z1 * y2
                    a2[p] = ((a2[p] + u2 * y0) + v2 * y1) + z2 * y2
                    a3[p] = ((a3[p] + u3 * y0) + v3 * y1) + z3 * y2
            for t in range(taps - taps % 3, taps):
                xt = cols[t]
                u0, u1, u2, u3 = wt[t, co:co + STEM_GROUP]
                for p in range(n):
                    y0 = xt[p]
                    a0[p] += u0 * y0
                    a1[p] += u1 * y0
                    a2[p] += u2 * y0
                    a3[p] += u3 * y0
            for c in range(co, min(co + STEM_GROUP, cout)):
                half, sh, a = halves[c // 32], np.uint32(c % 32), acc[c - co]
                al, be = alpha[c], beta[c]
                for p in range(n):
                    half[p] |= np.uint32(a[p] * al + be >= 0) << sh
        for q in range(cw):
            lo, hi = halves[2 * q], halves[2 * q + 1]
            for r in range(nr):
                dst = out[bi, oy0 + r, :, q]
                for ox in range(ow):
                    p = r * ow + ox
                    dst[ox] = np.uint64(lo[p]) | (np.uint64(hi[p]) << np.uint64(32))
    return out


@njit(inline="always")
def _linear_row(feat, wc, bias, out, bi):
    """out[bi, k] = feat . wc[k] + bias[k] for every class k (vectorised dot products when
    the caller allows fastmath)."""
    for k in range(wc.shape[0]):
        dot = np.float32(0)
        for f in range(feat.shape[0]):
            dot += feat[f] * wc[k, f]
        out[bi, k] = dot + bias[k]


@njit(parallel=True, cache=True, fastmath=True)
def _classify(acc, pool_k, pool_s, pool_p, alpha, beta, gap, wc, bias, out):
    """Integer layer outputs -> logits: max pool (pool_k > 1) -> BN (alpha * v + beta) ->
    flatten or global average -> linear. fastmath lets the dot products vectorise (the sums
    are reordered; the inputs are finite).

    acc (B, H, W, C) int32 channels-last; wc (classes, F) float32 with F = PH * PW * C in
    channels-last order (flatten) or C (gap); out (B, classes) float32."""
    b, h, w, c = acc.shape
    ph, pw = (h + 2 * pool_p - pool_k) // pool_s + 1, (w + 2 * pool_p - pool_k) // pool_s + 1
    for bi in prange(b):
        feat = np.zeros(ph * pw * c if not gap else c, np.float32)
        m = np.empty(c, np.int32)
        for py in range(ph):
            for px in range(pw):
                m[:] = -2147483647
                for i in range(pool_k):
                    iy = py * pool_s + i - pool_p
                    for j in range(pool_k):
                        ix = px * pool_s + j - pool_p
                        if 0 <= iy < h and 0 <= ix < w:
                            for ch in range(c):  # vectorised over channels
                                m[ch] = max(m[ch], acc[bi, iy, ix, ch])
                base = 0 if gap else (py * pw + px) * c
                for ch in range(c):
                    feat[base + ch] += np.float32(m[ch]) * alpha[ch] + beta[ch]
        if gap:
            feat /= np.float32(ph * pw)
        _linear_row(feat, wc, bias, out, bi)
    return out


def maxpool_bits(bits: np.ndarray, k: int, stride: int, pad: int, inc: np.ndarray,
                 dec: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Max pool of sign(BN(acc)) on packed channels-last bits (B, H, W, C_words) uint64: the OR
    over the window for channels whose BN increases in acc (`inc` mask words), the AND where
    it decreases (`dec`); padding never wins (as MaxPool2d's -inf) -> (B, PH, PW, C_words)."""
    b, h, w, cw = bits.shape
    shape = (b, (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1, cw)
    return _maxpool_bits(bits, k, stride, pad, inc, dec, _buffer(out, shape, np.uint64))


def float_conv_sign(x: Array, w: Array, alpha: Array, beta: Array, stride: int = 1,
                    padding: int = 0, out: np.ndarray | None = None) -> np.ndarray:
    """Float conv (zero padding) + per-channel affine + sign, packed: x (B, Cin, H, W),
    w (Cout, Cin, kh, kw) -> (B, OH, OW, Cout_words) uint64, bit = (alpha*conv + beta >= 0)."""
    xn = np.ascontiguousarray(as_numpy(x), np.float32)
    wn = as_numpy(w).astype(np.float32)
    cout, cin, kh, kw = wn.shape
    if xn.ndim != 4 or xn.shape[1] != cin:
        raise ValueError(f"input {xn.shape} does not fit weight {wn.shape}")
    b, _, h, wd = xn.shape
    shape = (b, (h + 2 * padding - kh) // stride + 1, (wd + 2 * padding - kw) // stride + 1,
             n_words(cout))
    groups = -(-cout // STEM_GROUP) * STEM_GROUP
    wt = np.zeros((cin * kh * kw, groups), np.float32)  # (taps, Cout padded to groups)
    wt[:, :cout] = wn.reshape(cout, -1).T
    a, bb = (np.ascontiguousarray(as_numpy(v), np.float32) for v in (alpha, beta))
    return _float_conv_sign(xn, wt, a, bb, stride, padding, kh, kw,
                            _buffer(out, shape, np.uint64))


def classify(acc: np.ndarray, pool_k: int, pool_s: int, pool_p: int, alpha: Array, beta: Array,
             gap: bool, weight: Array, bias: Array, out: np.ndarray | None = None
             ) -> np.ndarray:
    """Logits from a layer's integer outputs: max pool (`pool_k` 1 = none) -> BN as
    `alpha * v + beta` -> flatten (channels-last order) or global average -> linear layer
    `v @ weight.T + bias`. acc (B, H, W, C) int32; weight (classes, F), as `nn.Linear` keeps
    it -> (B, classes) float32."""
    a = np.ascontiguousarray(acc, np.int32)
    b, h, w, c = a.shape
    ph, pw = (h + 2 * pool_p - pool_k) // pool_s + 1, (w + 2 * pool_p - pool_k) // pool_s + 1
    features = c if gap else ph * pw * c
    wn = np.ascontiguousarray(as_numpy(weight), np.float32)
    if wn.ndim != 2 or wn.shape[1] != features:
        raise ValueError(f"classifier weight {wn.shape} does not take the layer's {features} "
                         f"features")
    vecs = [np.ascontiguousarray(as_numpy(v), np.float32) for v in (alpha, beta, bias)]
    out = _buffer(out, (b, wn.shape[0]), np.float32)
    return _classify(a, pool_k, pool_s, pool_p, vecs[0], vecs[1], gap, wn, vecs[2], out)


# ---------------------------------------------------------------------------- residual blocks
# The float stream between the blocks of a residual BNN (channels-last rows), and the packed
# signs the next binary conv reads, written in one pass from the block's integer conv outputs.


EPILOGUE_ROWS = 32  # pixels per task of `block_epilogue`


TILE = 256  # about this many values per tiled per-channel vector (whole rows)


@njit(inline="always")
def _tile(v, rows):
    """v (M,) repeated `rows` times -> (rows * M,) (explicit loop: no parallel region)."""
    m = v.shape[0]
    t = np.empty(rows * m, np.float32)
    for i in range(rows * m):
        t[i] = v[i % m]
    return t


@njit(parallel=True, cache=True)
def _block_epilogue(src, scale, a1, b1, res, a2, b2, slope, out, nbias, bits):
    """Per row r (pixel) and channel j, in float32 and in torch's order:
        y = (src * scale) * a1 + b1                   binary conv * its scale, BatchNorm
        y = y + (res * a2 + b2)  or  y + res          shortcut (its BatchNorm) added
        y = y if y > 0 else y * slope                 PReLU (none: slope 1, the same y)
    then out[r] = y and bits[r] = packed (y + nbias >= 0); an empty res / a2 / out / bits
    leaves that part out. src (N * M,) int32 or float32 and res, out (N * M,) float32:
    the (N, M) rows flattened; bits (N, M_words) uint64.

    A task's EPILOGUE_ROWS rows are one run of values; each step is one flat loop over TILE
    of them at a time (whole rows), against the per-channel vectors tiled to that length once
    per call (tiles that stay in L1). Indices are unsigned: numba then adds no negative-index
    fix-up, and the loops vectorise. Measured 2 threads, min, interleaved, bit-identical,
    against one loop per row and step: 28x28x32 at batch 64 0.44 -> 0.37 ms, 14x14x64 0.19 ->
    0.14 ms, 7x7x128 0.106 -> 0.086 ms; bits only 0.54 -> 0.29 ms (28x28x32)."""
    m = scale.shape[0]
    n = src.shape[0] // m
    has_res, res_affine, write_out = res.shape[0] > 0, a2.shape[0] > 0, out.shape[0] > 0
    write_bits = bits.shape[0] > 0
    tr = max(1, min(n, TILE // m))  # rows per tile
    tsc, ta1, tb1 = _tile(scale, tr), _tile(a1, tr), _tile(b1, tr)
    tsl = _tile(slope, tr)
    ta2 = _tile(a2, tr) if res_affine else np.empty(0, np.float32)
    tb2 = _tile(b2, tr) if res_affine else np.empty(0, np.float32)
    for task in prange((n + EPILOGUE_ROWS - 1) // EPILOGUE_ROWS):
        r0, r1 = task * EPILOGUE_ROWS, min(n, (task + 1) * EPILOGUE_ROWS)
        y = out if write_out else np.empty(EPILOGUE_ROWS * m, np.float32)
        o = 0 if write_out else r0 * m  # value e of the task is y[e - o]
        for c0 in range(r0, r1, tr):
            e0 = c0 * m
            cnt = (min(r1, c0 + tr) - c0) * m
            d0 = e0 - o
            if has_res and res_affine:
                for e in range(cnt):
                    v = (np.float32(src[np.uint64(e0 + e)]) * tsc[e] * ta1[e] + tb1[e]) + (
                        res[np.uint64(e0 + e)] * ta2[e] + tb2[e])
                    y[np.uint64(d0 + e)] = v if v > 0 else v * tsl[e]
            elif has_res:
                for e in range(cnt):
                    v = (np.float32(src[np.uint64(e0 + e)]) * tsc[e] * ta1[e] + tb1[e]
                         ) + res[np.uint64(e0 + e)]
                    y[np.uint64(d0 + e)] = v if v > 0 else v * tsl[e]
            else:
                for e in range(cnt):
                    v = np.float32(src[np.uint64(e0 + e)]) * tsc[e] * ta1[e] + tb1[e]
                    y[np.uint64(d0 + e)] = v if v > 0 else v * tsl[e]
        if write_bits:
            for r in range(r0, r1):
                b0 = r * m - o
                for q in range(bits.shape[1]):
                    base = 64 * q
                    word = np.uint64(0)
                    for j in range(min(64, m - base)):
                        word |= np.uint64(y[np.uint64(b0 + base + j)] + nbias[base + j] >= 0
                                          ) << np.uint64(j)
                    bits[r, q] = word
    return out, bits


def block_epilogue(src: np.ndarray, scale: np.ndarray, a1: np.ndarray, b1: np.ndarray,
                   res: np.ndarray | None = None, a2: np.ndarray | None = None,
                   b2: np.ndarray | None = None, slope: np.ndarray | None = None,
                   out: np.ndarray | None = None, nbias: np.ndarray | None = None,
                   bits: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The end of a residual BNN block on channels-last rows, one pass (`_block_epilogue`):
    src (N, M) int32 binary conv outputs (or float32) -> y = PReLU((src * scale) * a1 + b1 +
    [res * a2 + b2 | res]) written to `out` (N, M) float32 when given, and the next binary
    conv's input signs sign(y + nbias) packed to `bits` (N, M_words) uint64 when `nbias` is
    given. Per-channel vectors are float32 (M,). Returns (out, bits); an unwanted one is empty.
    """
    n, m = src.shape
    f32 = np.float32
    vec = lambda v: np.zeros(0, f32) if v is None else np.ascontiguousarray(v, f32)  # noqa: E731
    for name, v in (("scale", scale), ("a1", a1), ("b1", b1), ("a2", a2), ("b2", b2),
                    ("slope", slope), ("nbias", nbias)):
        if v is not None and np.shape(v) != (m,):
            raise ValueError(f"{name} has shape {np.shape(v)}, the rows have {m} channels")
    if (a2 is None) != (b2 is None) or (a2 is not None and res is None):
        raise ValueError("a2 and b2 go together, with res")
    if res is not None and res.shape != (n, m):
        raise ValueError(f"res has shape {res.shape}, src {src.shape}")
    res_ = np.zeros((0, m), f32) if res is None else np.ascontiguousarray(res, f32)
    out_ = np.zeros((0, m), f32) if out is None else _buffer(out, (n, m), f32)
    bits_ = (np.zeros((0, 1), np.uint64) if nbias is None else
             _buffer(bits, (n, n_words(m)), np.uint64))
    slope_ = np.ones(m, f32) if slope is None else slope  # PReLU with slope 1: y itself
    o, b = _block_epilogue(np.ascontiguousarray(src).reshape(-1), vec(scale), vec(a1), vec(b1),
                           res_.reshape(-1), vec(a2), vec(b2), vec(slope_), out_.reshape(-1),
                           vec(nbias), bits_)  # rows flattened: views of the same memory
    return o.reshape(-1, m), b


FLOAT_PIXELS = 64  # output pixels per task of `_float_conv_rows` (whole blocks of ROWS); measured
# 2 threads, 64..512: within noise, except 128, where the stem took 1.3-1.5 ms at batch 64, not
# 0.8-0.9 (not understood)
FLOAT_K = 4  # taps (im2col columns) per pass of `_rows_gemm` over the output channels


@njit(inline="always")
def _gather_taps(x, k, stride, pad, oh, ow, p0, cols):
    """cols (k * k * Cin, n) = the float im2col of output pixels p0..p0 + n - 1 (in
    (B, OH, OW) order), transposed: row (i * k + j) * Cin + c holds tap (i, j), channel c of
    every pixel; zeros outside the image.

    Pixels are taken a row segment at a time; per tap the pixels whose input is inside the
    image are one range of ox, computed up front, and each (tap, channel) is one loop over
    them writing contiguously (for a 1-channel stem: a copy of an input row; measured 1 thread,
    batch 64, 3x3 stem: 1.25 -> 0.6 ms against a gather pixel by pixel)."""
    _, h, w, cin = x.shape
    n = cols.shape[1]
    cols[:] = 0
    p = 0
    while p < n:
        bi, rem = (p0 + p) // (oh * ow), (p0 + p) % (oh * ow)
        oy, ox0 = rem // ow, rem % ow
        seg = min(ow - ox0, n - p)  # pixels ox0..ox0 + seg - 1 of output row oy
        for i in range(k):
            iy = oy * stride + i - pad
            if iy < 0 or iy >= h:
                continue
            for j in range(k):
                lo = max(ox0, -((j - pad) // stride))  # first ox with ix >= 0
                hi = min(ox0 + seg, (w - 1 + pad - j) // stride + 1)  # past the last ix < w
                d0, s0 = p - ox0, j - pad
                for c in range(cin):  # unsigned indices: no negative-index fix-up, so the
                    t = (i * k + j) * cin + c  # copies vectorise (stem 0.98 -> 0.80 ms)
                    if stride == 1:  # its own loop: stem 0.95 ms, 1.04-1.08 with one loop
                        for ox in range(lo, hi):
                            cols[t, np.uint64(d0 + ox)] = x[bi, iy, np.uint64(ox + s0), c]
                    else:
                        for ox in range(lo, hi):
                            cols[t, np.uint64(d0 + ox)] = x[bi, iy, np.uint64(ox * stride + s0), c]
        p += seg


@njit(inline="always")
def _gather_pooled(x, k, stride, pad, pool, oh, ow, p0, rows):
    """rows (n, k * k * Cin) = the im2col rows of output pixels p0..p0 + n - 1 of the
    pool x pool average of x (summed in row order, times 1 / pool^2), tap-major, zeros
    outside. A pixel's channels are contiguous in x and in rows: the sums run over them
    (vectorised; channels strided across the rows' transpose made scattered stores, 10x
    slower). Scalar indexing, no views: a view costs two atomic reference counts, which both
    threads contend for (measured 1 thread, batch 64, first shortcut: 0.38 -> 0.30 ms)."""
    _, hp, wp, cin = x.shape
    h, w = hp // pool, wp // pool
    inv = np.float32(1.0 / (pool * pool))
    if k == 1 and stride == 1 and pad == 0 and pool == 2:  # the shortcuts: one loop a pixel
        for r in range(rows.shape[0]):  # (measured 2 threads, batch 64, min, interleaved:
            bi, rem = (p0 + r) // (oh * ow), (p0 + r) % (oh * ow)  # first shortcut 0.51-0.59
            y0, x0 = rem // ow * 2, rem % ow * 2  # -> 0.43-0.47 ms, against the loops below)
            for c in range(cin):
                rows[r, c] = (((x[bi, y0, x0, c] + x[bi, y0, x0 + 1, c]) + x[bi, y0 + 1, x0, c])
                              + x[bi, y0 + 1, x0 + 1, c]) * inv
        return
    rows[:] = 0
    for r in range(rows.shape[0]):
        bi, rem = (p0 + r) // (oh * ow), (p0 + r) % (oh * ow)
        oy, ox = rem // ow, rem % ow
        for i in range(k):
            iy = oy * stride + i - pad
            for j in range(k):
                ix = ox * stride + j - pad
                if iy < 0 or iy >= h or ix < 0 or ix >= w:
                    continue
                t0 = (i * k + j) * cin
                for u in range(pool):
                    for e in range(pool):
                        for c in range(cin):
                            rows[r, t0 + c] += x[bi, iy * pool + u, ix * pool + e, c]
                for c in range(cin):
                    rows[r, t0 + c] *= inv


@njit(inline="always")
def _rows_gemm(cols, wt, bias, out, o0):
    """out[o0 + r] = bias + cols[:, r] @ wt for the pixels r of cols (K, N); wt (K, M).

    Blocks of ROWS output rows x FLOAT_K taps: each pass over M (contiguous, vectorised) loads
    the FLOAT_K weight values once for the ROWS sums. `out` and `wt` are indexed in 2-D (not as
    row views): LLVM then needs one overlap test per array pair to vectorise, not one per row
    pair (measured 1 thread, K 64, M 128: 27 -> 40 GMAC/s)."""
    kk, n = cols.shape
    m = wt.shape[1]
    kb = kk - kk % FLOAT_K
    for r in range(o0, o0 + n):
        for j in range(m):
            out[r, j] = bias[j]
    for r in range(n - n % ROWS, n):  # the ragged last rows, one at a time
        for q in range(kk):
            xv = cols[q, r]
            for j in range(m):
                out[o0 + r, j] += xv * wt[q, j]
    for r0 in range(0, n - n % ROWS, ROWS):
        o = o0 + r0
        for q in range(0, kb, FLOAT_K):
            p0, p1, p2, p3 = cols[q, r0], cols[q + 1, r0], cols[q + 2, r0], cols[q + 3, r0]
            s0, s1, s2, s3 = (cols[q, r0 + 1], cols[q + 1, r0 + 1], cols[q + 2, r0 + 1],
                              cols[q + 3, r0 + 1])
            t0, t1, t2, t3 = (cols[q, r0 + 2], cols[q + 1, r0 + 2], cols[q + 2, r0 + 2],
                              cols[q + 3, r0 + 2])
            u0, u1, u2, u3 = (cols[q, r0 + 3], cols[q + 1, r0 + 3], cols[q + 2, r0 + 3],
                              cols[q + 3, r0 + 3])
            for j in range(m):  # vectorised over output channels
                v0, v1, v2, v3 = wt[q, j], wt[q + 1, j], wt[q + 2, j], wt[q + 3, j]
                out[o, j] += ((p0 * v0 + p1 * v1) + p2 * v2) + p3 * v3
                out[o + 1, j] += ((s0 * v0 + s1 * v1) + s2 * v2) + s3 * v3
                out[o + 2, j] += ((t0 * v0 + t1 * v1) + t2 * v2) + t3 * v3
                out[o + 3, j] += ((u0 * v0 + u1 * v1) + u2 * v2) + u3 * v3
        for q in range(kb, kk):
            p0, s0, t0, u0 = cols[q, r0], cols[q, r0 + 1], cols[q, r0 + 2], cols[q, r0 + 3]
            for j in range(m):
                v0 = wt[q, j]
                out[o, j] += p0 * v0
                out[o + 1, j] += s0 * v0
                out[o + 2, j] += t0 * v0
                out[o + 3, j] += u0 * v0


@njit(cache=True)
def _float_conv_rows(x, wt, bias, k, stride, pad, pool, out):
    """Float conv on channels-last rows: x (B, H, W, Cin) float32 -> out (B * OH * OW, Cout),
    zero padding; with pool > 1 the input is first average-pooled pool x pool (stride pool,
    no padding: an AvgPool2d + 1x1 conv shortcut in one pass). wt (k * k * Cin, Cout)
    tap-major, bias (Cout,).

    A task takes FLOAT_PIXELS consecutive output pixels (across rows and images: small maps
    still make whole blocks): it gathers their im2col into a buffer that stays in L1
    (`_gather_taps`; `_gather_pooled` with the pool done there) and multiplies it by wt in
    register blocks (`_rows_gemm`). The two cases are two kernels compiled apart (measured 2
    threads, batch 64, min, interleaved: stem 0.80 ms in one kernel with both, 0.74 apart;
    second shortcut 0.38 and 0.35 ms)."""
    b, hp, wp, cin = x.shape
    oh = (hp // pool + 2 * pad - k) // stride + 1
    ow = (wp // pool + 2 * pad - k) // stride + 1
    if pool == 1:
        return _float_conv_taps(x, wt, bias, k, stride, pad, oh, ow, out)
    return _float_conv_pooled(x, wt, bias, k, stride, pad, pool, oh, ow, out)


@njit(parallel=True, cache=True, fastmath=True)
def _float_conv_taps(x, wt, bias, k, stride, pad, oh, ow, out):
    """`_float_conv_rows` without a pool. fastmath lets the sums use fused multiply-adds and
    reassociate (the order differs from torch's anyway)."""
    n = x.shape[0] * oh * ow
    kk = k * k * x.shape[3]
    for task in prange((n + FLOAT_PIXELS - 1) // FLOAT_PIXELS):
        p0 = task * FLOAT_PIXELS
        cols = np.empty((kk, min(FLOAT_PIXELS, n - p0)), np.float32)  # (taps, pixels)
        _gather_taps(x, k, stride, pad, oh, ow, p0, cols)
        _rows_gemm(cols, wt, bias, out, p0)
    return out


@njit(parallel=True, cache=True, fastmath=True)
def _float_conv_pooled(x, wt, bias, k, stride, pad, pool, oh, ow, out):
    """`_float_conv_rows` with the input average-pooled first (fastmath as there)."""
    n = x.shape[0] * oh * ow
    kk = k * k * x.shape[3]
    for task in prange((n + FLOAT_PIXELS - 1) // FLOAT_PIXELS):
        p0 = task * FLOAT_PIXELS
        rows = np.empty((min(FLOAT_PIXELS, n - p0), kk), np.float32)  # (pixels, taps)
        _gather_pooled(x, k, stride, pad, pool, oh, ow, p0, rows)
        _rows_gemm(rows.T, wt, bias, out, p0)  # (taps, pixels) view
    return out


def float_conv_rows(x: np.ndarray, weight: Array, bias: Array | None, stride: int = 1,
                    padding: int = 0, pool: int = 1, out: np.ndarray | None = None
                    ) -> np.ndarray:
    """Float conv (zero padding, square kernel, groups 1) of channels-last x (B, H, W, Cin),
    optionally after a pool x pool average pool -> (B * OH * OW, Cout) float32 rows.
    weight (Cout, Cin, k, k) as nn.Conv2d keeps it."""
    wn = as_numpy(weight).astype(np.float32)
    cout, cin, k, _ = wn.shape
    b, h, w, c = x.shape
    if c != cin:
        raise ValueError(f"input has {c} channels, the weight {cin}")
    h, w = h // pool, w // pool
    n = b * ((h + 2 * padding - k) // stride + 1) * ((w + 2 * padding - k) // stride + 1)
    wt = np.ascontiguousarray(wn.transpose(2, 3, 1, 0).reshape(k * k * cin, cout))
    return _float_conv_rows(np.ascontiguousarray(x, np.float32), wt, bias_vector(bias, cout), k,
                            stride, padding, pool, _buffer(out, (n, cout), np.float32))


# ---------------------------------------------------------------------------- the head


@njit(parallel=True, cache=True, fastmath=True)
def _pool_linear(x, pool, wc, bias, out):
    """x (B, H, W, C) -> average pool (pool x pool, stride pool; pool 0: the global mean) ->
    features in channels-last order (PH, PW, C) -> out (B, classes) = features @ wc.T + bias,
    wc (classes, PH * PW * C). fastmath: the sums are reordered (vectorised dot products)."""
    b, h, w, c = x.shape
    ky, kx = (h, w) if pool == 0 else (pool, pool)
    ph, pw = h // ky, w // kx
    count = np.float32(ky * kx)
    for bi in prange(b):
        feat = np.zeros(ph * pw * c, np.float32)  # (PH, PW, C)
        for py in range(ph):
            for px in range(pw):
                base = (py * pw + px) * c
                for u in range(ky):
                    for e in range(kx):
                        for ch in range(c):  # vectorised over channels
                            feat[base + ch] += x[bi, py * ky + u, px * kx + e, ch]
                for ch in range(c):
                    feat[base + ch] /= count
        _linear_row(feat, wc, bias, out, bi)
    return out


def pool_linear(x: np.ndarray, pool: int, weight: Array, bias: Array | None,
                out: np.ndarray | None = None) -> np.ndarray:
    """A classifier head on channels-last x (B, H, W, C) float32: AvgPool2d(pool) (stride
    pool, no padding; pool 0: the mean over H and W), flatten in torch's (C, PH, PW) order,
    then `v @ weight.T + bias` with weight (classes, C * PH * PW) as `nn.Linear` keeps it
    -> (B, classes) float32, in one pass (`_pool_linear`)."""
    b, h, w, c = x.shape
    ph, pw = (1, 1) if pool == 0 else (h // pool, w // pool)
    wn = np.asarray(as_numpy(weight), np.float32)
    if pool < 0 or ph < 1 or pw < 1:
        raise ValueError(f"pool {pool} does not fit a {h}x{w} map (allowed: 0 = global, "
                         f"1..{min(h, w)})")
    if wn.ndim != 2 or wn.shape[1] != c * ph * pw:
        raise ValueError(f"classifier weight {wn.shape} does not take the {c * ph * pw} "
                         f"features of a {c}x{ph}x{pw} pooled map")
    classes = wn.shape[0]
    return _pool_linear(np.ascontiguousarray(x, np.float32), pool,
                        channels_last_weight(wn, c, ph, pw), bias_vector(bias, classes),
                        _buffer(out, (b, classes), np.float32))


def channels_last_weight(weight: Array, c: int, ph: int, pw: int) -> np.ndarray:
    """A linear layer's weight (classes, C * PH * PW) over torch's (C, PH, PW) flatten order,
    reordered to take features in channels-last (PH, PW, C) order -> float32, C-contiguous."""
    wn = np.asarray(as_numpy(weight), np.float32)
    classes = wn.shape[0]
    return np.ascontiguousarray(  # (classes, C, PH, PW) -> (classes, PH, PW, C), flattened
        wn.reshape(classes, c, ph, pw).transpose(0, 2, 3, 1).reshape(classes, -1))


def bias_vector(bias: Array | None, n: int) -> np.ndarray:
    """A layer's bias as float32 (n,); zeros when it has none."""
    return (np.zeros(n, np.float32) if bias is None else
            np.ascontiguousarray(as_numpy(bias), np.float32))
