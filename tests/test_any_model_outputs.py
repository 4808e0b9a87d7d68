"""birealnet and a user's own model through the real pipeline: `dvc repro` on tiny synthetic
data (train with flips, prune by coupled groups, finetune, the study's matrix, export, benchmark,
report), then the gate: pruned widths, ONNX parity and files, the packed engine timed beside torch
float and onnxruntime and exact against torch, the study per coupled group, summary.json /
summary.md / plots, and the gate failing a real regression."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch
import yaml

from bnnprune.models import load_checkpoint

from conftest import copy_project, sh

TESTS = Path(__file__).resolve().parent
STUDY = {"methods": ["flip", "uniform_flip"], "budgets": [0.3], "seeds": [0],
         "recovery_steps": 2, "batch_size": 32, "channel_samples": 3, "sensitivity_images": 50,
         "bootstrap": 200}
PRUNE = {"tau": 0, "min_channels": 4, "round_to": 4, "target_bop_reduction": None}  # the flip rule
GROUPS = ["blocks.0.conv", "blocks.2.conv", "blocks.4.conv"]  # birealnet: one per stage
USER = {"arch": "usermodels.tiny_bireal:build", "kwargs": {"width": 16},
        "binary": ["usermodels.tiny_bireal:MyBinaryConv"]}


def run(root: Path, env: dict, *args: str, check: bool = True):
    return sh([sys.executable, *args], root, {**env, "PYTHONPATH": "src"}, check=check)


def repro(tmp_path_factory, name: str, model: dict) -> tuple[Path, dict]:
    """A committed copy of the repo with tiny params and `model`, after one `dvc repro`. A
    user's package goes where the stages import from (`src/`: dvc.yaml's PYTHONPATH)."""
    root = tmp_path_factory.mktemp(name) / "repo"
    shutil.copytree(TESTS / "usermodels", root / "src/usermodels")
    root, env = copy_project(root, model=model, prune=PRUNE, study=STUDY)
    sh(["dvc", "repro"], root, env)
    return root, env


def load(root: Path, path: str):
    sys.path.insert(0, str(root / "src"))  # a user's model unpickles from its package
    try:
        return load_checkpoint(root / path)[0]
    finally:
        sys.path.remove(str(root / "src"))


def check_pruned(root: Path) -> None:
    """prune.json's groups keep multiples of round_to, fewer BOPs, and the fine-tuned model
    is smaller than the baseline and runs."""
    prune = json.loads((root / "reports/metrics/prune.json").read_text())
    assert prune["total"]["bops_after"] < prune["total"]["bops_before"]
    for group in prune["layers"].values():
        after = group["channels_after"]
        assert after % PRUNE["round_to"] == 0 or after == group["channels_before"]
    pruned, baseline = load(root, "models/finetuned.pt"), load(root, "models/baseline.pt")
    assert sum(p.numel() for p in pruned.parameters()) < sum(
        p.numel() for p in baseline.parameters())
    assert pruned(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


def check_prune(project: tuple[Path, dict]) -> None:
    root, _ = project
    check_pruned(root)
    prune = json.loads((root / "reports/metrics/prune.json").read_text())
    assert list(prune["layers"]) == GROUPS


def check_study(project: tuple[Path, dict]) -> None:
    root, _ = project
    study = root / "reports/study"
    layers = json.loads((study / "layer_sensitivity.json").read_text())["layers"]
    assert list(layers) == GROUPS
    assert [(r["channels"], r["kept"]) for r in layers.values()] == [(16, 8), (32, 16), (64, 32)]
    hypothesis = json.loads((study / "hypothesis.json").read_text())
    assert list(hypothesis["loss_rise"]) == GROUPS
    assert all(len(s) == 3 for s in hypothesis["loss_rise"].values())
    assert list(hypothesis["channels"]["flip_window"]) == [*GROUPS, "all layers"]
    for method in ("flip", "uniform_flip"):
        cell = json.loads((study / f"cells/{method}-0.3-0.json").read_text())
        assert cell["bops_reduction_pct"] >= 30
        assert list(cell["channels"]) == GROUPS
        assert all(n % 4 == 0 for n in cell["channels"].values())
        assert cell["engine_mismatches"] is None and cell["engine"].startswith("skipped")
        assert 0 <= cell["test_acc"] <= 1
    summary = json.loads((root / "reports/metrics/study.json").read_text())
    assert set(summary["methods"]) == {"flip", "uniform_flip"}
    assert {(d["a"], d["b"]) for d in summary["differences"]} == {("flip", "uniform_flip")}


def test_a_users_model_runs_the_whole_pipeline(tmp_path_factory):
    root, env = repro(tmp_path_factory, "user", USER)
    check_pruned(root)
    export = json.loads((root / "reports/metrics/export.json").read_text())
    assert export["parity_passed"]
    bench = json.loads((root / "reports/metrics/benchmark.json").read_text())
    assert "packed_cpu" not in bench["skipped"]  # the engine runs a user's Bi-Real blocks too
    assert [bench["prediction_mismatches"][n]["mismatches"] for n in ("baseline", "pruned")] \
        == [0, 0]
    summary = json.loads((root / "reports/summary.json").read_text())
    assert summary["model"]["arch"] == USER["arch"]
    cell = json.loads((root / "reports/study/cells/flip-0.3-0.json").read_text())
    assert cell["bops_reduction_pct"] >= 30 and cell["engine_mismatches"] is None
    assert sh(["dvc", "status", "--json"], root, env).stdout.strip() == "{}"


def check_export(project: tuple[Path, dict]) -> None:
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


def check_benchmark(project: tuple[Path, dict]) -> None:
    """The packed engine runs birealnet beside torch float and onnxruntime (the exported
    models), interleaved at every batch size, exact against torch."""
    root, _ = project
    result = json.loads((root / "reports/metrics/benchmark.json").read_text())
    assert "packed_cpu" not in result["skipped"] and "triton_cuda" in result["skipped"]
    backends = {"torch_float", "packed_cpu", "onnxruntime"}
    for name in ("baseline", "pruned"):
        m = result["models"][name]
        assert all(m[b]["latency_ms_median"] > 0 for b in backends), (name, m)
        parity = result["prediction_mismatches"][name]
        assert (parity["mismatches"], parity["images"]) == (0, 50)
    assert list(result["by_batch"]) == ["batch_1", "batch_64", "batch_256"]  # params.yaml's
    assert all(set(rows) == backends for rows in result["by_batch"].values())
    assert result["backends"]["cpu"]["speedup"] == result["speedup"]["packed_cpu"] > 0
    binary = {r["name"] for r in result["layers"]["rows"] if r["binary"]}
    assert binary == {f"blocks.{i}.conv" for i in range(6)}
    assert result["engine_vs"]["batch_64"]["pruned"]["onnxruntime"] > 0
    assert result["model_paths"]["pruned"] == ["models/finetuned.pt", "models/model.onnx"]


def check_report_and_gate(project: tuple[Path, dict]) -> None:
    root, env = project
    summary = json.loads((root / "reports/summary.json").read_text())
    assert summary["model"]["arch"] == "birealnet"
    assert "cpu" not in summary.get("speedup_skipped", {})
    assert summary["speedup"]["cpu"] > 0 and summary["speedup"]["torch"] > 0
    assert summary["speedup"]["onnxruntime"] > 0
    assert {r["backend"] for r in summary["latency_by_batch"]} == {
        "torch_float", "packed_cpu", "onnxruntime"}
    assert summary["onnx_parity"]["pruned"]["passed"]
    assert "wins_over_all_controls" in summary["study"]["verdict"]
    md = (root / "reports/summary.md").read_text()
    assert md.startswith("# bnnprune report: birealnet (width 0.5) on synthetic")
    assert (root / "reports/study/summary.md").read_text().strip() in md  # the study's findings
    assert "| blocks.5.conv" in md  # the engine's per-layer table
    for plot in ("flip_ratio", "channels", "latency"):
        assert (root / f"reports/plots/{plot}.png").stat().st_size > 0

    # the tiny model misses the accuracy bar: a real regression fails the gate
    proc = run(root, env, "-m", "bnnprune.cli", "check", check=False)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "pruned test accuracy" in proc.stdout.split("REGRESSED")[1]
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["gate"] = {"min_test_acc": 0.0, "max_acc_drop_pt": 100.0,
                      "min_bops_reduction_pct": 0.0, "min_speedup_cpu": 0.0}
    (root / "lenient.yaml").write_text(yaml.safe_dump(params))
    proc = run(root, env, "-m", "bnnprune.cli", "check", "--params", "lenient.yaml",
               check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "PASSED (4 of 4)" in proc.stdout and "SKIPPED" not in proc.stdout


def test_birealnet_runs_the_whole_pipeline(tmp_path_factory):
    """One `dvc repro` (a session's worth of set-up: checked in one test, so that one worker
    builds it), then every output."""
    project = repro(tmp_path_factory, "bireal", {"arch": "birealnet", "width": 0.5})
    check_prune(project)
    check_study(project)
    check_export(project)
    check_benchmark(project)
    check_report_and_gate(project)
