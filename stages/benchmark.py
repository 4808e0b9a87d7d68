"""benchmark: latency / throughput of the baseline and the pruned fine-tuned model per backend,
side by side in interleaved rounds (torch float, onnxruntime on the exported models, the packed
CPU engine; Triton CUDA skipped with a reason when unavailable), and the packed engine's
prediction parity with torch on the full test set. A model the engines cannot run is timed on
the others, the engines recorded as skipped with the module and op that stopped them."""

import hashlib
from pathlib import Path

from bnnprune.cli import run_stage
from bnnprune.core.files import save_csv, save_json
from bnnprune.models import load_checkpoint
from bnnprune.pipeline.benchmark import (
    BACKENDS,
    flat_metrics,
    latency_rows,
    layer_table_md,
    run_benchmark,
)
from bnnprune.pipeline.config import as_dict, load_params
from bnnprune.pipeline.data import load_prepared, normalize
from bnnprune.pipeline.export import session
from bnnprune.pipeline.tracking import log_artifacts, log_metrics, stage_run
from bnnprune.pipeline.train import fingerprint

MODELS = {"baseline": "models/baseline.pt", "pruned": "models/finetuned.pt"}
ONNX = {"baseline": "models/baseline.onnx", "pruned": "models/model.onnx"}
METRICS, PLOT = "reports/metrics/benchmark.json", "reports/plots/benchmark_latency.csv"


def file_digest(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def main() -> None:
    params = load_params()
    cfg = params.benchmark
    models = {name: load_checkpoint(path)[0].eval() for name, path in MODELS.items()}
    splits, card = load_prepared("data/prepared")
    test = normalize(splits["test"].images, card["mean"], card["std"])
    groups = {"benchmark": cfg}
    digest = fingerprint(as_dict(cfg), {p: file_digest(p) for p in [*MODELS.values(),
                                                                    *ONNX.values()]})
    sessions = {n: session(p, cfg.threads, spinning=False) for n, p in ONNX.items()}
    with stage_run("benchmark", groups, digest):
        result = run_benchmark(models, test, cfg.batch_size, cfg.threads, cfg.warmup,
                               cfg.repeats, batch_sizes=cfg.latency_batch_sizes, onnx=sessions)
        result["model_paths"] = {n: [MODELS[n], ONNX[n]] for n in MODELS}
        save_json(METRICS, result)
        save_csv(PLOT, latency_rows(result))
        log_metrics(flat_metrics(result))
        log_artifacts(METRICS, PLOT)
    for name, m in result["models"].items():
        for b in (b for b in BACKENDS if b in m):
            r = m[b]
            print(f"benchmark: {name:8s} {b:11s} {r['latency_ms_median']:8.2f} ms/batch "
                  f"[{r['latency_ms_min']:.2f}, {r['latency_ms_max']:.2f}]  "
                  f"{r['throughput_ips']:9.0f} img/s")
    bvf = result["bnn_vs_float"]
    packed = (f"packed vs float {bvf['baseline']:.2f}x (baseline) {bvf['pruned']:.2f}x (pruned)"
              if bvf["speedup"] is not None else "packed engine skipped")
    print(f"benchmark: speedup pruned/baseline {result['speedup']}, OPs ratio "
          f"{result['ops_ratio']:.3f}; {packed}; mismatches "
          f"{ {n: r['mismatches'] for n, r in result['prediction_mismatches'].items()} }; "
          f"skipped {result['skipped']}; load {result['machine']['load_average']}")
    for batch, rows in result["by_batch"].items():
        for b, r in rows.items():
            print(f"benchmark: {batch:9s} {b:11s} {r['baseline_ms']:8.2f} -> {r['pruned_ms']:8.2f} "
                  f"ms  speedup {r['speedup']:.2f}x (min {r['speedup_of_min_ms']:.2f}x) = "
                  f"{r['share_of_work_ratio']:.2f} of its work ratio {r['work_ratio']:.3f}")
    if "layers" in result:  # the packed engine ran
        print(layer_table_md(result))


if __name__ == "__main__":
    run_stage(main)
