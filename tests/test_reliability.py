"""Faults a user will meet: kills, bad params, no MLflow, concurrent experiments, reruns."""

import json
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from conftest import copy_e2e, copy_project, sh

PY = sys.executable
EPOCHS = 6  # long enough (1500 images) that the kill test can land between two epochs


def stage(root, env, name, check=True):
    return sh([PY, f"stages/{name}.py"], root, env, check=check)


def runs(env, stage_name):
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("bnnprune")
    return [r for r in client.search_runs([exp.experiment_id])
            if r.data.tags.get("stage") == stage_name]


@pytest.fixture(scope="session")
def prepared(tmp_path_factory):
    """A committed project copy with data/prepared/ written and an MLflow database that has
    its schema but no runs. Creating the schema takes seconds of migrations: paid once here
    (in a separate process, while `prepare` runs untracked) instead of once per test.
    Session-scoped: this module's tests are spread over the workers (conftest's SPLIT)."""
    root, env = copy_project(tmp_path_factory.mktemp("prepared") / "repo",
                             data={"subset": {"train": 1500, "val": 50, "test": 50}},
                             train={"epochs": EPOCHS})
    schema = subprocess.Popen([PY, "-c", "import sys; from mlflow.tracking import MlflowClient; "
                               "MlflowClient(sys.argv[1]).search_experiments()",
                               env["MLFLOW_TRACKING_URI"]], cwd=root, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    stage(root, {**env, "BNNPRUNE_MLFLOW": "off"}, "prepare")
    _, err = schema.communicate()
    assert schema.returncode == 0, err
    return root, env


@pytest.fixture
def project(prepared, tmp_path):
    """A fresh clone of `prepared` (git history, prepared data, MLflow database) per test."""
    template, env = prepared
    root = tmp_path / "repo"
    shutil.copytree(template, root, symlinks=True)
    return root, {**env, "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}"}


def test_sigkill_mid_training_then_rerun_resumes_and_completes_one_mlflow_run(project):
    root, env = project
    resume = root / ".bnnprune/resume/train.pt"
    proc = subprocess.Popen([PY, "stages/train.py"], cwd=root, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 900  # only a bound: the loop ends when the first epoch is saved
    while not resume.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    assert resume.exists(), f"no resume state after {time.time() - deadline + 900:.0f} s"
    time.sleep(0.3)  # into the next epoch
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_after = torch.load(resume, weights_only=False)["epoch"] + 1
    assert killed_after < EPOCHS, "training finished before the kill; make it longer"
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
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["train"]["epochs"] = 2  # determinism does not need the kill test's long training
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    stage(root, env, "train")
    first = (root / "reports/metrics/train.json").read_bytes()
    flips = torch.load(root / "models/flips.pt")["counts"]
    assert any(c.any() for c in flips.values())  # something to compare: flips were counted
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


def test_queued_experiments_run_in_parallel_and_all_reach_mlflow(e2e_build, tmp_path):
    """Two experiments queued in (a copy of) the end-to-end project run at once (`-j 2`) in
    DVC's temporary copies, with the project's default tracking URI and no MLflow database yet:
    both create it at the same moment, and every run must land in the project's database,
    not in the temporary copies."""
    root, env = copy_e2e(e2e_build, tmp_path / "repo")
    env = {k: v for k, v in env.items() if k != "MLFLOW_TRACKING_URI"}  # the project default
    db = root / "mlflow.db"
    assert not db.exists()  # the e2e runs were tracked elsewhere
    for seed in (1, 2):
        sh(["dvc", "exp", "run", "--queue", "-n", f"seed{seed}", "-S", f"train.seed={seed}",
            "train"], root, env)
    sh(["dvc", "exp", "run", "--run-all", "-j", "2"], root, env)
    table = json.dumps(json.loads(sh(["dvc", "exp", "show", "--json"], root, env).stdout))
    assert "seed1" in table and "seed2" in table
    assert db.exists()  # not inside DVC's temporary workspaces
    client = MlflowClient(f"sqlite:///{db}")
    all_runs = client.search_runs([client.get_experiment_by_name("bnnprune").experiment_id])
    assert all(r.info.status == "FINISHED" for r in all_runs)
    by_exp = {}
    for r in all_runs:
        by_exp.setdefault(r.data.tags.get("dvc_exp_name"), set()).add(r.data.tags["stage"])
    # every run is tagged with its experiment; prepare is up to date in the e2e project
    # (restored from the cache), train differs by seed
    assert set(by_exp) == {"seed1", "seed2"}, by_exp
    assert all("train" in stages for stages in by_exp.values()), by_exp
