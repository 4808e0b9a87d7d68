"""The residual engine with the CPU kernels of an older commit vs the working tree, whole model,
interleaved call by call in one process (issue 22): what a kernel change buys inside the engine.

    PATH=$PWD/.venv/bin:$PATH python scripts/engine_ab.py --old-rev 2cb6686
        [--checkpoint models/baseline.pt] [--widths 32 24 32] [--batch 64] [--repeats 40]
        [--torch-head] [--plain-buffers]

OLD: today's `PackedResidual` runtime with `engines/kernels/cpu.py` of --old-rev (imported from a
temporary module, its numba cache off) in place of the current one; --torch-head also runs the
head as torch ops, as before `fuse_head` (f5bb955); --plain-buffers gives it a buffer per op
from np.empty, as before the shared huge-page buffers (ad47c7d). NEW: the working tree. Both on
the baseline (a checkpoint, or a randomly initialised full-width birealnet) and on it cut to
--widths with `bnnprune.prune(method="uniform")`. Prints, per model, min / median ms of each
side, their ratios, the load, and whether old, new and torch predict the same classes."""

from __future__ import annotations

import argparse
import importlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numba
import numpy as np
import torch

import bnnprune
from bnnprune.engines import residual
from bnnprune.engines.residual import PackedResidual, huge_page_empty
from bnnprune.models import build_model, load_checkpoint, model_config


def load_kernels(rev: str):
    """`engines/kernels/cpu.py` of commit `rev` as a module of its own (numba cache off)."""
    src = subprocess.run(["git", "show", f"{rev}:src/bnnprune/engines/kernels/cpu.py"],
                         capture_output=True, text=True, check=True).stdout
    folder = tempfile.mkdtemp()
    Path(folder, "old_cpu_kernels.py").write_text(src.replace("cache=True", "cache=False"))
    sys.path.insert(0, folder)
    try:
        return importlib.import_module("old_cpu_kernels")
    finally:
        sys.path.remove(folder)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--old-rev", required=True)
    ap.add_argument("--checkpoint")
    ap.add_argument("--widths", type=int, nargs=3, default=[32, 24, 32])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--torch-head", action="store_true")
    ap.add_argument("--plain-buffers", action="store_true")
    args = ap.parse_args()
    numba.set_num_threads(args.threads)
    torch.set_num_threads(args.threads)
    old_cpu, new_cpu = load_kernels(args.old_rev), residual.cpu
    base = (load_checkpoint(args.checkpoint)[0] if args.checkpoint else
            build_model(model_config("birealnet", 1.0, [1, 28, 28], 10), seed=0)).eval()
    widths = dict(zip(["blocks.0.conv", "blocks.2.conv", "blocks.4.conv"], args.widths,
                      strict=True))
    pruned, _ = bnnprune.prune(base, torch.zeros(1, 1, 28, 28), None, method="uniform",
                               widths=widths, seed=0)
    x = torch.randn(args.batch, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    print(f"old: kernels of {args.old_rev}{', torch head' if args.torch_head else ''}"
          f"{', a buffer per op from np.empty' if args.plain_buffers else ''}; "
          f"new: working tree; batch {args.batch}; load before {os.getloadavg()}")
    for name, model in (("baseline", base), ("pruned", pruned.eval())):
        new = PackedResidual.from_model(model)
        old = PackedResidual.from_model(model, share_buffers=not args.plain_buffers)
        if args.torch_head:
            old.ops = old.program.ops

        def run_old(old: PackedResidual = old) -> torch.Tensor:
            residual.cpu = old_cpu
            if args.plain_buffers:  # buffers are made on the first call
                residual.huge_page_empty = np.empty
            try:
                return old(x)
            finally:
                residual.cpu, residual.huge_page_empty = new_cpu, huge_page_empty

        def run_new(new: PackedResidual = new) -> torch.Tensor:
            return new(x)

        with torch.no_grad():
            ref = model(x).argmax(1)
        same = [torch.equal(f().argmax(1), ref) for f in (run_old, run_new)]
        for _ in range(3):
            run_old(), run_new()
        t_old, t_new = [], []
        for _ in range(args.repeats):
            for f, ts in ((run_old, t_old), (run_new, t_new)):
                t = time.perf_counter()
                f()
                ts.append(time.perf_counter() - t)
        o, n = np.array(t_old) * 1e3, np.array(t_new) * 1e3
        print(f"{name}: old {o.min():.3f} / {np.median(o):.3f} ms, new {n.min():.3f} / "
              f"{np.median(n):.3f} ms (min / median); old / new {o.min() / n.min():.3f} of "
              f"min, {np.median(o) / np.median(n):.3f} of medians; predictions as torch's "
              f"(old, new): {same}")
    print(f"load after {os.getloadavg()}")


if __name__ == "__main__":
    main()
