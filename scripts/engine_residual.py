"""The packed engine on birealnet, baseline vs pruned, beside torch float and onnxruntime in one
interleaved run (`pipeline.benchmark.run_benchmark`), for reports/engine-residual.md.

    PATH=$PWD/.venv/bin:$PATH python scripts/engine_residual.py [--checkpoint models/baseline.pt]
        [--pruned models/finetuned.pt] [--repeats 30] [--out reports/metrics/engine-residual.json]

Without checkpoints: a randomly initialised full-width birealnet (`registry.build_model`, seed 0)
and the same pruned by `bnnprune.prune` to the widths the flip rule chose on the trained one
(reports/runs/birealnet-2026-12-06: 24/48/104 of 32/64/128), selection uniform-random, seed 0.
Speed does not depend on the weights; mismatch counts are then against a random model.
Both are exported to ONNX (the export stage's folded exporter) in a temporary folder. Prints
the load, the whole-model table per batch size, the engine's ratios over torch float and
onnxruntime, and the per-layer table (MACs ratio, time ratio, % of the XOR-popcount peak)."""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import numba
import numpy as np
import torch

import bnnprune
from bnnprune.core.ops import count_ops
from bnnprune.engines.bench_kernels import PeakXorPopcount
from bnnprune.engines.packed import PackedModel
from bnnprune.engines.timing import time_interleaved
from bnnprune.models import build_model, load_checkpoint, model_config
from bnnprune.pipeline.benchmark import batch_of, layer_summary, layer_table_md, run_benchmark
from bnnprune.pipeline.config import ExportConfig
from bnnprune.pipeline.data import load_prepared, normalize
from bnnprune.pipeline.export import export_onnx, session

FLIP_WIDTHS = {"blocks.0.conv": 24, "blocks.2.conv": 48, "blocks.4.conv": 104}


def models(checkpoint: str | None, pruned: str | None, in_shape: list[int],
           widths: dict[str, int] = FLIP_WIDTHS) -> dict[str, torch.nn.Module]:
    if checkpoint:
        out = {"baseline": load_checkpoint(checkpoint)[0].eval()}
        out["pruned"] = load_checkpoint(pruned)[0].eval() if pruned else None
    else:
        out = {"baseline": build_model(model_config("birealnet", 1.0, in_shape, 10),
                                       seed=0).eval(), "pruned": None}
    if out["pruned"] is None:
        p, _ = bnnprune.prune(out["baseline"], torch.zeros(1, *in_shape), None,
                              method="uniform", widths=widths, seed=0)
        out["pruned"] = p.eval()
    return out


