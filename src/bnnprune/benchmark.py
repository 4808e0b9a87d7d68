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
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable
from typing import Any

import numba
import numpy as np
import torch

from bnnprune.engine import PackedModel
from bnnprune.models import BNN
from bnnprune.ops import count_ops

BACKENDS = ("torch_float", "packed_cpu", "triton_cuda")
REPORT_KEYS = {"packed_cpu": "cpu", "torch_float": "torch", "triton_cuda": "triton"}
TRITON_DEVICE = "cuda"


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
    from bnnprune.kernels import triton_kernels  # imports triton: only with a GPU

    if triton_kernels.INTERPRET:
        return {"triton_cuda": "TRITON_INTERPRET=1 was set when the Triton kernels were "
                               "imported; interpreter timings are not speeds"}
    return {}


def time_interleaved(fns: dict[str, Callable[[], Any]], warmup: int,
                     repeats: int) -> dict[str, list[float]]:
    """ms per call of each fn; one call of each per round, rotating the order."""
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for i in range(len(names)):
            n = names[(r + i) % len(names)]
            start = time.perf_counter()
            fns[n]()
            times[n].append(1000 * (time.perf_counter() - start))
    return times


def summarize(ms: list[float], batch_size: int) -> dict[str, float]:
    a = np.asarray(ms)
    med = float(np.median(a))
    return {"latency_ms_median": med, "latency_ms_min": float(a.min()),
            "latency_ms_max": float(a.max()), "latency_ms_p25": float(np.percentile(a, 25)),
            "latency_ms_p75": float(np.percentile(a, 75)),
            "throughput_ips": batch_size / med * 1000}


@torch.no_grad()
def prediction_mismatches(model: BNN, engine: Callable[[torch.Tensor], torch.Tensor],
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


def run_benchmark(models: dict[str, BNN], images: torch.Tensor, batch_size: int, threads: int,
                  warmup: int, repeats: int, check_images: torch.Tensor | None = None
                  ) -> dict[str, Any]:
    """models: {"baseline": BNN, "pruned": BNN} in eval mode; images: normalised float32
    (N, C, H, W), the first `batch_size` are timed; `check_images` (default `images`) are run
    through both torch and the engine to count prediction mismatches. Thread counts are
    restored afterwards."""
    saved = torch.get_num_threads(), numba.get_num_threads()
    try:
        return _run(models, images, batch_size, threads, warmup, repeats, check_images)
    finally:
        torch.set_num_threads(saved[0])
        numba.set_num_threads(saved[1])


def _run(models: dict[str, BNN], images: torch.Tensor, batch_size: int, threads: int,
         warmup: int, repeats: int, check_images: torch.Tensor | None) -> dict[str, Any]:
    if threads > 0:
        torch.set_num_threads(threads)
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    x = images[:batch_size].contiguous()
    batch = len(x)
    skipped = skipped_backends()
    engines = {name: PackedModel.from_model(m) for name, m in models.items()}
    triton_engines: dict[str, Any] = {}
    if "triton_cuda" not in skipped:
        from bnnprune.triton_engine import TritonModel  # imports triton: only with a GPU

        device = torch.device(TRITON_DEVICE)
        x_dev = x.to(device)
        triton_engines = {name: TritonModel.from_model(m, device) for name, m in models.items()}
    fns: dict[str, Callable[[], Any]] = {}
    for name, m in models.items():
        def run_torch(m=m):
            with torch.no_grad():
                return m(x)
        fns[f"{name}/torch_float"] = run_torch
        fns[f"{name}/packed_cpu"] = lambda e=engines[name]: e(x)
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
    ran = [b for b in BACKENDS if b not in skipped]

    per_model = {}
    for name, m in models.items():
        ops = count_ops(m)["total"]
        per_model[name] = {"channels": list(m.config["channels"]), "ops": ops["ops"],
                           "bops": ops["bops"], "flops": ops["flops"],
                           **{b: summarize(times[f"{name}/{b}"], batch) for b in ran}}
    base, pruned = per_model["baseline"], per_model["pruned"]
    med = lambda m, b: m[b]["latency_ms_median"]  # noqa: E731
    speedup = {b: med(base, b) / med(pruned, b) for b in ran}
    ops_ratio = base["ops"] / pruned["ops"]
    bnn_vs_float = {name: m["packed_cpu"]["throughput_ips"] / m["torch_float"]["throughput_ips"]
                    for name, m in per_model.items()}
    checks = check_images if check_images is not None else images
    mism = {name: prediction_mismatches(models[name], engines[name], checks)
            for name in models}
    mism_by_backend = {"packed_cpu": mism}
    if triton_engines:
        mism_by_backend["triton_cuda"] = {
            name: prediction_mismatches(models[name],
                                        lambda b, e=e: e(b.to(e.device)).cpu(), checks)
            for name, e in triton_engines.items()}
    backends: dict[str, dict[str, Any]] = {}
    for b in BACKENDS:
        if b in skipped:
            backends[REPORT_KEYS[b]] = {"backend": b, "speedup": None, "reason": skipped[b]}
        else:
            backends[REPORT_KEYS[b]] = {"backend": b, "baseline_ms": med(base, b),
                                        "pruned_ms": med(pruned, b), "speedup": speedup[b]}
    return {
        "config": {"batch_size": batch, "threads": threads, "warmup": warmup,
                   "repeats": repeats},
        "machine": machine,
        "models": per_model,
        "speedup": speedup,
        "ops_ratio": ops_ratio,
        "speedup_vs_ops_ratio": {b: s / ops_ratio for b, s in speedup.items()},
        "bnn_vs_float": {**bnn_vs_float, "speedup": bnn_vs_float["pruned"],
                         "packed_ms": med(pruned, "packed_cpu"),
                         "float_ms": med(pruned, "torch_float")},
        "skipped": skipped,
        "prediction_mismatches": mism,  # packed_cpu, as before
        "prediction_mismatches_by_backend": mism_by_backend,
        "backends": backends,
    }


def latency_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows for the plot CSV: one per (backend, model) that ran."""
    return [{"label": f"{b}: {name}", "backend": b, "model": name,
             "latency_ms_median": r["latency_ms_median"], "latency_ms_min": r["latency_ms_min"],
             "latency_ms_max": r["latency_ms_max"], "throughput_ips": r["throughput_ips"]}
            for name, m in result["models"].items() for b in BACKENDS if b in m
            for r in [m[b]]]


def flat_metrics(result: dict[str, Any]) -> dict[str, float]:
    """Scalar metrics for MLflow."""
    out: dict[str, float] = {"ops_ratio": result["ops_ratio"]}
    for name, m in result["models"].items():
        for b in BACKENDS:
            if b in m:
                out[f"{name}_{b}_latency_ms"] = m[b]["latency_ms_median"]
                out[f"{name}_{b}_throughput_ips"] = m[b]["throughput_ips"]
        out[f"{name}_bnn_vs_float"] = result["bnn_vs_float"][name]
        out[f"{name}_prediction_mismatches"] = result["prediction_mismatches"][name]["mismatches"]
        for b, mm in result.get("prediction_mismatches_by_backend", {}).items():
            if b != "packed_cpu":
                out[f"{name}_{b}_prediction_mismatches"] = mm[name]["mismatches"]
    for b, s in result["speedup"].items():
        out[f"speedup_{b}"] = s
        out[f"speedup_vs_ops_ratio_{b}"] = result["speedup_vs_ops_ratio"][b]
    return out
