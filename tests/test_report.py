"""Report: summary.json schema and numbers (ops from the counting module), the readable report
and its plots, clear errors for missing inputs, and the MLflow summary run + compare table."""

import json
import math
from pathlib import Path

import pytest

from bnnprune.core.files import save_csv, save_json
from bnnprune.core.ops import count_ops, reduction_pct
from bnnprune.models import build_model, model_config, save_checkpoint
from bnnprune.pipeline.config import ExportConfig, parse_params
from bnnprune.pipeline.data import make_synthetic
from bnnprune.pipeline.pruning import prune_report
from bnnprune.reports import report
from bnnprune.study.report import findings_md, summarize, tables_md
from bnnprune.tracking import runs

CARD = {"dataset": "synthetic", "shape": [1, 28, 28], "num_classes": 10, "mean": [0.3],
        "std": [0.2], "sizes": {"train": 100, "val": 20, "test": 2000}}
BASE_CH, PRUNED_CH = [8, 8, 16, 16, 32, 32], [8, 6, 12, 10, 20, 32]
ACC = {"flip": 0.885, "latent": 0.893}
BENCHMARK = {
    "backends": {
        "cpu": {"baseline_ms": 10.0, "pruned_ms": 6.25, "speedup": 1.6, "speedup_of_min_ms": 1.5},
        "triton": {"speedup": None, "reason": "no CUDA GPU (interpreter timing is not a speed)"},
        "torch": {"baseline_ms": 30.0, "pruned_ms": 24.0, "speedup": 1.25,
                  "speedup_of_min_ms": 1.2},
    },
    "bnn_vs_float": {"speedup": 4.8, "packed_ms": 6.25, "float_ms": 30.0},
    "prediction_mismatches": {"baseline": {"mismatches": 0}, "pruned": {"mismatches": 3}},
    "config": {"batch_size": 64},
    "by_batch": {f"batch_{b}": {
        "torch_float": {"baseline_ms": 30.0 * f, "baseline_ms_min": 29.0 * f,
                        "pruned_ms": 24.0 * f, "pruned_ms_min": 23.0 * f, "speedup": 1.25,
                        "speedup_of_min_ms": 29 / 23, "work_ratio": 1.5,
                        "share_of_work_ratio": 1.25 / 1.5},
        "packed_cpu": {"baseline_ms": 10.0 * f, "baseline_ms_min": 9.0 * f,
                       "pruned_ms": 6.25 * f, "pruned_ms_min": 6.0 * f, "speedup": 1.6,
                       "speedup_of_min_ms": 1.5, "work_ratio": 1.3,
                       "share_of_work_ratio": 1.6 / 1.3}} for b, f in ((1, 0.1), (64, 1.0))},
}


def tiny(channels):
    return build_model({**model_config("cnn", 0.25, [1, 28, 28], 10), "channels": channels},
                       seed=0).eval()


def study_cells(acc: dict) -> list[dict]:
    """Cells as the study stage writes them: per method, seed 0..2, accuracy around `acc`."""
    return [{"method": m, "budget": 0.5, "seed": s, "bops_reduction_pct": 50.0 + s,
             "test_acc_before_recovery": a - 0.1, "test_acc": a + 0.001 * s * (m == "flip"),
             "channels": {}} for m, a in acc.items() for s in range(3)]


def finetune_json(criterion, acc, bops_pct):
    return {"criterion": criterion, "val_acc": acc, "test_acc": acc, "test_loss": 0.3,
            "baseline_test_acc": 0.9, "acc_drop_pt": 100 * (0.9 - acc), "epochs": 1,
            "bops_reduction_pct": bops_pct}


