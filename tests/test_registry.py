"""Model Registry on the shared tiny pipeline (conftest's e2e_project): the report stage registers
the pruned ONNX model with alias `candidate`; `bnnprune check` moves `champion` to it only when
the gate passes; `models:/<name>@champion` in onnxruntime gives the reported accuracy."""

import json

import mlflow
import numpy as np
import pytest
import yaml
from mlflow.tracking import MlflowClient

from bnnprune.pipeline.data import load_prepared, sha256
from bnnprune.pipeline.export import run_onnx, session
from bnnprune.tracking.registry import CANDIDATE, CHAMPION, model_name

from conftest import sh

LOOSE = {"min_test_acc": 0.0, "max_acc_drop_pt": 100.0, "min_bops_reduction_pct": 0.0,
         "min_speedup_cpu": 0.0}
IMPOSSIBLE = {**LOOSE, "min_bops_reduction_pct": 100.0}


def check(root, env, gate: dict, tmp_path):
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["gate"] = gate
    path = tmp_path / f"params-{len(list(tmp_path.iterdir()))}.yaml"
    path.write_text(yaml.safe_dump(params))
    return sh(["bnnprune", "check", "--params", str(path)], root, env, check=False)


def test_report_registers_candidate_and_check_promotes_champion(e2e_project, tmp_path):
    root, env = e2e_project
    summary = json.loads((root / "reports/summary.json").read_text())
    name = model_name(summary)
    assert name == "bnnprune-synthetic-cnn"
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    candidate = client.get_model_version_by_alias(name, CANDIDATE)
    tags = candidate.tags
    assert tags["summary_sha256"] == sha256(root / "reports/summary.json")
    assert tags["onnx_sha256"] == sha256(root / "models/model.onnx")
    # the commit and config of the report run that registered it (not just 40 / 16 chars)
    exp = client.get_experiment_by_name("bnnprune").experiment_id
    [report] = [r for r in client.search_runs([exp], "tags.stage = 'report'")
                if r.data.tags["config_hash"] == tags["config_hash"]]
    head = sh(["git", "rev-parse", "HEAD"], root, env).stdout.strip()
    assert tags["git_commit"] == report.data.tags["git_commit"] == head
    assert float(tags["pruned.test_acc"]) == pytest.approx(summary["pruned"]["test_acc"])
    assert float(tags["reduction.bops_pct"]) == pytest.approx(summary["reduction"]["bops_pct"],
                                                              rel=1e-5)
    # the version's model is the one the export stage logged (not logged a second time)
    logged = client.get_logged_model(candidate.source.removeprefix("models:/"))
    assert logged.name == "pruned_bnn_onnx" and logged.tags["onnx_sha256"] == tags["onnx_sha256"]
    assert client.get_run(logged.source_run_id).data.tags["stage"] == "export"

    failed = check(root, env, IMPOSSIBLE, tmp_path)
    assert failed.returncode == 1 and "champion" not in failed.stdout + failed.stderr
    with pytest.raises(mlflow.exceptions.MlflowException):
        client.get_model_version_by_alias(name, CHAMPION)

    passed = check(root, env, LOOSE, tmp_path)
    assert passed.returncode == 0, passed.stdout + passed.stderr
    assert f"champion -> models:/{name}/{candidate.version}" in passed.stdout
    assert client.get_model_version_by_alias(name, CHAMPION).version == candidate.version

    # a client loads the champion by alias and gets the reported accuracy
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    local = mlflow.artifacts.download_artifacts(f"models:/{name}@{CHAMPION}",
                                                dst_path=str(tmp_path / "champion"))
    splits, _ = load_prepared(root / "data/prepared")
    test = splits["test"]
    logits = run_onnx(session(f"{local}/model.onnx"), test.images)
    acc = float((np.asarray(logits).argmax(1) == test.labels.numpy()).mean())
    export = json.loads((root / "reports/metrics/export.json").read_text())
    assert acc == export["models"]["pruned"]["parity"]["test_acc_onnx"]
    mismatches = summary["onnx_parity"]["pruned"]["prediction_mismatches"]
    # torch's accuracy is a float32 mean: equal up to its rounding and the parity mismatches
    assert abs(acc - summary["pruned"]["test_acc"]) <= mismatches / len(test) + 1e-6
