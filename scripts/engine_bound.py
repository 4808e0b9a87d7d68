"""How fast could any engine run a model on this machine? A lower bound on its time at a batch
size, from three measured rates: the XOR-popcount peak (binary MACs), float GEMM (float MACs)
and memory copy (the float activations every block reads and writes); with --torch-ms (torch
float's time from the benchmark stage's report) the largest speedup over it any engine can
have. Two floors: layer by layer (every block's float output goes through memory) and
depth-first (activations stay in cache: the compute alone).

    PYTHONPATH=src python scripts/engine_bound.py --arch birealnet --batch 64 --threads 2 \
        [--checkpoint models/baseline.pt] [--torch-ms 52.5]
"""

from __future__ import annotations

import argparse
import json

import torch

from bnnprune.core.ops import count_ops
from bnnprune.engines.bench_kernels import peak_macs_per_s
from bnnprune.engines.timing import time_interleaved
from bnnprune.models import build_model, load_checkpoint, model_config
from bnnprune.pipeline.data import load_prepared, normalize


def float_gemm_macs_per_s(repeats: int) -> float:
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    ms = time_interleaved({"mm": lambda: torch.mm(a, b)}, 3, repeats)["mm"]
    return 2048 ** 3 / (min(ms) / 1000)


def copy_bytes_per_s(repeats: int) -> float:
    src, dst = torch.randn(64 * 2 ** 20), torch.empty(64 * 2 ** 20)  # 256 MB each
    ms = time_interleaved({"copy": lambda: dst.copy_(src)}, 2, repeats)["copy"]
    return 2 * src.numel() * 4 / (min(ms) / 1000)  # read + write


def block_stream_bytes(model: torch.nn.Module, x: torch.Tensor) -> int:
    """Bytes of the float tensors between the model's top-level stages/blocks: each written once
    and read once (the residual stream a layer-by-layer engine keeps in memory)."""
    sizes: list[int] = []
    leaves = [m for name, m in model.named_modules()
              if name == "stem" or (name.startswith("blocks.") and name.count(".") == 1)]
    hooks = [m.register_forward_hook(lambda _m, _a, out: sizes.append(out.numel()))
             for m in leaves]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return 2 * 4 * sum(sizes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="birealnet")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--checkpoint", help="a trained model (else a fresh one, random input)")
    parser.add_argument("--data", default="data/prepared")
    parser.add_argument("--torch-ms", type=float, help="torch float's ms at this batch size")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.checkpoint:
        model = load_checkpoint(args.checkpoint)[0].eval()
        splits, card = load_prepared(args.data)
        x = normalize(splits["test"].images[:args.batch], card["mean"], card["std"])
        args.arch = model.config["arch"]
    else:
        model = build_model(model_config(args.arch, 1.0, [1, 28, 28], 10), seed=0).eval()
        x = torch.randn(args.batch, 1, 28, 28)
    ops = count_ops(model, x)
    peak = peak_macs_per_s(args.threads)["max"]
    gemm, copy = float_gemm_macs_per_s(args.repeats), copy_bytes_per_s(10)
    stream = block_stream_bytes(model, x)
    compute_ms = 1000 * args.batch * (ops.bops / peak + ops.flops / gemm)
    memory_ms = 1000 * stream / copy
    print(json.dumps({
        "arch": args.arch, "batch": args.batch, "threads": args.threads,
        "binary_macs_per_image": ops.bops, "float_macs_per_image": ops.flops,
        "xor_popcount_peak_macs_per_s": peak, "float_gemm_macs_per_s": gemm,
        "copy_bytes_per_s": copy, "block_stream_bytes": stream,
        "floor_ms": {"depth_first": compute_ms, "layer_by_layer": compute_ms + memory_ms},
        **({"torch_float_ms": args.torch_ms, "max_speedup_vs_torch_float": {
            "depth_first": args.torch_ms / compute_ms,
            "layer_by_layer": args.torch_ms / (compute_ms + memory_ms)}}
           if args.torch_ms else {})}, indent=1))


if __name__ == "__main__":
    main()
