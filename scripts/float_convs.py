"""OLD vs NEW float convs of the residual engine (issue 22): the stem and the AvgPool + 1x1
shortcuts of full-width birealnet, kernels only, interleaved; optionally the whole engine.

    NUMBA_NUM_THREADS=2 PYTHONPATH=src python scripts/float_convs.py [--old-rev b772f9f]
        [--batch-sizes 64 256] [--repeats 30] [--engine-batches 64 256]

OLD: `_float_conv_rows` at commit --old-rev (read with git show). Also times a
torch variant of each layer (numba pool into (N, Cin) rows, or the stem's im2col, then
torch.addmm into a preallocated tensor). Prints min / median ms, GMAC/s (of the min) and the
load before / after.
--engine-batches: also `PackedResidual` on a randomly initialised full-width birealnet, its
float convs run by the old kernel, the new one, or with torch GEMMs (`torch_gemm`), interleaved
(`engine_fns`), and the float layers' times inside those calls (`engine(x, times)`)."""

from __future__ import annotations

import argparse
import importlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numba
import numpy as np
import torch
from numba import njit, prange

from bnnprune.engines.kernels import cpu
from bnnprune.engines.timing import time_interleaved

# name: (H, W, Cin, Cout, k, stride, pad, pool) of full-width birealnet on 1x28x28
LAYERS = {"stem.0": (28, 28, 1, 32, 3, 1, 1, 1),
          "blocks.2.shortcut.1": (28, 28, 32, 64, 1, 1, 0, 2),
          "blocks.4.shortcut.1": (14, 14, 64, 128, 1, 1, 0, 2)}


@njit(parallel=True)
def _avgpool_rows(x, pool, out):
    """x (B, H, W, C) -> out (B * H/pool * W/pool, C): pool x pool average, channels-last."""
    b, h, w, c = x.shape
    ph, pw = h // pool, w // pool
    inv = np.float32(1.0 / (pool * pool))
    for task in prange(b * ph):
        bi, py = task // ph, task % ph
        for px in range(pw):
            dst = out[task * pw + px]
            dst[:] = 0
            for u in range(pool):
                for t in range(pool):
                    src = x[bi, py * pool + u, px * pool + t]
                    for ch in range(c):
                        dst[ch] += src[ch]
            for ch in range(c):
                dst[ch] *= inv
    return out


