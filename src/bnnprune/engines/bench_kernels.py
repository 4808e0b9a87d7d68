"""Kernel micro-benchmark: packed CPU binary GEMM vs torch float32 matmul on the same shapes.

    python -m bnnprune.engines.bench_kernels --threads 2 [--shapes 50176x288x32,...] [--conv]
                                     [--out reports/kernel_bench.json]

A GEMM shape is (N, K, M) = (batch * H_out * W_out, Cin * kh * kw, Cout). For each shape the
methods run interleaved (one call of each per round, rotating order, after warm-up) and the
median wall time is reported; torch and numba use the same thread count.
  torch      torch.matmul(A, W^T), A (N, K) and W^T (K, M) float32 ±1
  gemm       cpu.binary_gemm on packed A (weights packed once, as at inference)
  pack+gemm  cpu.pack_rows(A float32) + cpu.binary_gemm: includes packing the activations
(output buffers are preallocated for all three, so the allocator's page faults are not timed).
With --conv, whole binary convolutions of the default network are also timed, each side
allocating its outputs: cpu.binary_conv2d(x float32 NCHW, packed weight) (pack channels +
packed im2col + GEMM) vs F.conv2d(sign(x) padded, w) float32 (oneDNN).

Peak: `PeakXorPopcount` measures this machine's XOR-popcount rate, the ceiling any binary layer
can reach: every thread XORs words held in L1 (2,048 per thread, 16 KiB) with a register value,
popcounts and accumulates in registers (LLVM: vpxorq + vpopcntq + vpaddq on AVX-512 VPOPCNTDQ),
no stores. One word = 64 binary MACs. The whole-model benchmark times it interleaved with the
models, so its rate and the layers' rates are measured under the same load.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

import numba
import numpy as np
import torch
import torch.nn.functional as F
from numba import njit, prange

from bnnprune.engines.kernels import cpu
from bnnprune.engines.timing import time_interleaved

# Conv layers of a compact CNN on 28x28 input, batch 64, and the DESIGN.md example:
# (B, Cin, H, W, Cout) with 3x3 kernels, stride 1, padding 1.
DEFAULT_CONVS = [(64, 32, 28, 28, 32), (64, 32, 14, 14, 64), (64, 64, 14, 14, 64),
                 (64, 64, 7, 7, 128), (64, 128, 7, 7, 128), (64, 128, 14, 14, 128)]
DEFAULT_SHAPES = [(b * h * w, cin * 9, cout) for b, cin, h, w, cout in DEFAULT_CONVS]


PEAK_WORDS = 2048  # uint64 words per thread: 16 KiB, resident in L1


@njit(parallel=True, cache=True)
def _xor_popcount_loop(buf, reps, out):
    """Per thread t: sum over `reps` passes of popcount(buf[t, i] ^ c), c in a register."""
    for t in prange(buf.shape[0]):
        s = np.uint64(0)
        c = np.uint64(0x9E3779B97F4A7C15) + np.uint64(t)
        for _ in range(reps):
            for i in range(buf.shape[1]):  # a reduction: vectorised, accumulators in registers
                s += cpu._popc(buf[t, i] ^ c)
            c += np.uint64(1)
        out[t] = s
    return out


class PeakXorPopcount:
    """A callable doing `macs` binary MACs (XOR + popcount + add) over `threads` threads:
    rate = macs / its time. `reps` passes over each thread's L1-resident words (default:
    ~0.5 ms of work at 1 TMAC/s per thread, so the parallel launch (~10 us) hardly counts)."""

    def __init__(self, threads: int, reps: int = 4096, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.buf = rng.integers(0, 2**64, (max(threads, 1), PEAK_WORDS), dtype=np.uint64)
        self.out = np.zeros(len(self.buf), np.uint64)
        self.reps = reps
        self.macs = 64 * self.buf.size * reps
        self()  # compile outside any timing

    def __call__(self) -> np.ndarray:
        return _xor_popcount_loop(self.buf, self.reps, self.out)


def peak_macs_per_s(threads: int, repeats: int = 50, warmup: int = 5) -> dict[str, float]:
    """This machine's XOR-popcount rate (binary MACs/s) on `threads` threads, from the fastest
    (`max`) and the median call."""
    numba.set_num_threads(threads)
    peak = PeakXorPopcount(threads)
    ms = time_interleaved({"peak": peak}, warmup, repeats)["peak"]
    return {"threads": threads, "max": peak.macs / (min(ms) / 1000),
            "median": peak.macs / (float(np.median(ms)) / 1000)}


def _summary(ms: dict[str, list[float]], base: str, names: list[str]) -> dict:
    """ms per method (median and min: the least disturbed run when other processes share the
    cores) and speedups of each name over `base`."""
    t = {name: (float(np.median(v)), float(np.min(v))) for name, v in ms.items()}
    out = {}
    for name in [base, *names]:
        key = name.replace("+", "_")
        out[f"{key}_ms"], out[f"{key}_min_ms"] = t[name]
    for name in names:
        key = name.replace("+", "_")
        out[f"speedup_{key}"] = t[base][0] / t[name][0]
        out[f"speedup_{key}_min"] = t[base][1] / t[name][1]
    return out


def bench_gemm(n: int, k: int, m: int, repeats: int, warmup: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    a = torch.where(torch.randn(n, k, generator=g) >= 0, 1.0, -1.0)  # (N, K)
    w = torch.where(torch.randn(m, k, generator=g) >= 0, 1.0, -1.0)  # (M, K)
    wt = w.T.contiguous()  # (K, M)
    a_np = a.numpy()
    a_packed, w_packed = cpu.pack_rows(a_np), cpu.pack_weight(w)
    exact = bool((cpu.binary_gemm(a_packed, w_packed, k) == torch.matmul(a, wt).numpy()).all())
    t_out, g_out = torch.empty(n, m), np.empty((n, m), np.int32)  # outputs reused by both
    p_out = np.empty_like(a_packed)
    t = time_interleaved({
        "torch": lambda: torch.matmul(a, wt, out=t_out),
        "gemm": lambda: cpu.binary_gemm(a_packed, w_packed, k, out=g_out),
        "pack+gemm": lambda: cpu.binary_gemm(cpu.pack_rows(a_np, out=p_out), w_packed, k,
                                             out=g_out),
    }, warmup, repeats)
    return {"n": n, "k": k, "m": m, **_summary(t, "torch", ["gemm", "pack+gemm"]), "exact": exact}


def bench_conv(b: int, cin: int, h: int, w: int, cout: int, repeats: int, warmup: int,
               seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, cin, h, w, generator=g)  # (B, Cin, H, W) pre-activations
    wt = torch.where(torch.randn(cout, cin, 3, 3, generator=g) >= 0, 1.0, -1.0)
    xb = F.pad(torch.where(x >= 0, 1.0, -1.0), (1,) * 4, value=1.0)  # sign, padded with +1
    x_np, pw = x.numpy(), cpu.pack_conv_weight(wt)
    exact = bool((cpu.binary_conv2d(x_np, pw, 1, 1) == F.conv2d(xb, wt).numpy()).all())
    t = time_interleaved({
        "torch": lambda: F.conv2d(xb, wt),
        "packed": lambda: cpu.binary_conv2d(x_np, pw, 1, 1),
    }, warmup, repeats)
    return {"b": b, "cin": cin, "h": h, "w": w, "cout": cout,
            **_summary(t, "torch", ["packed"]), "exact": exact}


def run(shapes: list[tuple[int, int, int]] = DEFAULT_SHAPES, threads: int = 2,
        repeats: int = 15, warmup: int = 3, convs: list[tuple[int, ...]] | None = None) -> dict:
    torch.set_num_threads(threads)
    numba.set_num_threads(threads)
    load = os.getloadavg()[0]  # other processes on the same cores disturb the timings
    gemm = [bench_gemm(n, k, m, repeats, warmup) for n, k, m in shapes]
    conv = [bench_conv(*c, repeats, warmup) for c in convs or []]
    return {
        "threads": threads, "repeats": repeats, "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__, "numba": numba.__version__,
        "numba_threading_layer": numba.threading_layer(), "load_avg_1min_before": load,
        "min_speedup_gemm": min(r["speedup_gemm"] for r in gemm),
        "min_speedup_pack_gemm": min(r["speedup_pack_gemm"] for r in gemm),
        "gemm": gemm, "conv": conv,
    }


def format_table(result: dict) -> str:
    """Median ms per method and speedup over torch; min-based speedup in brackets."""
    lines = [f"binary GEMM, {result['threads']} threads, median of {result['repeats']} (ms); "
             f"speedup over torch float32 [from min times]; load before "
             f"{result['load_avg_1min_before']:.2f}",
             f"{'N':>7} {'K':>5} {'M':>4} | {'torch f32':>9} {'gemm':>7} {'pack+gemm':>9} | "
             f"{'x gemm':>13} {'x pack+gemm':>13} exact"]
    for r in result["gemm"]:
        lines.append(f"{r['n']:>7} {r['k']:>5} {r['m']:>4} | {r['torch_ms']:>9.2f} "
                     f"{r['gemm_ms']:>7.3f} {r['pack_gemm_ms']:>9.3f} | "
                     f"{r['speedup_gemm']:>5.1f} [{r['speedup_gemm_min']:>5.1f}] "
                     f"{r['speedup_pack_gemm']:>5.1f} [{r['speedup_pack_gemm_min']:>5.1f}] "
                     f"{r['exact']}")
    if result["conv"]:
        lines.append("binary conv 3x3 pad 1 (x float32 NCHW -> int32) vs F.conv2d float32")
        lines.append(f"{'B,Cin,H,W,Cout':>18} | {'torch':>7} {'packed':>7} | {'x':>13} exact")
        for r in result["conv"]:
            shape = f"{r['b']},{r['cin']},{r['h']},{r['w']},{r['cout']}"
            lines.append(f"{shape:>18} | {r['torch_ms']:>7.2f} {r['packed_ms']:>7.3f} | "
                         f"{r['speedup_packed']:>5.1f} [{r['speedup_packed_min']:>5.1f}] "
                         f"{r['exact']}")
    return "\n".join(lines)


def parse_shapes(text: str) -> list[tuple[int, int, int]]:
    """'50176x288x32,12544x1152x128' -> [(50176, 288, 32), (12544, 1152, 128)]"""
    return [tuple(int(v) for v in s.split("x")) for s in text.split(",") if s]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--shapes", type=parse_shapes, default=DEFAULT_SHAPES, help="NxKxM,...")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--conv", action="store_true", help="also time the default conv layers")
    p.add_argument("--out", type=Path, help="write the result as JSON here")
    args = p.parse_args(argv)
    result = run(args.shapes, args.threads, args.repeats, args.warmup,
                 DEFAULT_CONVS if args.conv else None)
    print(format_table(result))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
