"""Whole-model latency/throughput of the baseline and the pruned model per inference backend.

Backends
  torch_float  the model as trained (±1 values in float32), torch CPU
  packed_cpu   `engine.PackedModel` (bit-packed numba XNOR-popcount kernels)
  triton_cuda  `triton_engine.TritonModel` (Triton XNOR-popcount kernels) on the CUDA GPU, when
               torch sees one; each timed call ends with `torch.cuda.synchronize()`, so it
               measures the finished batch (input already on the GPU, logits left there). Without
               a GPU, or with TRITON_INTERPRET=1, it is skipped with the reason: interpreter
               timings are not speeds, so none are reported.

Every (model, backend) pair is timed in one interleaved loop: after `warmup` calls of each,
each round calls every pair once in a rotating order, so machine noise hits all alike (the
Triton engines are called once before, so compiling and autotuning are never timed). Reported
per pair: median / min / max / quartiles of ms per batch and images/s at the median.
Prediction mismatches against the torch model on the CPU are counted per engine backend.
Speedups are latency ratios baseline / pruned (> 1: the pruned model is faster), the report's
convention; `backends` holds the per-backend view `report.py` and `gate.py` read
(keys `cpu` = packed_cpu, `torch` = torch_float, `triton` = triton_cuda).

The bit-packed engines (packed_cpu, triton_cuda) run chain BNNs (cnn, nin, alexnet) and residual
BNNs built from Bi-Real blocks (birealnet, users' models of the same blocks: `engines.residual`).
Whether they can run a model is decided in one place, the engine's `from_model`: a model with a
block they cannot run raises `EngineUnsupported` naming the module and op, and here both engines
are then skipped with that reason (`skipped`, and `unsupported_model: true` in their `backends`
entry) and only torch float (and onnxruntime) is timed; no per-layer table, no engine checks.

onnxruntime: given sessions of the exported models (`onnx`: {"baseline": session, "pruned":
session}, made with `export.session(path, threads, spinning=False)`), they are timed in the same
interleaved rounds as torch float and the engines, at every batch size (the graph takes [0, 1]
images and normalises inside; it is fed the normalised batch, which costs the same).
`engine_vs` holds, per batch size and model, the packed engine's speed over torch float and over
onnxruntime (ratio of the medians and of the minimums of the same rounds).

Per layer (`layers`): every timed packed-engine call also clocks each layer (`engine(x, times)`:
stem, binary blocks with their im2col / pooling / packing, and the head + classifier as
`classifier`), so the layer times come from the same interleaved rounds as the whole-model
times. Each layer's work w_l is its MACs from `ops.count_ops` (BOPs of a binary layer, FLOPs
of a float one). The predicted speedup is the one the pruned model would get if every layer's
time followed its own work,
    predicted = sum_l t_l / sum_l t_l * (w'_l / w_l)       (t_l: baseline median ms in layer l),
reported next to the measured one and the OPs ratio. The machine's peak XOR-popcount rate
(`bench_kernels.PeakXorPopcount`) is timed in the same rounds; each binary layer's achieved
binary MACs/s (its BOPs x batch / its time) is given as a % of it.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Callable
from typing import Any

import numba
import numpy as np
import torch
from torch import nn

from bnnprune.core.ops import count_ops
from bnnprune.engines.bench_kernels import PeakXorPopcount
from bnnprune.engines.packed import PackedModel
from bnnprune.engines.residual import EngineUnsupported
from bnnprune.engines.timing import time_interleaved
from bnnprune.pipeline.tracking import layer_segment

BACKENDS = ("torch_float", "packed_cpu", "triton_cuda")
REPORT_KEYS = {"packed_cpu": "cpu", "torch_float": "torch", "triton_cuda": "triton"}
ENGINES = {"packed_cpu": "packed engine", "triton_cuda": "Triton engine"}
ONNX = "onnxruntime"
TIMED = ("torch_float", ONNX, "packed_cpu", "triton_cuda")  # every backend that may be timed
BY_BATCH_BACKENDS = ("torch_float", ONNX, "packed_cpu")
TRITON_DEVICE = "cuda"
ONNX_INPUT = "images"  # the exported graph's input (`export.INPUT`)


def batch_key(batch_size: int) -> str:
    """The key of a batch size in the JSON results: 64 -> "batch_64"."""
    return f"batch_{batch_size}"


def batch_size_of(key: str) -> int:
    """The batch size of a `batch_key`: "batch_64" -> 64."""
    return int(key.removeprefix("batch_"))


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def load_average() -> list[float]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return []


def machine_info(threads: int) -> dict[str, Any]:
    cuda = torch.cuda.is_available()
    return {"cpu": cpu_model(), "cpu_count": os.cpu_count(), "threads": threads,
            "torch_threads": torch.get_num_threads(), "numba_threads": numba.get_num_threads(),
            "load_average": load_average(), "gpu": torch.cuda.get_device_name(0) if cuda else None,
            "torch": torch.__version__, "numba": numba.__version__,
            "python": platform.python_version()}


def skipped_backends() -> dict[str, str]:
    """Backends that cannot be timed here, with the reason."""
    if not torch.cuda.is_available():
        return {"triton_cuda": "no CUDA GPU (torch.cuda.is_available() is False); Triton "
                               "interpreter timings on CPU are not speeds"}
    from bnnprune.engines.kernels import triton_kernels  # imports triton: only with a GPU

    if triton_kernels.INTERPRET:
        return {"triton_cuda": "TRITON_INTERPRET=1 was set when the Triton kernels were "
                               "imported; interpreter timings are not speeds"}
    return {}


def build_engines(models: dict[str, nn.Module], build: Callable[[nn.Module], Any]
                  ) -> tuple[dict[str, Any], str | None]:
    """An engine per model (`build`: the engine's `from_model`), or none and the reason when one
    of the models has a block the engine cannot run (`EngineUnsupported`: module and op)."""
    try:
        return {name: build(m) for name, m in models.items()}, None
    except EngineUnsupported as e:
        return {}, str(e)


def model_channels(model: nn.Module) -> list[int]:
    """The model's widths: its config's `channels` (chain: per block, birealnet: per stage),
    else (a user's model) each binary layer's output channels."""
    config = getattr(model, "config", None)
    if isinstance(config, dict) and "channels" in config:
        return list(config["channels"])
    return [r["out_channels"] for r in count_ops(model).layers if r["binary"]]


def predicted_speedup(base_ms: dict[str, float], work_ratio: dict[str, float]) -> float:
    """sum_l t_l / sum_l t_l * r_l: the speedup if every layer's time scaled with its work;
    base_ms: baseline time per layer, work_ratio: w'_l / w_l (pruned / baseline MACs)."""
    return sum(base_ms.values()) / sum(t * work_ratio[name] for name, t in base_ms.items())


def layer_summary(ops: dict[str, dict[str, Any]], layer_ms: dict[str, list[dict[str, float]]],
                  batch_size: int, peak_ms: list[float], peak_macs: int) -> dict[str, Any]:
    """Per-layer view of the packed engine, baseline vs pruned.

    ops: {"baseline": count_ops(...), "pruned": ...}; layer_ms: per model, one {layer: ms} dict
    per timed call; peak_ms: the peak kernel's ms per call doing `peak_macs` binary MACs."""
    peak = {"median": peak_macs / (float(np.median(peak_ms)) / 1000),
            "max": peak_macs / (float(np.min(peak_ms)) / 1000), "macs_per_call": peak_macs}
    stats = {model: {name: (float(np.median([c[name] for c in calls])),
                            float(np.min([c[name] for c in calls]))) for name in calls[0]}
             for model, calls in layer_ms.items()}
    rows, base_ms, ratios = [], {}, {}
    pruned_rows = {r["name"]: r for r in ops["pruned"]["layers"]}
    for r in ops["baseline"]["layers"]:
        name, pr = r["name"], pruned_rows[r["name"]]
        w, w2 = r["bops"] + r["flops"], pr["bops"] + pr["flops"]
        (tb, tb_min), (tp, tp_min) = stats["baseline"][name], stats["pruned"][name]
        base_ms[name], ratios[name] = tb, (w2 / w if w else 1.0)
        row = {"name": name, "kind": r["kind"], "binary": r["binary"],
               "channels": [r["out_channels"], pr["out_channels"]], "macs_baseline": w,
               "macs_pruned": w2, "work_ratio": ratios[name], "baseline_ms": tb,
               "baseline_ms_min": tb_min, "pruned_ms": tp, "pruned_ms_min": tp_min,
               "time_ratio": tp / tb, "speedup": tb / tp,
               "share_of_work_ratio": (tb / tp) * ratios[name]}
        if r["binary"]:
            for model, macs, t, t_min in (("baseline", w, tb, tb_min), ("pruned", w2, tp, tp_min)):
                rate = macs * batch_size / (t / 1000)
                row[f"{model}_macs_per_s"] = rate
                row[f"{model}_pct_of_peak"] = 100 * rate / peak["median"]
                row[f"{model}_pct_of_peak_best"] = 100 * macs * batch_size / (t_min / 1000) \
                    / peak["max"]
        rows.append(row)
    base_total = sum(base_ms.values())
    pruned_total = sum(stats["pruned"][name][0] for name in base_ms)
    for row in rows:
        row["baseline_share_of_time"] = row["baseline_ms"] / base_total
    return {"peak_binary_macs_per_s": peak, "rows": rows,
            "baseline_ms_sum": base_total, "pruned_ms_sum": pruned_total,
            "speedup_of_layer_sums": base_total / pruned_total,
            "predicted_speedup": predicted_speedup(base_ms, ratios)}


def summarize(ms: list[float], batch_size: int) -> dict[str, float]:
    a = np.asarray(ms)
    med = float(np.median(a))
    return {"latency_ms_median": med, "latency_ms_min": float(a.min()),
            "latency_ms_max": float(a.max()), "latency_ms_p25": float(np.percentile(a, 25)),
            "latency_ms_p75": float(np.percentile(a, 75)),
            "throughput_ips": batch_size / med * 1000}


@torch.no_grad()
def prediction_mismatches(model: nn.Module, engine: Callable[[torch.Tensor], torch.Tensor],
                          images: torch.Tensor, batch_size: int = 500) -> dict[str, float]:
    """Images whose engine argmax differs from the torch model's, and the max |logit diff|;
    `engine` maps a CPU batch to CPU logits."""
    mismatches, max_diff = 0, 0.0
    for i in range(0, len(images), batch_size):
        x = images[i:i + batch_size]
        ref, got = model(x), engine(x)
        mismatches += int((ref.argmax(1) != got.argmax(1)).sum())
        max_diff = max(max_diff, float((ref - got).abs().max()))
    return {"images": len(images), "mismatches": mismatches, "max_abs_logit_diff": max_diff}


def run_benchmark(models: dict[str, nn.Module], images: torch.Tensor, batch_size: int,
                  threads: int, warmup: int, repeats: int,
                  check_images: torch.Tensor | None = None,
                  batch_sizes: list[int] | None = None,
                  onnx: dict[str, Any] | None = None) -> dict[str, Any]:
    """models: {"baseline": model, "pruned": model} in eval mode (any model; an engine that
    cannot run it is skipped with the reason its `from_model` gives); images: normalised
    float32 (N, C, H, W), the first `batch_size` are timed; `check_images` (default `images`)
    are run through both torch and each engine that ran to count prediction mismatches;
    `batch_sizes`: the whole-model latency table (`by_batch`) at these too; `onnx`: onnxruntime
    sessions of the models (`export.session(path, threads, spinning=False)`), timed in the same
    rounds. Thread counts are restored afterwards."""
    saved = torch.get_num_threads(), numba.get_num_threads()
    try:
        sessions = dict(onnx or {})
        result, engines = _run(models, images, batch_size, threads, warmup, repeats,
                               check_images, sessions)
        result["by_batch"] = by_batch(models, engines, images, batch_sizes or [batch_size],
                                      result, warmup, repeats, sessions)
        result["engine_vs"] = engine_vs(result["by_batch"])
        return result
    finally:
        torch.set_num_threads(saved[0])
        numba.set_num_threads(saved[1])


def _run(models: dict[str, nn.Module], images: torch.Tensor, batch_size: int, threads: int,
         warmup: int, repeats: int, check_images: torch.Tensor | None,
         sessions: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The result at `batch_size`, and the packed engines it built (for `by_batch`; none when
    the packed engine was skipped)."""
    if threads > 0:
        torch.set_num_threads(threads)
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    x = images[:batch_size].contiguous()
    batch = len(x)
    skipped = skipped_backends()
    model_skips: dict[str, str] = {}  # the engine cannot run the model: its reason
    engines, why = build_engines(models, PackedModel.from_model)
    if why:
        model_skips["packed_cpu"] = f"{ENGINES['packed_cpu']}: {why}"
    triton_engines: dict[str, Any] = {}
    if "triton_cuda" not in skipped:
        from bnnprune.engines.triton_engine import TritonModel  # imports triton: only with a GPU

        device = torch.device(TRITON_DEVICE)
        triton_engines, why = build_engines(models, lambda m: TritonModel.from_model(m, device))
        if why:
            model_skips["triton_cuda"] = f"{ENGINES['triton_cuda']}: {why}"
        else:
            x_dev = x.to(device)
    skipped.update(model_skips)
    packed = "packed_cpu" not in skipped

    peak = PeakXorPopcount(numba.get_num_threads()) if packed else None
    fns: dict[str, Callable[[], Any]] = {"peak_xor_popcount": peak} if peak else {}
    layer_ms: dict[str, list[dict[str, float]]] = {name: [] for name in engines}
    for name, m in models.items():
        def run_torch(m=m):
            with torch.no_grad():
                return m(x)

        fns[f"{name}/torch_float"] = run_torch
        if name in sessions:
            feed = {ONNX_INPUT: x.numpy()}
            fns[f"{name}/{ONNX}"] = lambda s=sessions[name], feed=feed: s.run(None, feed)
        if name in engines:
            def run_packed(e=engines[name], calls=layer_ms[name]):
                seconds: dict[str, float] = {}
                out = e(x, seconds)
                calls.append({layer: 1000 * s for layer, s in seconds.items()})
                return out
            fns[f"{name}/packed_cpu"] = run_packed
        if name in triton_engines:
            def run_triton(e=triton_engines[name]):
                out = e(x_dev)
                torch.cuda.synchronize()  # kernels run asynchronously: wait for the batch
                return out
            run_triton()  # compile and autotune for this shape outside the timed loop
            fns[f"{name}/triton_cuda"] = run_triton
    load_before = load_average()
    times = time_interleaved(fns, warmup, repeats)
    machine = machine_info(threads)
    machine["load_average_before"] = load_before
    ran = [b for b in TIMED if b not in skipped and (b != ONNX or sessions)]

    per_model = {}
    ops_by_model = {name: count_ops(m).to_dict() for name, m in models.items()}
    for name, m in models.items():
        ops = ops_by_model[name]["total"]
        per_model[name] = {"channels": model_channels(m), "ops": ops["ops"],
                           "bops": ops["bops"], "flops": ops["flops"],
                           **{b: summarize(times[f"{name}/{b}"], batch) for b in ran}}
    base, pruned = per_model["baseline"], per_model["pruned"]
    med = lambda m, b: m[b]["latency_ms_median"]  # noqa: E731
    speedup = {b: med(base, b) / med(pruned, b) for b in ran}
    ops_ratio = base["ops"] / pruned["ops"]
    macs = {n: m["bops"] + m["flops"] for n, m in per_model.items()}  # what torch executes
    work_ratio = {b: macs["baseline"] / macs["pruned"] if b in ("torch_float", ONNX)
                  else ops_ratio for b in ran}
    checks = check_images if check_images is not None else images
    mism_by_backend: dict[str, dict[str, dict[str, float]]] = {}
    layers: dict[str, Any] | None = None  # the packed engine's per-layer view, when it ran
    bnn_vs_float: dict[str, Any] = {"speedup": None, "reason": skipped.get("packed_cpu")}
    if peak is not None:  # the packed engine ran
        layers = layer_summary(ops_by_model,
                               {n: calls[warmup:] for n, calls in layer_ms.items()},
                               batch, times["peak_xor_popcount"], peak.macs)
        layers["ops_ratio"] = ops_ratio
        layers["measured_speedup"] = speedup["packed_cpu"]
        layers["measured_vs_predicted"] = speedup["packed_cpu"] / layers["predicted_speedup"]
        ratios = {name: m["packed_cpu"]["throughput_ips"] / m["torch_float"]["throughput_ips"]
                  for name, m in per_model.items()}
        bnn_vs_float = {**ratios, "speedup": ratios["pruned"],
                        "packed_ms": med(pruned, "packed_cpu"),
                        "float_ms": med(pruned, "torch_float")}
        mism_by_backend["packed_cpu"] = {
            name: prediction_mismatches(models[name], engines[name], checks) for name in models}
    if triton_engines:
        mism_by_backend["triton_cuda"] = {
            name: prediction_mismatches(models[name],
                                        lambda b, e=e: e(b.to(e.device)).cpu(), checks)
            for name, e in triton_engines.items()}
    backends: dict[str, dict[str, Any]] = {}
    for b in BACKENDS:
        if b in skipped:
            backends[REPORT_KEYS[b]] = {"backend": b, "speedup": None, "reason": skipped[b],
                                        **({"unsupported_model": True} if b in model_skips
                                           else {})}
        else:
            backends[REPORT_KEYS[b]] = {
                "backend": b, "baseline_ms": med(base, b), "pruned_ms": med(pruned, b),
                "speedup": speedup[b],  # of the medians; of the minimums (what the gate checks:
                # the least disturbed by other jobs on a shared machine) below
                "speedup_of_min_ms": base[b]["latency_ms_min"] / pruned[b]["latency_ms_min"]}
    result = {
        "config": {"batch_size": batch, "threads": threads, "warmup": warmup,
                   "repeats": repeats},
        "machine": machine,
        "models": per_model,
        "speedup": speedup,
        "ops_ratio": ops_ratio,
        "speedup_vs_ops_ratio": {b: s / ops_ratio for b, s in speedup.items()},
        "work_ratio": work_ratio,  # OPs for the binary engines, MACs for torch float
        "speedup_vs_work_ratio": {b: s / work_ratio[b] for b, s in speedup.items()},
        "bnn_vs_float": bnn_vs_float,
        "skipped": skipped,
        "prediction_mismatches": mism_by_backend.get("packed_cpu", {}),  # packed_cpu, as before
        "prediction_mismatches_by_backend": mism_by_backend,
        "backends": backends,
    }
    if layers is not None:
        result["layers"] = layers
    return result, engines


def batch_of(images: torch.Tensor, batch_size: int) -> torch.Tensor:
    """The first `batch_size` images, repeated when there are fewer."""
    return images.repeat(-(-batch_size // len(images)), 1, 1, 1)[:batch_size].contiguous()


def by_batch(models: dict[str, nn.Module], engines: dict[str, Any],
             images: torch.Tensor, batch_sizes: list[int], result: dict[str, Any], warmup: int,
             repeats: int, sessions: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """Baseline vs pruned whole-model latency of torch float and the packed engine (when it
    ran: `engines` is empty when it was skipped) at each batch size, interleaved per batch
    size: {"batch_<b>": {backend: row}}, a row holding median and min ms of both models, the
    speedup of the medians and of the minimums, the work ratio the backend executes (MACs for
    torch float, OPs for the engine) and the speedup's share of it. The headline batch size
    reuses `result`'s rounds instead of timing again; `engines`: the packed engines `_run`
    built for `models`; `sessions`: onnxruntime sessions of the models, when given."""
    sessions = sessions or {}
    backends = [b for b in BY_BATCH_BACKENDS if b not in result["skipped"]
                and (b != ONNX or sessions)]
    out: dict[str, dict[str, Any]] = {}
    for bs in batch_sizes:
        if bs == result["config"]["batch_size"]:
            stats = {f"{n}/{b}": m[b] for n, m in result["models"].items() for b in backends}
        else:
            x = batch_of(images, bs)
            fns: dict[str, Callable[[], Any]] = {}
            for name, m in models.items():
                fns[f"{name}/torch_float"] = lambda m=m, x=x: m(x)
                if name in sessions:
                    feed = {ONNX_INPUT: x.numpy()}
                    fns[f"{name}/{ONNX}"] = lambda s=sessions[name], f=feed: s.run(None, f)
                if name in engines:
                    fns[f"{name}/packed_cpu"] = lambda e=engines[name], x=x: e(x)
            with torch.no_grad():
                times = time_interleaved(fns, warmup, repeats)
            stats = {k: summarize(v, bs) for k, v in times.items()}
        rows: dict[str, Any] = {}
        for b in backends:
            base, pruned = stats[f"baseline/{b}"], stats[f"pruned/{b}"]
            speedup = base["latency_ms_median"] / pruned["latency_ms_median"]
            ratio = result["work_ratio"][b]
            rows[b] = {"baseline_ms": base["latency_ms_median"],
                       "baseline_ms_min": base["latency_ms_min"],
                       "pruned_ms": pruned["latency_ms_median"],
                       "pruned_ms_min": pruned["latency_ms_min"], "speedup": speedup,
                       "speedup_of_min_ms": base["latency_ms_min"] / pruned["latency_ms_min"],
                       "work_ratio": ratio, "share_of_work_ratio": speedup / ratio}
        out[batch_key(bs)] = rows
    return out


def engine_vs(by_batch_rows: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per batch size and model, the packed engine's speed over each other backend timed in the
    same rounds: {"batch_64": {"baseline": {"torch_float": x, "torch_float_of_min_ms": x,
    "onnxruntime": ...}, "pruned": ...}}; empty where the engine did not run."""
    out: dict[str, dict[str, Any]] = {}
    for batch, rows in by_batch_rows.items():
        if "packed_cpu" not in rows:
            continue
        eng = rows["packed_cpu"]
        out[batch] = {model: {k: v for b in rows if b != "packed_cpu" for k, v in (
            (b, rows[b][f"{model}_ms"] / eng[f"{model}_ms"]),
            (f"{b}_of_min_ms", rows[b][f"{model}_ms_min"] / eng[f"{model}_ms_min"]))}
            for model in ("baseline", "pruned")}
    return out


def latency_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows for the plot CSV: one per (backend, model) that ran."""
    return [{"label": f"{b}: {name}", "backend": b, "model": name,
             "latency_ms_median": r["latency_ms_median"], "latency_ms_min": r["latency_ms_min"],
             "latency_ms_max": r["latency_ms_max"], "throughput_ips": r["throughput_ips"]}
            for name, m in result["models"].items() for b in TIMED if b in m
            for r in [m[b]]]


def flat_metrics(result: dict[str, Any]) -> dict[str, float]:
    """Scalar metrics for MLflow, by the naming rule (`tracking.METRIC_NAME`): per model and
    backend `<model>/<backend>/latency_ms_b<batch>`, `speedup/<backend>_b<batch>`, per layer
    `layer/<layer>/<model>_ms_b<batch>`."""
    b_ = f"_b{result['config']['batch_size']}"
    out: dict[str, float] = {"ops_ratio": result["ops_ratio"]}
    for name, m in result["models"].items():
        for b in TIMED:
            if b in m:
                out[f"{name}/{b}/latency_ms{b_}"] = m[b]["latency_ms_median"]
                out[f"{name}/{b}/images_per_s{b_}"] = m[b]["throughput_ips"]
        if name in result["bnn_vs_float"]:  # the packed engine ran
            out[f"{name}/packed_vs_float_speedup{b_}"] = result["bnn_vs_float"][name]
        for b, mm in result.get("prediction_mismatches_by_backend",
                                {"packed_cpu": result["prediction_mismatches"]}).items():
            out[f"{name}/{b}/prediction_mismatches"] = mm[name]["mismatches"]
    for b, s in result["speedup"].items():
        out[f"speedup/{b}{b_}"] = s
        out[f"speedup_vs_ops_ratio/{b}{b_}"] = result["speedup_vs_ops_ratio"][b]
    layers = result.get("layers")
    if layers:
        for key in ("predicted_speedup", "measured_vs_predicted"):
            out[f"packed_cpu/{key}{b_}"] = layers[key]
        out["peak_binary_macs_per_s"] = layers["peak_binary_macs_per_s"]["median"]
        for row in layers["rows"]:
            layer = layer_segment(row["name"])
            out[f"layer/{layer}/baseline_ms{b_}"] = row["baseline_ms"]
            out[f"layer/{layer}/pruned_ms{b_}"] = row["pruned_ms"]
            if row["binary"]:
                out[f"layer/{layer}/baseline_pct_of_peak"] = row["baseline_pct_of_peak"]
    for batch, rows in result.get("by_batch", {}).items():
        bb = f"_b{batch_size_of(batch)}"
        for b, r in rows.items():
            out[f"baseline/{b}/latency_ms{bb}"] = r["baseline_ms"]
            out[f"pruned/{b}/latency_ms{bb}"] = r["pruned_ms"]
            out[f"speedup/{b}{bb}"] = r["speedup"]
            out[f"speedup_vs_work_ratio/{b}{bb}"] = r["share_of_work_ratio"]
    for batch, per_model in result.get("engine_vs", {}).items():
        bb = f"_b{batch_size_of(batch)}"
        for name, ratios in per_model.items():
            for b, v in ratios.items():
                if not b.endswith("_of_min_ms"):
                    out[f"{name}/packed_vs_{b}{bb}"] = v
    return out


def layer_table_md(benchmark_json: dict[str, Any]) -> str:
    """Markdown: the packed engine's time per layer, baseline vs pruned, with each layer's work
    ratio and binary layers' % of the peak XOR-popcount rate, then the predicted-vs-measured
    speedup line. `benchmark_json`: the content of reports/metrics/benchmark.json."""
    layers = benchmark_json["layers"]
    peak = layers["peak_binary_macs_per_s"]
    batch = benchmark_json["config"]["batch_size"]
    lines = [f"Packed CPU engine per layer, batch {batch}, median ms over "
             f"{benchmark_json['config']['repeats']} interleaved rounds (min in brackets); "
             f"peak XOR-popcount rate {peak['median'] / 1e12:.2f} T binary MACs/s "
             f"(best {peak['max'] / 1e12:.2f}) on {benchmark_json['config']['threads']} threads.",
             "",
             "| layer | channels | MACs base | MACs ratio | base ms | pruned ms | time ratio "
             "| share of base time | % of peak base | % of peak pruned |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in layers["rows"]:
        kind = ("binary " if r["binary"] else "float ") + r["kind"]
        pct = [f"{r[f'{m}_pct_of_peak']:.0f}% ({r[f'{m}_pct_of_peak_best']:.0f}%)"
               if r["binary"] else "-" for m in ("baseline", "pruned")]
        lines.append(
            f"| {r['name']} ({kind}) | {r['channels'][0]} -> {r['channels'][1]} "
            f"| {r['macs_baseline']:,} | {r['work_ratio']:.3f} "
            f"| {r['baseline_ms']:.3f} [{r['baseline_ms_min']:.3f}] "
            f"| {r['pruned_ms']:.3f} [{r['pruned_ms_min']:.3f}] | {r['time_ratio']:.3f} "
            f"| {100 * r['baseline_share_of_time']:.1f}% | {pct[0]} | {pct[1]} |")
    lines += ["", f"Sum of layers: {layers['baseline_ms_sum']:.3f} ms -> "
                  f"{layers['pruned_ms_sum']:.3f} ms ({layers['speedup_of_layer_sums']:.3f}x). "
                  f"Predicted speedup (every layer's time following its own MACs) "
                  f"**{layers['predicted_speedup']:.3f}x**, measured **"
                  f"{layers['measured_speedup']:.3f}x** = {layers['measured_vs_predicted']:.2f} of "
                  f"the prediction; OPs ratio {layers['ops_ratio']:.3f}."]
    return "\n".join(lines)