@njit(parallel=True)
def _im2col_taps(x, k, stride, pad, oh, ow, cols):
    """cols (k * k * Cin, B * OH * OW): `cpu._gather_taps` of every pixel block."""
    n = cols.shape[1]
    for task in prange((n + cpu.FLOAT_PIXELS - 1) // cpu.FLOAT_PIXELS):
        p0 = task * cpu.FLOAT_PIXELS
        cpu._gather_taps(x, k, stride, pad, oh, ow, p0,
                         cols[:, p0:min(n, p0 + cpu.FLOAT_PIXELS)])
    return cols


def load_old(rev: str):
    """The `_float_conv_rows` kernel of commit `rev`, imported from a temporary module (its
    numba cache off: the module does not outlive the run)."""
    src = subprocess.run(["git", "show", f"{rev}:src/bnnprune/engines/kernels/cpu.py"],
                         capture_output=True, text=True, check=True).stdout
    if "FLOAT_ROWS = " not in src:
        sys.exit(f"--old-rev {rev}: its cpu.py has no pixel-by-pixel `_float_conv_rows` "
                 f"(FLOAT_ROWS); allowed: a commit before 25bdcb4, e.g. b772f9f")
    body = src[src.index("FLOAT_ROWS = "):src.index("def float_conv_rows")]
    folder = tempfile.mkdtemp()
    Path(folder, "old_float_conv.py").write_text(
        "import numpy as np\nfrom numba import njit, prange\n\n"
        + body.replace("cache=True, ", ""))
    sys.path.insert(0, folder)
    try:
        return importlib.import_module("old_float_conv")._float_conv_rows
    finally:
        sys.path.remove(folder)


def layer_fns(name: str, b: int, old) -> tuple[dict, int]:
    h, w, cin, cout, k, stride, pad, pool = LAYERS[name]
    rng = np.random.default_rng(0)
    x = rng.standard_normal((b, h, w, cin), dtype=np.float32)
    wt = rng.standard_normal((k * k * cin, cout), dtype=np.float32)  # tap-major
    bias = rng.standard_normal(cout, dtype=np.float32)
    oh = (h // pool + 2 * pad - k) // stride + 1
    ow = (w // pool + 2 * pad - k) // stride + 1
    n = b * oh * ow
    outs = {v: np.empty((n, cout), np.float32) for v in ("old", "new", "torch")}
    fns = {"old": lambda: old(x, wt, bias, k, stride, pad, pool, outs["old"]),
           "new": lambda: cpu._float_conv_rows(x, wt, bias, k, stride, pad, pool, outs["new"])}
    tw, tb, to = (torch.from_numpy(a) for a in (wt, bias, outs["torch"]))
    if k == 1:  # the torch variant: numba pool, then one addmm
        pooled = np.empty((n, cin), np.float32)
        tp = torch.from_numpy(pooled)

        def torch_variant() -> None:
            _avgpool_rows(x, pool, pooled)
            torch.addmm(tb, tp, tw, out=to)
    else:  # numba im2col (taps, pixels), then one addmm on its transpose
        cols = np.empty((k * k * cin, n), np.float32)
        tc = torch.from_numpy(cols).t()  # (pixels, taps) view

        def torch_variant() -> None:
            _im2col_taps(x, k, stride, pad, oh, ow, cols)
            torch.addmm(tb, tc, tw, out=to)
    fns["torch"] = torch_variant
    for f in fns.values():
        f()
    for v in fns:
        np.testing.assert_allclose(outs[v], outs["old"], rtol=1e-4, atol=1e-4)
    return fns, n * k * k * cin * cout


def torch_gemm(new, stem: bool):
    """A `_float_conv_rows` that runs pooled 1x1 convs as numba pool + torch.addmm, and with
    `stem` the others as numba im2col + torch.addmm (the alternative to numba's GEMM, inside
    the engine: torch's thread pool and numba's then take turns on the cores)."""
    bufs: dict[tuple, np.ndarray] = {}

    def buffer(shape: tuple) -> np.ndarray:  # allocated once per shape, as the engine's are
        if shape not in bufs:
            bufs[shape] = np.empty(shape, np.float32)
        return bufs[shape]

    def kernel(x, wt, bias, k, stride, pad, pool, out):
        b, h, w, cin = x.shape
        if pool > 1 and k == 1:
            buf = buffer((out.shape[0], cin))  # (N, Cin)
            _avgpool_rows(x, pool, buf)
            a = torch.from_numpy(buf)
        elif stem and pool == 1:
            oh, ow = (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1
            buf = buffer((wt.shape[0], out.shape[0]))  # (taps, pixels)
            a = torch.from_numpy(_im2col_taps(x, k, stride, pad, oh, ow, buf)).t()
        else:
            return new(x, wt, bias, k, stride, pad, pool, out)
        torch.addmm(torch.from_numpy(bias), a, torch.from_numpy(wt), out=torch.from_numpy(out))
        return out
    return kernel


def engine_fns(b: int, old) -> dict:
    """The whole engine on a randomly initialised full-width birealnet, its float convs run
    by the old kernel, the new one, or torch GEMMs (each swapped into `cpu`)."""
    from bnnprune.engines.residual import PackedResidual
    from bnnprune.models import build_model, model_config
    model = build_model(model_config("birealnet", 1.0, [1, 28, 28], 10), seed=0).eval()
    engine = PackedResidual.from_model(model)
    x = torch.randn(b, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    new = cpu._float_conv_rows

    def run(name, kernel):
        def f():
            cpu._float_conv_rows = kernel
            t: dict[str, float] = {}
            try:
                return engine(x, t)
            finally:
                cpu._float_conv_rows = new
                layers[name].append({n: 1000 * t[n] for n in LAYERS})
        return f
    kernels = {"engine old": old, "engine new": new,
               "engine new, torch shortcuts": torch_gemm(new, False),
               "engine new, torch stem + shortcuts": torch_gemm(new, True)}
    layers: dict[str, list[dict[str, float]]] = {n: [] for n in kernels}
    fns = {n: run(n, k) for n, k in kernels.items()}
    with torch.no_grad():
        ref = model(x)
    for f in fns.values():
        got = f()
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
        assert torch.equal(got.argmax(1), ref.argmax(1))
    return fns, layers


def report(name: str, times: dict[str, list[float]], macs: int | None) -> None:
    for v, ts in times.items():
        mn, md = min(ts), float(np.median(ts))
        rate = f"{macs / mn / 1e6:7.1f}" if macs else "      -"
        print(f"| {name} | {v} | {mn:8.3f} | {md:8.3f} | {rate} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--old-rev", default="b772f9f",
                    help="the commit whose kernel is OLD (default: before issue 22's rewrite)")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--engine-batches", type=int, nargs="*", default=[],
                    help="also the whole engine at these batch sizes")
    args = ap.parse_args()
    numba.set_num_threads(args.threads)
    torch.set_num_threads(args.threads)
    old = load_old(args.old_rev)
    print("load before:", os.getloadavg())
    print("| layer @ batch | kernel | min ms | median ms | GMAC/s (min) |")
    print("|---|---|---:|---:|---:|")
    for b in args.batch_sizes:
        for name in LAYERS:
            fns, macs = layer_fns(name, b, old)
            report(f"{name} @ {b}", time_interleaved(fns, args.warmup, args.repeats), macs)
    for b in args.engine_batches:
        fns, layers = engine_fns(b, old)
        report(f"PackedResidual @ {b}", time_interleaved(fns, args.warmup, args.repeats), None)
        for name in LAYERS:  # the float layers' own time inside those engine calls
            times = {v: [c[name] for c in calls[1 + args.warmup:]] for v, calls in layers.items()}
            report(f"{name} in the engine @ {b}", times, None)
    print("load after:", os.getloadavg())


if __name__ == "__main__":
    main()