def make_workspace(root: Path, acc: dict = ACC) -> Path:
    """Every report input, written by the producers' own functions where they are cheap."""
    base, pruned = tiny(BASE_CH), tiny(PRUNED_CH)
    save_json(root / "data/prepared/card.json", CARD)
    save_json(root / "reports/metrics/train.json", {"val_acc": 0.9, "test_acc": 0.9})
    save_csv(root / "reports/plots/flip_ratio.csv",
             [{"epoch": e, **{f"blocks.{i}": 0.01 / (e * i) for i in range(1, 6)}}
              for e in (1, 2, 3)])
    save_checkpoint(root / "models/baseline.pt", base)
    save_checkpoint(root / "models/finetuned.pt", pruned)
    prune = prune_report(base, pruned, {f"blocks.{i}.layer": 0.1 * i for i in range(1, 6)})
    save_json(root / "reports/metrics/prune.json", {"criterion": "flip", "tau": 20, **prune})
    bops_pct = prune["total"]["bops_reduction_pct"]
    save_json(root / "reports/metrics/finetune.json", finetune_json("flip", acc["flip"], bops_pct))
    study = summarize(study_cells(acc), list(acc), [0.5], 0.9)
    study["setting"] = "a hand-made study"
    save_json(root / "reports/metrics/study.json", study)
    (root / "reports/study").mkdir(parents=True, exist_ok=True)
    (root / "reports/study/summary.md").write_text("\n".join(
        ["## Findings", *findings_md(study, None, study["setting"]), *tables_md(study, None)]))
    save_json(root / "reports/metrics/benchmark.json", BENCHMARK)
    test = make_synthetic(10, 32, seed=1)[1]
    cfg = ExportConfig(exporter="legacy", latency_batch_sizes=[1, 8], latency_repeats=1,
                       threads=1)
    from bnnprune.pipeline.export import export_and_check

    result = export_and_check({"baseline": (base, root / "models/baseline.onnx"),
                               "pruned": (pruned, root / "models/model.onnx")}, test, CARD, cfg)
    save_json(root / "reports/metrics/export.json", result)
    return root


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("ws"))


@pytest.fixture(scope="module")
def summary(workspace):
    return report.write_report(workspace)


def test_summary_schema_and_numbers(workspace, summary):
    on_disk = json.loads((workspace / report.SUMMARY_JSON).read_text())
    assert on_disk == json.loads(json.dumps(summary))
    for key in ("dataset", "model", "baseline", "pruned", "reduction", "acc_drop_pt", "speedup",
                "bnn_vs_float", "study"):
        assert key in on_disk, key
    for name, channels in (("baseline", BASE_CH), ("pruned", PRUNED_CH)):
        total = count_ops(tiny(channels)).total
        assert summary[name] == {"test_acc": pytest.approx(0.9 if name == "baseline" else 0.885),
                                 "bops": total["bops"], "flops": total["flops"],
                                 "ops": total["ops"], "size_bytes": total["size_bytes"]}
        assert 0 <= summary[name]["test_acc"] <= 1
    b, p = summary["baseline"], summary["pruned"]
    assert summary["reduction"]["bops_pct"] == pytest.approx(reduction_pct(b["bops"], p["bops"]))
    assert summary["reduction"]["ops_pct"] == pytest.approx(reduction_pct(b["ops"], p["ops"]))
    assert 0 < summary["reduction"]["size_pct"] < 100
    assert summary["acc_drop_pt"] == pytest.approx(1.5)  # points, not a fraction
    assert summary["speedup"]["cpu"] == 1.6 and summary["speedup"]["triton"] is None
    assert summary["speedup_of_min_ms"] == {"cpu": 1.5, "triton": None, "torch": 1.2}
    assert "CUDA" in summary["speedup_unavailable"]["triton"]
    export = json.loads((workspace / "reports/metrics/export.json").read_text())
    assert summary["speedup"]["onnxruntime"] == export["speedup"]["batch_8"]
    assert summary["bnn_vs_float"]["speedup"] == 4.8
    assert summary["bnn_vs_float"]["prediction_mismatches"] == {"baseline": 0, "pruned": 3}
    assert summary["ops_ratio"] == pytest.approx(b["ops"] / p["ops"])
    assert summary["speedup_batch_size"] == {"cpu": 64, "torch": 64, "triton": 64,
                                             "onnxruntime": 8}
    assert [r["channels_after"] for r in summary["layers"]] == PRUNED_CH[1:]
    assert summary["layers"][0]["p_l"] == pytest.approx(0.1)


