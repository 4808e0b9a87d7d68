"""Plain torch ground truth for the binary kernels; every backend is tested against these.

Inputs may be ±1 or any real tensor: the sign rule is ``x >= 0 -> +1`` (as `binarize`).
Sums of ±1 products are computed in float64, which is exact for K < 2**53.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from bnnprune.engines.kernels.pack import Array, as_numpy


def sign_pm1(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x >= 0, 1.0, -1.0).to(torch.float64)


def binary_gemm_ref(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """a (N, K), w (M, K) -> (N, M) int32 = sign(a) @ sign(w).T."""
    return (sign_pm1(a) @ sign_pm1(w).T).to(torch.int32)


def binary_conv2d_ref(x: torch.Tensor, w: torch.Tensor, stride: int = 1,
                      padding: int = 0) -> torch.Tensor:
    """x (B, Cin, H, W), w (Cout, Cin, kh, kw) -> (B, Cout, OH, OW) int32, via im2col.

    sign(x) is padded with +1 (the project's binary convs pad the binarised activation with
    +1, see `BinaryConv2d`)."""
    b, _, h, wd = x.shape
    cout, _, kh, kw = w.shape
    xb = F.pad(sign_pm1(x), (padding,) * 4, value=1.0)  # (B, Cin, H + 2p, W + 2p)
    cols = F.unfold(xb, (kh, kw), stride=stride)  # (B, Cin * kh * kw, L)
    out = sign_pm1(w).reshape(cout, -1) @ cols  # (B, Cout, L)
    oh = (h + 2 * padding - kh) // stride + 1
    ow = (wd + 2 * padding - kw) // stride + 1
    return out.reshape(b, cout, oh, ow).to(torch.int32)


def packed_dot_ref(a_words: Array, w_words: Array, k: int) -> np.ndarray:
    """Packed a (N, K_words), w (M, K_words) -> (N, M) int32 = K - 2 * popcount(a ^ w)."""
    a, w = as_numpy(a_words), as_numpy(w_words)
    diff = np.bitwise_count(a[:, None, :] ^ w[None, :, :]).sum(-1, dtype=np.int64)  # (N, M)
    return (k - 2 * diff).astype(np.int32)


def fold_bn_sign(gamma: torch.Tensor, beta: torch.Tensor, mean: torch.Tensor,
                 var: torch.Tensor, eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold ``sign(BN(acc))`` into an integer compare per channel: out = (s * acc >= t).

    BN(acc) = gamma * (acc - mean) / sqrt(var + eps) + beta >= 0 is, for integer acc,
      gamma > 0:  acc >= ceil(tau)      ->  s = +1, t = ceil(tau)
      gamma < 0:  acc <= floor(tau)     ->  s = -1, t = -floor(tau)
      gamma == 0: beta >= 0 (constant)  ->  s =  0, t = 0 if beta >= 0 else 1
    with tau = mean - beta * sqrt(var + eps) / gamma (computed in float64). Returns int32
    (s, t). Exact up to float rounding of BN itself at exact ties."""
    g, b, mu = gamma.double(), beta.double(), mean.double()
    sigma = torch.sqrt(var.double() + eps)
    safe_g = torch.where(g == 0, 1.0, g)
    tau = mu - b * sigma / safe_g
    s = torch.sign(g).to(torch.int32)
    t = torch.where(g > 0, torch.ceil(tau), -torch.floor(tau))
    t = torch.where(g == 0, (b < 0).double(), t)
    t = t.clamp(-(2**31) + 1, 2**31 - 1)  # thresholds beyond any reachable acc saturate
    return s, t.to(torch.int32)


def threshold_sign_ref(acc: torch.Tensor, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """acc (N, M) int, per-channel s, t (M,) -> (N, M) int8 ±1 = +1 where s * acc >= t."""
    hit = s.to(torch.int64) * acc.to(torch.int64) >= t.to(torch.int64)
    return torch.where(hit, 1, -1).to(torch.int8)


def bn_sign_ref(acc: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, mean: torch.Tensor,
                var: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Unfolded float64 sign(BN(acc)) over the last axis (channels) -> int8 ±1."""
    y = gamma.double() * (acc.double() - mean.double()) / torch.sqrt(var.double() + eps)
    return torch.where(y + beta.double() >= 0, 1, -1).to(torch.int8)
