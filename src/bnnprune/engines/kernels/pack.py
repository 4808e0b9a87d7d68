"""Bit packing of ±1 tensors (plain numpy, the layout every backend follows).

Convention: a value ``>= 0`` is +1 (bit 1), a value ``< 0`` is -1 (bit 0), the same rule as
``bnnprune.core.binary.binarize``. Rows are packed along the reduction axis K (the last axis),
K contiguous: bit ``j`` of word ``w`` holds element ``k = w * word_bits + j``. The tail of the
last word is zero in every operand, so it drops out of ``popcount(a ^ b)`` and

    dot(a, b) = K - 2 * popcount(a ^ b)          (K = the true, unpadded length)

holds exactly whatever the padding. Words are ``uint64`` on CPU and 32-bit on GPU (stored as
``int32`` in torch, which has no general ``uint32``).

Convolutions reduce over K = kh * kw * Cin in channels-last order ``k = (i * kw + j) * Cin + c``
(`conv_weight_matrix`); the packed CPU and Triton im2col kernels produce the same order, so the
activation bits for one tap are the pixel's packed channel bits.
"""

from __future__ import annotations

import numpy as np
import torch

Array = np.ndarray | torch.Tensor


def n_words(k: int, word_bits: int = 64) -> int:
    return (k + word_bits - 1) // word_bits


def as_numpy(x: Array) -> np.ndarray:
    """Zero-copy numpy view of a CPU tensor (strides kept) or the array itself."""
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def pack_pm1(x: Array, word_bits: int = 64) -> np.ndarray:
    """Pack the last axis of a ±1 (or any real) array into words: (..., K) -> (..., K_words).

    Returns uint64 words for ``word_bits=64`` and uint32 words for ``word_bits=32``."""
    if word_bits not in (32, 64):
        raise ValueError(f"word_bits must be 32 or 64, got {word_bits}")
    bits = as_numpy(x) >= 0  # (..., K) bool
    k = bits.shape[-1]
    pad = n_words(k, word_bits) * word_bits - k
    bits = np.concatenate([bits, np.zeros(bits.shape[:-1] + (pad,), bool)], axis=-1)
    packed = np.packbits(bits, axis=-1, bitorder="little")  # (..., K_words * word_bits / 8)
    words = np.ascontiguousarray(packed).view(f"<u{word_bits // 8}")
    return words.astype(np.uint64 if word_bits == 64 else np.uint32)


def unpack_pm1(words: Array, k: int) -> np.ndarray:
    """Inverse of `pack_pm1`: (..., K_words) words -> (..., K) int8 ±1."""
    w = as_numpy(words)
    word_bytes = w.dtype.itemsize
    w = np.ascontiguousarray(w).view(f"<u{word_bytes}")
    bits = np.unpackbits(w.view(np.uint8), axis=-1, bitorder="little")[..., :k]  # (..., K)
    return (bits.astype(np.int8) * 2 - 1).astype(np.int8)


def conv_weight_matrix(w: Array) -> np.ndarray:
    """(Cout, Cin, kh, kw) conv weight -> (Cout, kh * kw * Cin) in channels-last K order."""
    w = as_numpy(w)
    cout = w.shape[0]
    return np.ascontiguousarray(w.transpose(0, 2, 3, 1)).reshape(cout, -1)


def to_int32_words(words_u32: np.ndarray) -> torch.Tensor:
    """uint32 words -> torch int32 tensor with the same bits (for the Triton kernels)."""
    return torch.from_numpy(np.ascontiguousarray(words_u32).view(np.int32))
