"""Where stage runs are tracked and which code version they are tagged with."""

import re
import subprocess
from pathlib import Path

import pytest

from bnnprune.pipeline import tracking

REPO = Path(__file__).resolve().parents[1]


def git_repo(path, message):
    path.mkdir()
    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t", "PATH": "/usr/bin:/bin"}
    for cmd in (["git", "init", "-q"], ["git", "commit", "-q", "--allow-empty", "-m", message]):
        subprocess.run(cmd, cwd=path, env=env, check=True)
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=path, capture_output=True,
                          text=True, check=True).stdout.strip()


def test_queued_experiment_is_tagged_with_its_own_checkout_but_tracks_to_the_project(
        tmp_path, monkeypatch):
    """DVC runs a queued experiment in a temporary copy and points DVC_ROOT at the project:
    the runs go to the project's database, tagged with the copy's commit (the project's HEAD
    may have moved on since the experiment was queued)."""
    project_head = git_repo(tmp_path / "project", "later work")
    copy_head = git_repo(tmp_path / "copy", "queued experiment")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path / "project"))
    monkeypatch.chdir(tmp_path / "copy")
    assert tracking.git_commit() == copy_head != project_head
    assert tracking.tracking_uri() == f"sqlite:///{tmp_path / 'project' / 'mlflow.db'}"


def test_paths_are_recorded_relative_to_the_checkout(tmp_path, monkeypatch):
    """Also in a queued experiment's copy (DVC_ROOT the project): the same names as in the
    project, so runs of checkouts in different folders record the same."""
    monkeypatch.setenv("DVC_ROOT", str(tmp_path / "project"))
    (tmp_path / "copy").mkdir()
    monkeypatch.chdir(tmp_path / "copy")
    assert tracking.project_path(tmp_path / "copy/stages/train.py") == "stages/train.py"
    assert tracking.project_path("data/prepared") == "data/prepared"
    assert tracking.project_path("/usr/share/fashion-mnist") == "/usr/share/fashion-mnist"


def test_metric_names_follow_one_rule():
    for good in ("val_acc", "final/val_acc", "wall_time_s", "speedup/packed_cpu_b64",
                 "baseline/onnxruntime/latency_ms_b1", "model_size_bits_before", "p/blocks_1"):
        assert tracking.metric_name(good) == good
    # no renames on the way: the old names the stages logged are errors now
    for bad in ("baseline.parity.passed", "Val_acc", "finetune_seconds", "onnx/size",
                "speedup//cpu", "test_acc/flip/0.3", "criteria/flip/test acc",
                "flip_ratio/blocks.1.layer", "seconds", "train_seconds"):
        with pytest.raises(tracking.MetricNameError, match=re.escape(repr(bad))):
            tracking.metric_name(bad)


def test_stage_run_finals_params_and_errors(tmp_path, monkeypatch):
    """A final value of a metric with a per-epoch curve goes to final/<name> (the curve stays
    monotone in step); params are logged as in params.yaml (null, not None); a failed stage's
    run carries its error (tag and error.txt) and a bad metric name is a clear error."""
    import mlflow
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    with tracking.stage_run("train", {"prune": {"target": None, "on": True}}, "k1") as run:
        for epoch in (1, 2, 3):
            mlflow.log_metrics({"val_acc": 0.5 + epoch / 10}, step=epoch)  # as train.fit does
        tracking.log_metrics({"val_acc": 0.8, "test_acc": 0.79})
    client = MlflowClient()
    data = client.get_run(run.info.run_id).data
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_acc")] == [1, 2, 3]
    assert data.metrics["final/val_acc"] == 0.8 and data.metrics["test_acc"] == 0.79
    assert data.params == {"prune.target": "null", "prune.on": "true"}
    with pytest.raises(ValueError, match="no such file"):
        with tracking.stage_run("prepare", {}, "k2") as run:
            raise ValueError("no such file")
    failed = client.get_run(run.info.run_id)
    assert failed.info.status == "FAILED"
    assert failed.data.tags["error"] == "ValueError: no such file"
    text = mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/error.txt")
    assert "Traceback" in text and "no such file" in text
    with pytest.raises(tracking.MetricNameError, match="'train_seconds_total'"):
        with tracking.stage_run("finetune", {}, "k3"):
            tracking.log_metrics({"train_seconds_total": 1.0})


def test_study_cell_runs_record_their_method_not_prune_criterion():
    flat = tracking._run_params("study@flip_random-0.3-1",
                                {"prune": {"criterion": "flip", "tau": 2}})
    assert flat == {"prune.tau": 2, "study.method": "flip_random", "study.budget": 0.3,
                    "study.seed": 1}
    assert tracking._run_params("prune", {"prune": {"criterion": "latent"}}) == {
        "prune.criterion": "latent"}


def test_run_resumed_after_a_kill_is_linked_to_and_under_the_next_summary_run(
        tmp_path, monkeypatch):
    """A train run killed inside a DVC experiment and resumed by a plain `dvc repro`: it is
    this execution's train run, although it started before another finished train run of the
    same commit (a teammate's, on the shared server) and was first tagged with the
    experiment's name."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from bnnprune.core.files import save_json
    from bnnprune.tracking.runs import link_stage_runs

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    client = MlflowClient(tracking.tracking_uri())
    monkeypatch.setenv("DVC_EXP_NAME", "exp-killed")
    # what a SIGKILL leaves: a RUNNING run and the stage's run state
    killed = client.create_run(tracking.ensure_experiment(), run_name="train",
                               tags=tracking._tags("train", "k2")).info.run_id
    save_json(tracking.RUN_STATE_DIR / "train.json", {"run_id": killed, "config_hash": "k2"})
    monkeypatch.delenv("DVC_EXP_NAME")
    (tmp_path / "clone").mkdir()
    monkeypatch.chdir(tmp_path / "clone")  # a teammate's clone of the commit, same server
    with tracking.stage_run("train", {}, "k1") as run:  # started after the killed run
        other = run.info.run_id
    monkeypatch.chdir(tmp_path)
    with tracking.stage_run("train", {}, "k2") as run:
        assert run.info.run_id == killed
    with tracking.stage_run("report", {}, "r") as run:
        links = link_stage_runs(mlflow.get_run(run.info.run_id))
    tags = client.get_run(killed).data.tags
    assert links["train"] == killed != other
    assert tags["mlflow.parentRunId"] == run.info.run_id
    assert tags["resumed"] == "true" and "dvc_exp_name" not in tags


def test_invalid_params_end_the_validate_run_failed_with_the_error(tmp_path, monkeypatch):
    import runpy

    import yaml
    from mlflow.tracking import MlflowClient

    from bnnprune.pipeline.config import ConfigError

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["train"]["epochs"] = -1
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    validate = runpy.run_path(str(REPO / "stages/validate.py"))["main"]
    with pytest.raises(ConfigError, match="train.epochs"):
        validate()
    client = MlflowClient(tracking.tracking_uri())
    [run] = client.search_runs([tracking.ensure_experiment()], "tags.stage = 'validate'")
    assert run.info.status == "FAILED" and "train.epochs" in run.data.tags["error"]
    assert not (tmp_path / ".bnnprune/params.valid").exists()
