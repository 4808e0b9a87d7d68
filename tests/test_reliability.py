"""Faults a user will meet: kills, bad params, no MLflow, concurrent experiments, reruns."""

import json
import signal
import subprocess
import sys
import time

import pytest
import torch
from mlflow.tracking import MlflowClient

from conftest import copy_project, sh

PY = sys.executable


def stage(root, env, name, check=True):
    return sh([PY, f"stages/{name}.py"], root, env, check=check)


def runs(env, stage_name):
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("bnnprune")
    return [r for r in client.search_runs([exp.experiment_id])
            if r.data.tags.get("stage") == stage_name]


@pytest.fixture
def project(tmp_path):
    root, env = copy_project(tmp_path / "repo",
                             data={"subset": {"train": 1500, "val": 50, "test": 50}},
                             train={"epochs": 6})
    stage(root, env, "prepare")
    return root, env


def test_sigkill_mid_training_then_rerun_resumes_and_completes_one_mlflow_run(project):
    root, env = project
    resume = root / ".bnnprune/resume/train.pt"
    proc = subprocess.Popen([PY, "stages/train.py"], cwd=root, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not resume.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    time.sleep(0.3)  # into the next epoch
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_after = torch.load(resume, weights_only=False)["epoch"] + 1
    assert killed_after < 6, "training finished before the kill; make it longer"
    assert not (root / "models/baseline.pt").exists()
    out = stage(root, env, "train").stdout
    assert f"after epoch {killed_after}" in out
    assert not resume.exists() and (root / "models/baseline.pt").exists()
    train_runs = runs(env, "train")
    assert len(train_runs) == 1  # the killed run was continued, not duplicated
    assert train_runs[0].info.status == "FINISHED"
    assert train_runs[0].data.tags.get("resumed") == "true"
    assert train_runs[0].data.metrics["resumed_from_epoch"] == killed_after


def test_same_params_and_seed_give_identical_metrics_files(project):
    root, env = project
    stage(root, env, "train")
    first = (root / "reports/metrics/train.json").read_bytes()
    flips = torch.load(root / "models/flips.pt")["counts"]
    stage(root, env, "train")
    assert (root / "reports/metrics/train.json").read_bytes() == first
    again = torch.load(root / "models/flips.pt")["counts"]
    assert all(torch.equal(flips[k], again[k]) for k in flips)


def test_bad_params_fail_clearly_and_leave_outputs_intact(project):
    root, env = project
    card = (root / "data/prepared/card.json").read_bytes()
    params = (root / "params.yaml").read_text()
    (root / "params.yaml").write_text(params.replace("val_fraction:", "val_fractoin:"))
    proc = stage(root, env, "prepare", check=False)
    assert proc.returncode == 2
    assert "data.val_fractoin: unknown key; did you mean 'val_fraction'?" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert (root / "data/prepared/card.json").read_bytes() == card


def test_unreachable_mlflow_stops_before_work_unless_opted_out(project):
    root, env = project
    (root / "data/prepared/card.json").unlink()
    bad = {**env, "MLFLOW_TRACKING_URI": "http://127.0.0.1:9"}
    proc = stage(root, bad, "prepare", check=False)
    assert proc.returncode == 2
    assert "MLflow tracking URI 'http://127.0.0.1:9' is not usable" in proc.stderr
    assert "BNNPRUNE_MLFLOW=off" in proc.stderr
    assert not (root / "data/prepared/card.json").exists()
    stage(root, {**bad, "BNNPRUNE_MLFLOW": "off"}, "prepare")
    assert (root / "data/prepared/card.json").exists()


def test_queued_experiments_run_in_parallel_and_all_reach_mlflow(tmp_path):
    root, env = copy_project(tmp_path / "repo")
    env = {k: v for k, v in env.items() if k != "MLFLOW_TRACKING_URI"}  # the project default
    for seed in (1, 2):
        sh(["dvc", "exp", "run", "--queue", "-n", f"seed{seed}", "-S", f"train.seed={seed}",
            "train"], root, env)
    sh(["dvc", "exp", "run", "--run-all", "-j", "2"], root, env)
    table = json.dumps(json.loads(sh(["dvc", "exp", "show", "--json"], root, env).stdout))
    assert "seed1" in table and "seed2" in table
    assert (root / "mlflow.db").exists()  # not inside DVC's temporary workspaces
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    all_runs = client.search_runs([client.get_experiment_by_name("bnnprune").experiment_id])
    assert all(r.info.status == "FINISHED" for r in all_runs)
    by_exp = {}
    for r in all_runs:
        by_exp.setdefault(r.data.tags.get("dvc_exp_name"), set()).add(r.data.tags["stage"])
    # prepare may be restored from DVC's run cache for one of them; train differs by seed
    assert "train" in by_exp.get("seed1", ()) and "train" in by_exp.get("seed2", ()), by_exp
