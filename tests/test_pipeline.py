"""End to end: the real `dvc repro` on tiny synthetic data, in a temporary copy of the repo."""

import json

import pytest
import yaml
from mlflow.tracking import MlflowClient

from conftest import copy_project, sh


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root, env = copy_project(tmp_path_factory.mktemp("e2e") / "repo")
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
