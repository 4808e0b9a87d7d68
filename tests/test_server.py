"""The shared tracking server: scripts/mlflow_server.sh starts a real PostgreSQL 15 and a real
`mlflow server` on 127.0.0.1; the tiny pipeline logs to it over HTTP; everything is checked
through the REST client; a stage started while the server is down stops before any work."""

import json
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from bnnprune.pipeline.tracking import dataset_digest
from bnnprune.tracking.registry import CANDIDATE

from conftest import REPO, copy_project, sh

PG_BIN = Path("/usr/lib/postgresql/15/bin")
SCRIPT = REPO / "scripts/mlflow_server.sh"

pytestmark = pytest.mark.skipif(not (PG_BIN / "pg_ctl").is_file(),
                                reason="PostgreSQL 15 missing: `make postgres` installs it")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    """PostgreSQL + MLflow server in a folder of their own (under /tmp: the postgres user must
    be able to reach it), on free loopback ports; both stopped and the folder removed after."""
    data = Path(tempfile.mkdtemp(prefix="bnnprune-mlflow-"))
    data.chmod(0o711)
    env = {**os.environ, "MLFLOW_DATA": str(data / "server"), "MLFLOW_PORT": str(free_port()),
           "PG_PORT": str(free_port()), "MLFLOW_SERVER_WAIT": "120"}
    try:
        start = subprocess.run([str(SCRIPT), "start"], env=env, capture_output=True, text=True,
                               timeout=300)
        assert start.returncode == 0, start.stdout + start.stderr
        yield f"http://127.0.0.1:{env['MLFLOW_PORT']}", env
    finally:
        stop = subprocess.run([str(SCRIPT), "stop"], env=env, capture_output=True, text=True,
                              timeout=120)
        shutil.rmtree(data, ignore_errors=True)
        assert stop.returncode == 0, stop.stdout + stop.stderr


TRACKED = ["train", "export", "report"]  # params + metrics, logged model, summary + registry


def test_tiny_pipeline_logs_to_the_postgres_backed_server(server, e2e_project, tmp_path):
    """The shared tiny pipeline (conftest's e2e_build, built once per session), copied; its
    training, export and report stages re-run (`dvc repro -f -s`) against the server."""
    uri, server_env = server
    root = tmp_path / "repo"
    shutil.copytree(e2e_project[0], root, symlinks=True)
    env = {**e2e_project[1], "MLFLOW_TRACKING_URI": uri}
    (root / "mlflow.db").unlink(missing_ok=True)  # test_reliability's queued runs made one
    sh(["dvc", "repro", "-f", "-s", *TRACKED], root, env)
    assert not (root / "mlflow.db").exists()  # nothing went to the SQLite default

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("bnnprune")
    runs = client.search_runs([exp.experiment_id])
    assert sorted(r.data.tags["stage"] for r in runs if r.info.status == "FINISHED") == \
        sorted(TRACKED)
    # the runs are rows of the PostgreSQL database behind the server
    count = subprocess.run([str(PG_BIN / "psql"), "-h", "127.0.0.1", "-p", server_env["PG_PORT"],
                            "-U", "postgres", "-d", "mlflow", "-tAc", "SELECT count(*) FROM runs"],
                           env={**server_env, "PGPASSFILE": server_env["MLFLOW_DATA"] + "/pgpass"},
                           capture_output=True, text=True, timeout=30, check=True)
    assert int(count.stdout) == len(runs)
    by_stage = {r.data.tags["stage"]: r for r in runs}
    train = json.loads((root / "reports/metrics/train.json").read_text())
    train_run = by_stage["train"]
    # the params this copy has
    epochs = yaml.safe_load((root / "params.yaml").read_text())["train"]["epochs"]
    assert train_run.data.params["train.epochs"] == str(epochs)
    assert train_run.data.metrics["test_acc"] == pytest.approx(train["test_acc"])
    history = client.get_metric_history(train_run.info.run_id, "val_acc")
    assert sorted(m.step for m in history if m.step) == list(range(1, epochs + 2))  # + tail
    # artifacts go through the server's artifact proxy into its artifact store
    assert {"train.json", "train_history.csv"} <= {
        f.path for f in client.list_artifacts(train_run.info.run_id)}
    local = client.download_artifacts(train_run.info.run_id, "train.json", str(tmp_path))
    assert json.loads(Path(local).read_text()) == train
    assert any(Path(server_env["MLFLOW_DATA"], "artifacts").rglob("train.json"))
    # logged models: the export stage's two; the report stage registers the pruned one
    models = client.search_logged_models(experiment_ids=[exp.experiment_id])
    exported = {m.name: m for m in models if m.source_run_id == by_stage["export"].info.run_id}
    assert set(exported) == {"baseline_bnn_onnx", "pruned_bnn_onnx"}
    summary = json.loads((root / "reports/summary.json").read_text())
    candidate = client.get_model_version_by_alias("bnnprune-synthetic-cnn", CANDIDATE)
    assert candidate.source == f"models:/{exported['pruned_bnn_onnx'].model_id}"
    # the summary run's dataset input and model output go through the REST API too
    assert [m.model_id for m in by_stage["report"].outputs.model_outputs] == [
        exported["pruned_bnn_onnx"].model_id]
    card = json.loads((root / "data/prepared/card.json").read_text())
    for stage in ("train", "report"):
        [dataset] = by_stage[stage].inputs.dataset_inputs
        assert dataset.dataset.digest == dataset_digest(card)
    assert float(candidate.tags["pruned.test_acc"]) == pytest.approx(
        summary["pruned"]["test_acc"])


def test_the_server_restarts_right_after_a_stop(server):
    """`make mlflow-server-stop && make mlflow-server`: the connections the server just closed
    (TIME_WAIT on its port) must not make the start refuse the port; the data is kept."""
    uri, env = server
    before = MlflowClient(uri).search_experiments()
    for action in ("stop", "start"):
        proc = subprocess.run([str(SCRIPT), action], env=env, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    assert [e.name for e in MlflowClient(uri).search_experiments()] == [e.name for e in before]


def test_stage_started_while_the_server_is_down_stops_before_any_work(tmp_path):
    """No server at the URI: the stage fails at once with one line naming the URI and the ways
    out, and writes nothing (the reliability rule: finished work is never thrown away)."""
    root, env = copy_project(tmp_path / "repo")
    env["MLFLOW_TRACKING_URI"] = f"http://127.0.0.1:{free_port()}"
    proc = sh(["python", "stages/prepare.py"], root, {**env, "PYTHONPATH": "src"}, check=False)
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"error: MLflow tracking URI '{env['MLFLOW_TRACKING_URI']}' "
                                  f"is not usable"), proc.stderr
    assert "BNNPRUNE_MLFLOW=off" in proc.stderr
    assert not (root / "data/prepared").exists()
