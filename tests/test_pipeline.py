"""End to end: the real `dvc repro` on tiny synthetic data, in a temporary copy of the repo."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from conftest import REPO

TINY = {
    "data": {"dataset": "synthetic", "subset": {"train": 200, "val": 50, "test": 50}},
    "model": {"width": 0.25},
    "train": {"epochs": 2, "batch_size": 32, "threads": 1},
}


def sh(cmd: list[str], cwd: Path, env: dict, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}"
                             f"\n{proc.stderr[-3000:]}")
    return proc


def merge(base: dict, override: dict) -> dict:
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            merge(base[key], value)
        else:
            base[key] = value
    return base


def tiny_params(params: dict) -> dict:
    """Shrink every training budget in params.yaml to the minimum and use synthetic data."""
    merge(params, TINY)
    for group in params.values():
        if isinstance(group, dict) and "epochs" in group and group is not params["train"]:
            group.update(epochs=1, batch_size=32, threads=1)
    return params


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("e2e") / "repo"
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                           cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    for name in files:
        if (REPO / name).is_file():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, root / name)
    params = tiny_params(yaml.safe_load((root / "params.yaml").read_text()))
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}", "GIT_AUTHOR_NAME": "t",
           "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    env.pop("DVC_EXP_NAME", None)
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "init"]):
        sh(cmd, root, env)
    sh(["dvc", "repro"], root, env)
    return root, env


def test_repro_writes_every_declared_output_and_tracks_each_stage(project):
    root, env = project
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    for stage in lock["stages"].values():
        for out in stage.get("outs", []):
            assert (root / out["path"]).exists(), out["path"]
    train = json.loads((root / "reports/metrics/train.json").read_text())
    assert 0.0 <= train["test_acc"] <= 1.0 and train["flip_observations"] > 0
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([client.get_experiment_by_name("bnnprune").experiment_id])
    stages = {r.data.tags["stage"] for r in runs if r.info.status == "FINISHED"}
    assert set(lock["stages"]) <= stages
    train_run = next(r for r in runs if r.data.tags["stage"] == "train")
    assert train_run.data.params["train.epochs"] == "2"
    assert train_run.data.metrics["test_acc"] == pytest.approx(train["test_acc"])


def test_second_repro_is_a_no_op(project):
    root, env = project
    out = sh(["dvc", "repro"], root, env).stdout
    assert "Data and pipelines are up to date" in out or "didn't change" in out


def test_exp_run_with_override_shows_in_exp_show(project):
    root, env = project
    sh(["dvc", "exp", "run", "-n", "one-epoch", "-S", "train.epochs=1"], root, env)
    table = json.loads(sh(["dvc", "exp", "show", "--json"], root, env).stdout)
    names = json.dumps(table)
    assert "one-epoch" in names
