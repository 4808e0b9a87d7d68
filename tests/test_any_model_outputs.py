"""A birealnet project through every stage script (dvc.yaml's commands, the study's cells as its
matrix runs them) on tiny synthetic data, then the gate: ONNX parity and files, the packed
engine skipped with its reason while torch float is timed, summary.json / summary.md / plots,
and the gate reporting the engine's speedup check as skipped while still failing a real
regression."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

from conftest import copy_project, sh

STUDY = {"methods": ["flip", "uniform_flip"], "budgets": [0.3], "seeds": [0],
         "recovery_steps": 2, "batch_size": 32, "channel_samples": 3, "sensitivity_images": 50,
         "bootstrap": 200}
STAGES = (["validate"], ["prepare"], ["train"], ["prune"], ["finetune"], ["export"],
          ["benchmark"], ["study_sensitivity"], ["study_hypothesis"],
          ["study_cell", "flip", "0.3", "0"], ["study_cell", "uniform_flip", "0.3", "0"],
          ["study_summary"], ["report"])


def run(root: Path, env: dict, *args: str, check: bool = True):
    return sh([sys.executable, *args], root, {**env, "PYTHONPATH": "src"}, check=check)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root, env = copy_project(tmp_path_factory.mktemp("bireal") / "repo",
                             model={"arch": "birealnet", "width": 0.5},
                             prune={"tau": 0, "min_channels": 4, "round_to": 4}, study=STUDY)
    for stage, *args in STAGES:
        run(root, env, f"stages/{stage}.py", *args)
    return root, env


def test_export_passes_parity_and_writes_both_onnx_files(project):
    root, _ = project
    result = json.loads((root / "reports/metrics/export.json").read_text())
    assert result["exporter"] == "folded" and result["parity_passed"]
    for name, path in (("baseline", "models/baseline.onnx"), ("pruned", "models/model.onnx")):
        assert (root / path).is_file()
        m = result["models"][name]
        assert m["path"] == path and m["parity"]["passed"] and m["parity"]["images"] == 50
        convs = m["onnxruntime_convs"]  # rows named by module, shortcuts included
        assert "blocks.2.conv" in convs["layers"] and "blocks.2.shortcut.1" in convs["layers"]
        assert str(root).encode() not in (root / path).read_bytes()
    assert result["mac_ratio"] > 1


def test_benchmark_skips_the_packed_engine_with_its_reason_and_times_torch(project):
    root, _ = project
    result = json.loads((root / "reports/metrics/benchmark.json").read_text())
    reason = result["skipped"]["packed_cpu"]
    assert reason == ("packed engine: birealnet is not a chain model (blocks.0 is a "
                      "BiRealBlock); it runs chain BNNs (cnn, nin, alexnet) only")
    assert result["backends"]["cpu"] == {"backend": "packed_cpu", "speedup": None,
                                         "reason": reason, "unsupported_model": True}
    assert "triton_cuda" in result["skipped"]
    for name in ("baseline", "pruned"):
        m = result["models"][name]
        assert m["torch_float"]["latency_ms_median"] > 0 and "packed_cpu" not in m
    assert set(result["speedup"]) == {"torch_float"}
    assert list(result["by_batch"]) == ["batch_1", "batch_64", "batch_256"]  # params.yaml's
    assert all(set(rows) == {"torch_float"} for rows in result["by_batch"].values())
    assert result["prediction_mismatches"] == {}
    assert result["prediction_mismatches_by_backend"] == {}
    assert "layers" not in result and result["bnn_vs_float"]["speedup"] is None


def test_report_and_gate_on_a_birealnet(project):
    root, env = project
    summary = json.loads((root / "reports/summary.json").read_text())
    assert summary["model"]["arch"] == "birealnet"
    reason = summary["speedup_skipped"]["cpu"]
    assert reason.startswith("packed engine: birealnet is not a chain model")
    assert summary["speedup"]["cpu"] is None and summary["speedup"]["torch"] > 0
    assert summary["speedup"]["onnxruntime"] > 0
    assert {r["backend"] for r in summary["latency_by_batch"]} == {"torch_float", "onnxruntime"}
    assert summary["onnx_parity"]["pruned"]["passed"]
    assert "wins_over_all_controls" in summary["study"]["verdict"]
    md = (root / "reports/summary.md").read_text()
    assert md.startswith("# bnnprune report: birealnet (width 0.5) on synthetic")
    assert (root / "reports/study/summary.md").read_text().strip() in md  # the study's findings
    assert f"| cpu | n/a | n/a | {reason} |" in md
    assert "Where the packed engine's time goes" not in md
    for plot in ("flip_ratio", "channels", "latency"):
        assert (root / f"reports/plots/{plot}.png").stat().st_size > 0

    # the tiny model misses the accuracy bar: a real regression still fails the gate, and the
    # engine's speedup check shows as skipped with the reason, not as a failure
    proc = run(root, env, "-m", "bnnprune.cli", "check", check=False)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    regressed, rest = proc.stdout.split("\nSKIPPED")
    assert "pruned test accuracy" in regressed and "speedup, packed CPU" not in regressed
    assert "speedup, packed CPU engine (min times)  skipped" in rest and reason in rest
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["gate"] = {"min_test_acc": 0.0, "max_acc_drop_pt": 100.0,
                      "min_bops_reduction_pct": 0.0, "min_speedup_cpu": 1.1}
    (root / "lenient.yaml").write_text(yaml.safe_dump(params))
    proc = run(root, env, "-m", "bnnprune.cli", "check", "--params", "lenient.yaml",
               check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "PASSED (3 of 4)" in proc.stdout and "SKIPPED (1 of 4" in proc.stdout
    assert "gate: OK (1 skipped)" in proc.stdout