def test_latency_table_per_backend_and_batch(workspace, summary):
    rows = summary["latency_by_batch"]
    assert [(r["backend"], r["batch"]) for r in rows] == [
        ("torch_float", 1), ("packed_cpu", 1), ("torch_float", 64), ("packed_cpu", 64),
        ("onnxruntime", 1), ("onnxruntime", 8)]
    assert {r["work"] for r in rows if r["backend"] == "packed_cpu"} == {"OPs"}
    export = json.loads((workspace / "reports/metrics/export.json").read_text())
    ort = rows[-1]
    m = export["models"]
    assert ort["baseline_ms"] == m["baseline"]["latency_ms"]["batch_8"]
    assert ort["pruned_ms_min"] == m["pruned"]["latency_ms_min"]["batch_8"]
    # onnxruntime's speedups are export.json's (rounded there to 4 decimals)
    assert ort["speedup"] == export["speedup"]["batch_8"] == pytest.approx(
        ort["baseline_ms"] / ort["pruned_ms"], abs=1e-4)
    assert ort["speedup_of_min_ms"] == export["speedup_min"]["batch_8"]
    assert ort["work_ratio"] == export["mac_ratio"] and ort["work"] == "MACs"
    assert ort["share_of_work_ratio"] == export["speedup_vs_mac_ratio"]["batch_8"] == \
        pytest.approx(ort["speedup"] / export["mac_ratio"], abs=1e-4)
    assert ort["executed_work_ratio"] == export["executed_mac_ratio"]
    padded = summary["onnxruntime_convs"]["pruned"]["padded"]
    for layer, (true, executed) in padded.items():
        e = export["models"]["pruned"]["onnxruntime_convs"]["layers"][layer]
        assert true == e["channels"] != executed == e["executed_channels"]
    md = (workspace / report.SUMMARY_MD).read_text()
    assert f"MACs onnxruntime executes after that padding: ratio {ort['executed_work_ratio']:.3f}" \
        in md
    assert "| packed_cpu | 1 | 1.000 [0.900] | 0.625 [0.600] | 1.60x (1.50x) | OPs 1.300 | 1.23 |" \
        in md


def test_dvc_metrics_file_is_a_few_numeric_headline_metrics(workspace, summary):
    """reports/metrics.json, the one DVC metrics file: numbers only, the speedups named with
    their batch size, every name also a valid MLflow metric name (the summary run logs them)."""
    from bnnprune.pipeline.tracking import METRIC_NAME

    metrics = json.loads((workspace / report.METRICS_JSON).read_text())
    assert list(metrics)[:3] == ["test_acc", "acc_drop_pt", "bops_reduction_pct"]
    assert metrics["speedup_cpu_b64"] == 1.6 and "speedup_ort_b8" in metrics
    assert metrics["test_acc"] == pytest.approx(summary["pruned"]["test_acc"])
    assert len(metrics) <= 6  # `dvc metrics show` fits 120 columns
    assert all(isinstance(v, (int, float)) and not isinstance(v, bool)
               for v in metrics.values())
    assert all(METRIC_NAME.fullmatch(k) for k in report.headline_metrics(summary))


def test_markdown_has_per_layer_tables_and_plots(workspace, summary):
    md = (workspace / report.SUMMARY_MD).read_text()
    assert "| blocks.3.layer | 16 | 10 | 0.300 |" in md
    assert "| triton | n/a | n/a | no CUDA GPU" in md
    ratio = summary["ops_ratio"]
    assert f"OPs ratio baseline / pruned: {ratio:.3f}" in md
    assert f"| cpu | 1.60x | {1.6 / ratio:.2f} |" in md  # the speedup as a share of it
    assert "predictions differing from torch on the test set: baseline 0, pruned 3." in md
    for name, rel in report.PLOTS.items():
        assert (workspace / rel).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert f"(plots/{Path(rel).name})" in md
    latency = (workspace / report.LATENCY_CSV).read_text().splitlines()
    assert latency[0] == "label,backend,model,ms"
    assert any(r.startswith("onnxruntime (batch 8): pruned,") for r in latency)
    assert "cpu (batch 64): baseline,cpu (batch 64),baseline,10.0" in latency


def test_report_leads_with_the_study_findings(workspace, summary):
    md = (workspace / report.SUMMARY_MD).read_text()
    assert md.index("## Findings") < md.index("## Baseline vs pruned")
    assert "No flip-derived method beat every control (latent) after recovery" in md
    assert summary["study"]["verdict"]["controls"] == ["latent"]


@pytest.mark.parametrize("rel", ["reports/metrics/benchmark.json", "models/finetuned.pt",
                                 "reports/metrics/study.json"])
def test_missing_input_names_the_file_and_its_stage(workspace, tmp_path, rel):
    path = workspace / rel
    saved = path.read_bytes()
    path.unlink()
    try:
        stage = next(s for p, s in report.INPUTS.values() if p == rel)
        with pytest.raises(report.ReportError, match=rf"{rel}: .*not found.*'{stage}' stage"):
            report.load_inputs(workspace)
    finally:
        path.write_bytes(saved)


def test_malformed_input_is_a_clear_error(workspace):
    path = workspace / "reports/metrics/benchmark.json"
    saved = path.read_text()
    path.write_text(json.dumps({"something": "else"}))
    try:
        with pytest.raises(report.ReportError, match="benchmark.json: key 'backends' missing"):
            report.build_summary(report.load_inputs(workspace))
    finally:
        path.write_text(saved)


