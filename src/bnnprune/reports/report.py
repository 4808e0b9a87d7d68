"""The pipeline's report: reports/summary.json + summary.md + PNG plots and the headline metrics
(the MLflow summary run and `bnnprune compare` are in bnnprune.tracking.runs).

Units: accuracies are fractions in [0, 1]; reductions are % (100 * (before - after) / before);
accuracy drops are percentage points (100 * (baseline - pruned)); speedups are ratios of
latencies (baseline / pruned; > 1 means the pruned model is faster).
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from torch import nn

from bnnprune.core.errors import UserError
from bnnprune.core.files import load_json, save_csv, save_json, write_atomic
from bnnprune.core.ops import count_ops, reduction_pct
from bnnprune.models import load_checkpoint
from bnnprune.pipeline.benchmark import batch_size_of, layer_table_md
from bnnprune.reports.plots import plot_all
from bnnprune.reports.thresholds import CPU_BACKEND

SUMMARY_JSON, SUMMARY_MD = "reports/summary.json", "reports/summary.md"
METRICS_JSON = "reports/metrics.json"  # the one DVC metrics file: headline_metrics(summary)
PLOTS = {"flip_ratio": "reports/plots/flip_ratio.png", "channels": "reports/plots/channels.png",
         "latency": "reports/plots/latency.png"}
STUDY_PLOT = "reports/plots/study_pareto.png"  # written by the study_summary stage
LATENCY_CSV = "reports/plots/latency.csv"

# input name -> (path, the DVC stage that writes it)
INPUTS = {
    "card": ("data/prepared/card.json", "prepare"),
    "train": ("reports/metrics/train.json", "train"),
    "flip_ratio": ("reports/plots/flip_ratio.csv", "train"),
    "baseline_model": ("models/baseline.pt", "train"),
    "prune": ("reports/metrics/prune.json", "prune"),
    "finetune": ("reports/metrics/finetune.json", "finetune"),
    "pruned_model": ("models/finetuned.pt", "finetune"),
    "benchmark": ("reports/metrics/benchmark.json", "benchmark"),
    "export": ("reports/metrics/export.json", "export"),
    "study": ("reports/metrics/study.json", "study_summary"),
    "study_md": ("reports/study/summary.md", "study_summary"),
}


class ReportError(UserError, ValueError):
    """A missing or malformed input of the report stage."""


# ---- inputs ----------------------------------------------------------------------------------

def _missing(path: Path, stage: str) -> ReportError:
    return ReportError(f"{path}: report input not found; it is written by the {stage!r} stage "
                       f"(run `dvc repro {stage}`, or `dvc repro` for the whole pipeline)")


def read_csv(path: Path) -> list[dict[str, float]]:
    with open(path, newline="") as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def load_inputs(root: str | Path = ".") -> dict[str, Any]:
    """Every input file, loaded; a ReportError names the first missing one and its stage."""
    root = Path(root)
    out: dict[str, Any] = {}
    for name, (rel, stage) in INPUTS.items():
        path = root / rel
        if not path.is_file():
            raise _missing(path, stage)
        try:
            if path.suffix == ".json":
                out[name] = load_json(path)
            elif path.suffix == ".csv":
                out[name] = read_csv(path)
            elif path.suffix == ".md":
                out[name] = path.read_text()
            else:
                out[name] = load_checkpoint(path)[0]
        except ReportError:
            raise
        except Exception as e:
            raise ReportError(f"{path}: cannot read report input ({type(e).__name__}: {e})") \
                from e
    return out


def _get(d: dict, key: str, source: str) -> Any:
    if key not in d:
        raise ReportError(f"{source}: key {key!r} missing (keys: {', '.join(map(str, d))})")
    return d[key]


# ---- summary ---------------------------------------------------------------------------------

def model_costs(model: nn.Module, test_acc: float) -> dict[str, float]:
    total = count_ops(model).total
    return {"test_acc": test_acc, "bops": total["bops"], "flops": total["flops"],
            "ops": total["ops"], "size_bytes": total["size_bytes"]}


def speedups(benchmark: dict, export: dict) -> dict[str, Any]:
    """One pass over the benchmark's backends and onnxruntime's timings (its largest batch size):
    per backend the speedup pruned vs baseline of the medians (`speedup`, None when it did not
    run, with the reason in `unavailable`, and in `skipped` too when the engine cannot run
    this model, e.g. the packed engine on a birealnet) and of the minimums, the batch size, and
    the latency rows {backend, baseline_ms, pruned_ms} of the plot."""
    out: dict[str, Any] = {"speedup": {}, "speedup_of_min_ms": {}, "batch": {},
                           "unavailable": {}, "skipped": {}, "rows": []}
    batch = benchmark.get("config", {}).get("batch_size")
    for backend, r in _get(benchmark, "backends", INPUTS["benchmark"][0]).items():
        out["batch"][backend] = batch
        out["speedup_of_min_ms"][backend] = r.get("speedup_of_min_ms")
        if r.get("speedup") is None:
            out["speedup"][backend] = None
            out["unavailable"][backend] = r.get("reason") or r.get("skipped") or "did not run"
            if r.get("unsupported_model"):
                out["skipped"][backend] = out["unavailable"][backend]
            continue
        out["speedup"][backend] = float(r["speedup"])
        out["rows"].append({"backend": f"{backend} (batch {batch})" if batch else backend,
                            "baseline_ms": r["baseline_ms"], "pruned_ms": r["pruned_ms"]})
    models = _get(export, "models", INPUTS["export"][0])
    key = max(models["pruned"]["latency_ms"], key=batch_size_of)
    out["batch"]["onnxruntime"] = batch_size_of(key)
    out["speedup"]["onnxruntime"] = _get(export, "speedup", INPUTS["export"][0])[key]
    out["rows"].append({"backend": f"onnxruntime (batch {batch_size_of(key)})",
                        "baseline_ms": models["baseline"]["latency_ms"][key],
                        "pruned_ms": models["pruned"]["latency_ms"][key]})
    return out


def latency_by_batch(benchmark: dict, export: dict) -> list[dict[str, Any]]:
    """The speed table: per backend (torch float, packed engine, onnxruntime) and batch size,
    baseline and pruned ms (median and min), the speedup of the medians and of the minimums,
    the work ratio that backend executes and the speedup's share of it (onnxruntime's speedups
    as export.json has them). Benchmarks older than `by_batch` give no torch/engine rows, and
    a skipped engine none of its own."""
    rows = [{"backend": b, "batch": batch_size_of(batch), "work": work, **by[b]}
            for batch, by in benchmark.get("by_batch", {}).items()
            for b, work in (("torch_float", "MACs"), ("packed_cpu", "OPs")) if b in by]
    models = _get(export, "models", INPUTS["export"][0])
    base, pruned = models["baseline"], models["pruned"]
    speedup = _get(export, "speedup", INPUTS["export"][0])
    for key in sorted(pruned["latency_ms"], key=batch_size_of):
        rows.append({"backend": "onnxruntime", "batch": batch_size_of(key), "work": "MACs",
                     "baseline_ms": base["latency_ms"][key],
                     "baseline_ms_min": base.get("latency_ms_min", {}).get(key),
                     "pruned_ms": pruned["latency_ms"][key],
                     "pruned_ms_min": pruned.get("latency_ms_min", {}).get(key),
                     "speedup": speedup[key],
                     "speedup_of_min_ms": export.get("speedup_min", {}).get(key),
                     "work_ratio": export.get("mac_ratio"),
                     "share_of_work_ratio": export.get("speedup_vs_mac_ratio", {}).get(key),
                     "executed_work_ratio": export.get("executed_mac_ratio")})
    return rows


def onnxruntime_convs(export: dict) -> dict[str, Any]:
    """Per model: how many convolutions take onnxruntime's NCHWc path, and the layers whose
    channel counts it pads ({layer: [[in, out], [in, out] executed]}); exports older than
    `executed_convs` give {}."""
    out = {}
    for name, m in _get(export, "models", INPUTS["export"][0]).items():
        if "onnxruntime_convs" in m:
            e = m["onnxruntime_convs"]
            out[name] = {"conv_layers": e["conv_layers"], "nchwc_layers": e["nchwc_layers"],
                         "padded": {k: [v["channels"], v["executed_channels"]]
                                    for k, v in e["layers"].items()
                                    if v["channels"] != v["executed_channels"]}}
    return out


def build_summary(inputs: dict[str, Any], speed: dict[str, Any] | None = None) -> dict[str, Any]:
    """summary.json from the loaded inputs; `speed`: their `speedups`, when already computed."""
    card, prune = inputs["card"], inputs["prune"]
    base_acc = _get(inputs["train"], "test_acc", INPUTS["train"][0])
    pruned_acc = _get(inputs["finetune"], "test_acc", INPUTS["finetune"][0])
    baseline = model_costs(inputs["baseline_model"], base_acc)
    pruned = model_costs(inputs["pruned_model"], pruned_acc)
    speed = speed or speedups(inputs["benchmark"], inputs["export"])
    study = inputs["study"]
    layers = [{"layer": name, "p_l": r.get("p"), "channels_before": r["channels_before"],
               "channels_after": r["channels_after"], "bops_before": r["bops_before"],
               "bops_after": r["bops_after"]}
              for name, r in _get(prune, "layers", INPUTS["prune"][0]).items()]
    parity = {name: m["parity"] for name, m in inputs["export"]["models"].items()}
    return {
        "dataset": card["dataset"],
        "model": {"arch": inputs["baseline_model"].config["arch"],
                  "width": inputs["baseline_model"].config.get("width"),
                  "criterion": _get(prune, "criterion", INPUTS["prune"][0]),
                  "tau": prune.get("tau")},
        "baseline": baseline,
        "pruned": pruned,
        "reduction": {"bops_pct": reduction_pct(baseline["bops"], pruned["bops"]),
                      "ops_pct": reduction_pct(baseline["ops"], pruned["ops"]),
                      "size_pct": reduction_pct(baseline["size_bytes"], pruned["size_bytes"])},
        "acc_drop_pt": 100 * (base_acc - pruned_acc),
        "ops_ratio": baseline["ops"] / pruned["ops"],
        "speedup": speed["speedup"],
        # of the minimum latencies: the least disturbed by other jobs (the gate checks it)
        "speedup_of_min_ms": speed["speedup_of_min_ms"],
        "speedup_batch_size": speed["batch"],
        "speedup_unavailable": speed["unavailable"],
        # backends whose engine cannot run this model (the gate reports their checks skipped)
        "speedup_skipped": speed["skipped"],
        "latency_by_batch": latency_by_batch(inputs["benchmark"], inputs["export"]),
        "onnxruntime_convs": onnxruntime_convs(inputs["export"]),
        "bnn_vs_float": bnn_vs_float(inputs["benchmark"]),
        "study": {"setting": _get(study, "setting", INPUTS["study"][0]),
                  "verdict": _get(study, "verdict", INPUTS["study"][0])},
        "layers": layers,
        "onnx_parity": {name: {k: p.get(k) for k in (
            "images", "prediction_mismatches", "max_abs_logit_diff", "tolerance",
            "images_over_tolerance", "images_over_tolerance_at_sign_threshold", "passed")}
            for name, p in parity.items()},
    }


def bnn_vs_float(benchmark: dict) -> dict[str, Any]:
    """Packed CPU engine vs torch float32 on the same (pruned) model."""
    r = _get(benchmark, "bnn_vs_float", INPUTS["benchmark"][0])
    mismatches = {name: m.get("mismatches") for name, m in
                  benchmark.get("prediction_mismatches", {}).items()}
    return {"speedup": r.get("speedup"), "packed_ms": r.get("packed_ms"),
            "float_ms": r.get("float_ms"), "prediction_mismatches": mismatches}


# ---- markdown and plots ----------------------------------------------------------------------

def _fmt(v: Any, spec: str = ",.0f") -> str:
    return "n/a" if v is None else format(v, spec)


def markdown(s: dict[str, Any], study_md: str = "", layers_md: str = "") -> str:
    """The report; `study_md` (the study_summary stage's Findings and tables) goes first,
    `layers_md` (the packed engine's time per layer) follows the speedups."""
    b, p, red = s["baseline"], s["pruned"], s["reduction"]
    m = s["model"]
    lines = [f"# bnnprune report: {m['arch']} (width {m['width']}) on {s['dataset']}", "",
             study_md.strip(), f"![study]({Path(STUDY_PLOT).relative_to('reports')})", "",
             "## The pipeline's pruned model", "",
             f"The prune stage's own model (criterion `{m['criterion']}`, tau "
             f"{_fmt(m['tau'], 'g')}), fine-tuned, exported and benchmarked below.", "",
             "## Baseline vs pruned", "",
              "| | test acc | BOPs | FLOPs (MACs) | OPs | size (bytes) |",
              "|---|---:|---:|---:|---:|---:|"]
    for name, r in (("baseline", b), (f"pruned ({m['criterion']}, tau {_fmt(m['tau'], 'g')})", p)):
        lines.append(f"| {name} | {r['test_acc']:.4f} | {r['bops']:,.0f} | {r['flops']:,.0f} | "
                     f"{r['ops']:,.0f} | {r['size_bytes']:,.0f} |")
    lines.append(f"| reduction | drop {s['acc_drop_pt']:.2f} pt | {red['bops_pct']:.1f}% | | "
                 f"{red['ops_pct']:.1f}% | {red['size_pct']:.1f}% |")
    lines += ["", "## Per binary layer", "",
              "| layer | channels before | channels after | p_l | BOPs before | BOPs after |",
              "|---|---:|---:|---:|---:|---:|"]
    for r in s["layers"]:
        lines.append(f"| {r['layer']} | {r['channels_before']} | {r['channels_after']} | "
                     f"{_fmt(r['p_l'], '.3f')} | {r['bops_before']:,} | {r['bops_after']:,} |")
    ratio = s["ops_ratio"]
    lines += ["", "## Speedup, pruned vs baseline", "",
              f"OPs ratio baseline / pruned: {ratio:.3f} (what pruning could buy if latency "
              f"followed OPs).", "", "| backend | speedup | share of OPs ratio | note |",
              "|---|---:|---:|---|"]
    for backend, v in s["speedup"].items():
        note = s["speedup_unavailable"].get(backend, "")
        share = _fmt(None if v is None else v / ratio, ".2f")
        lines.append(f"| {backend} | {_fmt(v, '.2f')}{'x' if v is not None else ''} | {share} "
                     f"| {note} |")
    if s.get("latency_by_batch"):
        lines += ["", "Per backend and batch size (median ms, min in brackets); the work ratio is "
                  "what the backend executes: MACs (BOPs + FLOPs: every binary layer runs as a "
                  "float layer) for torch float and onnxruntime, OPs for the packed engine.", "",
                  "| backend | batch | baseline ms | pruned ms | speedup (of min) | work ratio "
                  "| share of it |", "|---|---:|---:|---:|---:|---:|---:|"]
        for r in s["latency_by_batch"]:
            lines.append(
                f"| {r['backend']} | {r['batch']} | {r['baseline_ms']:.3f} "
                f"[{_fmt(r['baseline_ms_min'], '.3f')}] | {r['pruned_ms']:.3f} "
                f"[{_fmt(r['pruned_ms_min'], '.3f')}] | {r['speedup']:.2f}x "
                f"({_fmt(r['speedup_of_min_ms'], '.2f')}x) | {r['work']} "
                f"{_fmt(r['work_ratio'], '.3f')} | {_fmt(r['share_of_work_ratio'], '.2f')} |")
    for name, c in s.get("onnxruntime_convs", {}).items():
        pads = "; ".join(f"{k} {a[0]}/{a[1]} -> {b[0]}/{b[1]}" for k, (a, b) in c["padded"].items())
        lines.append(f"\nonnxruntime, {name}: {c['nchwc_layers']} of {c['conv_layers']} "
                     f"convolutions on its NCHWc fast path; channels (in/out) it pads to its "
                     f"block: {pads or 'none'}.")
    executed = next((r["executed_work_ratio"] for r in s.get("latency_by_batch", [])
                     if r.get("executed_work_ratio")), None)
    if executed:
        shares = ", ".join(f"batch {r['batch']} {r['speedup'] / executed:.2f}"
                           for r in s["latency_by_batch"] if r["backend"] == "onnxruntime")
        lines.append(f"MACs onnxruntime executes after that padding: ratio {executed:.3f}; its "
                     f"speedups as a share of it: {shares}.")
    bf = s["bnn_vs_float"]
    mism = ", ".join(f"{n} {m}" for n, m in bf.get("prediction_mismatches", {}).items())
    skipped = s.get("speedup_skipped", {}).get(CPU_BACKEND)
    lines += ["", "Packed CPU engine vs torch float32 on the same model: "
              + (f"skipped ({skipped})." if skipped else
                 f"{_fmt(bf['speedup'], '.2f')}x; predictions differing from torch on the test "
                 f"set: {mism or 'not checked'}.")]
    if layers_md:
        lines += ["", "## Where the packed engine's time goes", "", layers_md.strip()]
    lines += ["", "## ONNX (onnxruntime vs torch)", ""]
    for name, r in s["onnx_parity"].items():
        lines.append(f"- {name}: {r['prediction_mismatches']} of {r['images']} predictions "
                     f"differ; {r['images_over_tolerance']} images have a logit off by more "
                     f"than {r['tolerance']:g} ({r['images_over_tolerance_at_sign_threshold']} "
                     f"of them with a binary input on the sign threshold, where float rounding "
                     f"order decides the sign); max |logit diff| {r['max_abs_logit_diff']:.2e}"
                     f": {'passed' if r['passed'] else 'FAILED'}")
    lines += ["", "## Plots", ""] + [f"![{k}](plots/{Path(v).name})" for k, v in PLOTS.items()]
    return "\n".join(lines) + "\n"


def write_report(root: str | Path = ".",
                 inputs: dict[str, Any] | None = None) -> dict[str, Any]:
    """Read every stage's outputs under `root` (unless given as `inputs`); write summary.json/
    .md, the PNGs and their CSV data (for `dvc plots`). Returns the summary."""
    root = Path(root)
    inputs = inputs if inputs is not None else load_inputs(root)
    speed = speedups(inputs["benchmark"], inputs["export"])
    summary = build_summary(inputs, speed)
    save_json(root / SUMMARY_JSON, summary)
    save_json(root / METRICS_JSON, {k: round(v, 6) for k, v in dvc_metrics(summary).items()})
    bench = inputs["benchmark"]
    layers_md = layer_table_md(bench) if "layers" in bench else ""  # older files: no layers
    md = markdown(summary, inputs.get("study_md", ""), layers_md)
    write_atomic(root / SUMMARY_MD, lambda p: p.write_text(md))
    save_csv(root / LATENCY_CSV, [{"label": f"{r['backend']}: {m}", "backend": r["backend"],
                                   "model": m, "ms": r[f"{m}_ms"]}
                                  for r in speed["rows"] for m in ("baseline", "pruned")])
    plot_all(summary, inputs["flip_ratio"], speed["rows"],
             {k: root / v for k, v in PLOTS.items()})
    return summary


# ---- headline metrics: DVC's metrics file and the summary run's ------------------------------

def dvc_metrics(s: dict[str, Any]) -> dict[str, float]:
    """The headline, most telling first (`dvc exp show` collapses columns from the right):
    reports/metrics.json, the pipeline's one DVC metrics file, and the summary run's metrics.
    Speedups carry the batch size they were measured at (`_b64`); `ort` is onnxruntime."""
    batch = s.get("speedup_batch_size", {})
    out = {"test_acc": s["pruned"]["test_acc"], "acc_drop_pt": s["acc_drop_pt"],
           "bops_reduction_pct": s["reduction"]["bops_pct"]}
    for backend, short in (("cpu", "cpu"), ("onnxruntime", "ort")):
        if s["speedup"].get(backend) is not None:
            out[f"speedup_{short}_b{batch.get(backend, 0)}"] = s["speedup"][backend]
    out["study_wins"] = len(s["study"]["verdict"]["wins_over_all_controls"])
    return out


def headline_metrics(s: dict[str, Any]) -> dict[str, float]:
    """The summary run's metrics: dvc_metrics and the rest of the report's numbers."""
    batch = s.get("speedup_batch_size", {})
    out = dvc_metrics(s)
    out.update({"baseline_test_acc": s["baseline"]["test_acc"],
                "ops_reduction_pct": s["reduction"]["ops_pct"],
                "model_size_reduction_pct": s["reduction"]["size_pct"],
                "baseline/bops": s["baseline"]["bops"], "pruned/bops": s["pruned"]["bops"],
                "pruned/model_size_bytes": s["pruned"]["size_bytes"]})
    out.update({f"speedup_{k}_b{batch.get(k, 0)}": v for k, v in s["speedup"].items()
                if v is not None and k not in ("cpu", "onnxruntime")})
    if s["bnn_vs_float"]["speedup"] is not None:
        out[f"packed_vs_float_speedup_b{batch.get('cpu', 0)}"] = s["bnn_vs_float"]["speedup"]
    return out