def engine_layers(ms: dict[str, torch.nn.Module], images: torch.Tensor, batch: int,
                  threads: int, warmup: int, repeats: int) -> dict:
    """The engine's per-layer table at another batch size: baseline and pruned engines and the
    peak kernel interleaved (as the benchmark does at its headline batch size)."""
    numba.set_num_threads(threads)
    torch.set_num_threads(threads)
    x = batch_of(images, batch)
    engines = {n: PackedModel.from_model(m) for n, m in ms.items()}
    peak = PeakXorPopcount(threads)
    calls: dict[str, list] = {n: [] for n in ms}

    def run(n: str) -> None:
        t: dict[str, float] = {}
        engines[n](x, t)
        calls[n].append({k: 1000 * v for k, v in t.items()})

    fns = {"peak": peak, **{n: (lambda n=n: run(n)) for n in ms}}
    times = time_interleaved(fns, warmup, repeats)
    ops = {n: count_ops(m).to_dict() for n, m in ms.items()}
    layers = layer_summary(ops, {n: c[warmup:] for n, c in calls.items()}, batch,
                           times["peak"], peak.macs)
    layers["ops_ratio"] = ops["baseline"]["total"]["ops"] / ops["pruned"]["total"]["ops"]
    layers["measured_speedup"] = float(np.median(times["baseline"]) / np.median(times["pruned"]))
    layers["measured_vs_predicted"] = layers["measured_speedup"] / layers["predicted_speedup"]
    layers["whole_ms"] = {n: (float(np.median(times[n])), float(np.min(times[n]))) for n in ms}
    return {"layers": layers, "config": {"batch_size": batch, "repeats": repeats,
                                         "threads": threads}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint")
    ap.add_argument("--pruned")
    ap.add_argument("--widths", type=int, nargs=3, default=list(FLIP_WIDTHS.values()),
                    help="without --pruned: the baseline cut to these stage widths (blocks.0/2/4;"
                         " default: the flip rule's 24 48 104; 32 24 32 is the -50%% default's)")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--check-images", type=int, default=None,
                    help="test images for the mismatch count (default: the whole test set)")
    ap.add_argument("--layer-batches", type=int, nargs="*", default=[256],
                    help="also the engine-only per-layer table at these batch sizes")
    ap.add_argument("--out", default="reports/metrics/engine-residual.json")
    args = ap.parse_args()
    splits, card = load_prepared("data/prepared")
    test = normalize(splits["test"].images, card["mean"], card["std"])
    ms = models(args.checkpoint, args.pruned, list(test.shape[1:]),
                dict(zip(FLIP_WIDTHS, args.widths, strict=True)))
    print("load before:", os.getloadavg(), "channels:",
          {n: m.config["channels"] for n, m in ms.items()})
    with tempfile.TemporaryDirectory() as tmp:
        paths = {n: Path(tmp) / f"{n}.onnx" for n in ms}
        for n, m in ms.items():
            export_onnx(m, card, paths[n], ExportConfig())
        result = run_benchmark(ms, test, args.batch_sizes[0], args.threads, args.warmup,
                               args.repeats, check_images=test[:args.check_images],
                               batch_sizes=args.batch_sizes,
                               onnx={n: session(p, args.threads, spinning=False)
                                     for n, p in paths.items()})
    result["load_after"] = list(os.getloadavg())
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print("load:", result["machine"]["load_average_before"], "->", result["load_after"])
    print("\n| batch | backend | baseline ms (min) | pruned ms (min) | speedup (of min) | "
          "work ratio | share |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for batch, rows in result["by_batch"].items():
        for b, r in rows.items():
            print(f"| {batch.removeprefix('batch_')} | {b} | {r['baseline_ms']:.2f} "
                  f"({r['baseline_ms_min']:.2f}) | {r['pruned_ms']:.2f} ({r['pruned_ms_min']:.2f})"
                  f" | {r['speedup']:.3f} ({r['speedup_of_min_ms']:.3f}) | {r['work_ratio']:.3f}"
                  f" | {r['share_of_work_ratio']:.2f} |")
    print("\n| batch | model | engine vs torch float: median (min) | vs onnxruntime |")
    print("|---:|---|---:|---:|")
    for batch, per in result["engine_vs"].items():
        for name, v in per.items():
            print(f"| {batch.removeprefix('batch_')} | {name} | {v['torch_float']:.1f}x "
                  f"({v['torch_float_of_min_ms']:.1f}x) | {v.get('onnxruntime', 0):.1f}x "
                  f"({v.get('onnxruntime_of_min_ms', 0):.1f}x) |")
    print("\nprediction mismatches vs torch:",
          {n: (r["mismatches"], r["images"], f"{r['max_abs_logit_diff']:.2e}")
           for n, r in result["prediction_mismatches"].items()})
    print()
    print(layer_table_md(result))
    result["layers_by_batch"] = {}
    for bs in args.layer_batches:
        extra = engine_layers(ms, test, bs, args.threads, args.warmup, args.repeats)
        result["layers_by_batch"][bs] = extra
        print(f"\nengine only, batch {bs}: whole-model ms median (min) "
              f"{extra['layers']['whole_ms']}, load {os.getloadavg()}")
        print(layer_table_md(extra))
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