def test_summary_run_links_stage_runs_and_compare_shows_one_row_each(
        workspace, summary, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from bnnprune.pipeline.tracking import stage_run

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    stage_ids = {}
    for stage in ("train", "finetune", "study@flip-0.5-0"):
        with stage_run(stage, {"x": 1}, f"hash-{stage}") as run:
            stage_ids[stage] = run.info.run_id
    summary_ids = []
    for tau in (20.0, 30.0):  # two pipeline executions with different configurations
        params = parse_params({"prune": {"tau": tau}})
        with stage_run("report", params, f"report-{tau}") as run:
            links = runs.log_summary_run(summary, workspace)
            summary_ids.append(run.info.run_id)
        assert links == stage_ids  # the newest run of each stage
    client = MlflowClient(uri)
    first = client.get_run(summary_ids[0])
    assert first.data.tags[runs.SUMMARY_TAG] == "true"
    assert first.data.tags[runs.LINK_TAG + "train"] == stage_ids["train"]
    assert first.data.tags[runs.LINK_TAG + "study:flip-0.5-0"] == stage_ids["study@flip-0.5-0"]
    assert first.data.metrics["bops_reduction_pct"] == pytest.approx(
        summary["reduction"]["bops_pct"])
    assert first.data.metrics["speedup_cpu_b64"] == 1.6
    # stage runs become children of the first summary run only (never re-parented)
    assert client.get_run(stage_ids["train"]).data.tags["mlflow.parentRunId"] == summary_ids[0]
    table = runs.compare().splitlines()
    assert len(table) == 2 + 2  # header, rule, one row per summary run
    assert "prune.tau" in table[0] and "test_acc" in table[0]
    assert table[2].startswith(summary_ids[1][:8]) and "30.0" in table[2]
    assert not math.isnan(first.data.metrics["test_acc"])
    assert "1.6" in table[2]  # the speedup column finds speedup_cpu_b64


def test_compare_without_summary_runs_says_so():
    import pandas as pd

    assert "no summary runs yet" in runs.compare_table(pd.DataFrame())


def test_report_cli_stage_error_is_one_line(tmp_path, monkeypatch, capsys):
    from bnnprune.cli import run_stage

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        run_stage(lambda: report.load_inputs())
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: data/prepared/card.json: report input not found")


SKIPPED_ENGINE = "packed engine: birealnet is not a chain model (blocks.0 is a BiRealBlock)"
BENCHMARK_NO_ENGINE = {  # as the benchmark writes it for a model the engines cannot run
    "backends": {
        "cpu": {"backend": "packed_cpu", "speedup": None, "reason": SKIPPED_ENGINE,
                "unsupported_model": True},
        "triton": {"backend": "triton_cuda", "speedup": None, "reason": "no CUDA GPU"},
        "torch": {"baseline_ms": 30.0, "pruned_ms": 24.0, "speedup": 1.25,
                  "speedup_of_min_ms": 1.2}},
    "bnn_vs_float": {"speedup": None, "reason": SKIPPED_ENGINE},
    "prediction_mismatches": {}, "config": {"batch_size": 64},
    "by_batch": {"batch_64": {"torch_float": BENCHMARK["by_batch"]["batch_64"]["torch_float"]}},
}


def test_a_skipped_engine_is_reported_skipped_with_its_reason(workspace, summary):
    """The speed part of a birealnet's report: no engine number, its reason, torch and
    onnxruntime as measured. A machine-side gap (no GPU) is unavailable, not skipped."""
    inputs = report.load_inputs(workspace)
    inputs["benchmark"] = BENCHMARK_NO_ENGINE
    s = report.build_summary(inputs)
    assert s["speedup"]["cpu"] is None and s["speedup_of_min_ms"]["cpu"] is None
    assert s["speedup_skipped"] == {"cpu": SKIPPED_ENGINE}
    assert s["speedup_unavailable"] == {"cpu": SKIPPED_ENGINE, "triton": "no CUDA GPU"}
    assert s["speedup"]["torch"] == 1.25 and s["speedup"]["onnxruntime"] > 0
    assert [r["backend"] for r in s["latency_by_batch"]] == ["torch_float", "onnxruntime",
                                                             "onnxruntime"]
    md = report.markdown(s)
    assert f"| cpu | n/a | n/a | {SKIPPED_ENGINE} |" in md
    assert f"Packed CPU engine vs torch float32 on the same model: skipped ({SKIPPED_ENGINE})" \
        in md
    assert "speedup_cpu_b64" not in report.dvc_metrics(s)
    assert summary["speedup_skipped"] == {}  # the chain model's engine ran
