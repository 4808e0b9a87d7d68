"""Faults met through the real `dvc repro` / `dvc exp run` in a finished project: every file
under models/, reports/ and data/prepared/ is byte-identical afterwards (DVC would delete a
stage's outputs before running its command; `persist: true` keeps them, and the stages write
atomically), and an MLflow server that goes away mid-stage costs no finished work."""

import errno
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from threading import Thread

import numpy as np
import psutil
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from conftest import copy_e2e, merge, sh, write_idx

COMPARED = ("models", "reports", "data/prepared")


def checksums(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for d in COMPARED for p in sorted((root / d).rglob("*")) if p.is_file()}


def set_params(root: Path, **groups) -> None:
    params = merge(yaml.safe_load((root / "params.yaml").read_text()), groups)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def dvc(root: Path, env: dict, *args: str) -> subprocess.CompletedProcess:
    return sh(["dvc", *args], root, env, check=False)


def first_error(proc: subprocess.CompletedProcess) -> str:
    lines = (proc.stderr + proc.stdout).splitlines()
    return next(line for line in lines if line.startswith(("error:", "ERROR:")))


def assert_failed_and_intact(proc, root, before, error):
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert first_error(proc).startswith(error), (proc.stdout + proc.stderr)[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert checksums(root) == before


@pytest.fixture(scope="session")
def finished(e2e_build, tmp_path_factory):
    """The finished end-to-end project (every stage run), copied with its tracking database
    and its results committed. Session-scoped: the tests of this module are spread over the
    workers and between other tests (conftest's SPLIT), and each worker makes it once."""
    root, env = copy_e2e(e2e_build, tmp_path_factory.mktemp("finished") / "repo")
    sh(["git", "add", "-A"], root, env)
    sh(["git", "commit", "-qm", "results"], root, env)
    assert "up to date" in sh(["dvc", "status"], root, env).stdout
    return root, env


@pytest.fixture
def project(finished, tmp_path):
    """A fresh copy of the finished project per test (a copytree: cheap)."""
    template, env = finished
    root = tmp_path / "repo"
    shutil.copytree(template, root, symlinks=True)
    shutil.copy2(template.parent / "tracking.db", tmp_path / "tracking.db")
    return root, {**env, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'tracking.db'}"}


@pytest.mark.parametrize("command, edit, error", [
    (["repro"], {"epochs": -1}, "error: train.epochs: -1 is out of range; allowed: [1, 10000]"),
    (["exp", "run"], {"epocs": 3}, "error: train.epocs: unknown key; did you mean 'epochs'?"),
])
def test_bad_params_stop_before_any_output_is_touched(project, command, edit, error):
    root, env = project
    set_params(root, train=edit)
    before = checksums(root)
    proc = dvc(root, env, *command)
    assert_failed_and_intact(proc, root, before, error)
    assert "Running stage 'train'" not in proc.stdout


@pytest.mark.parametrize("fault, error", [
    ("missing", "error: data.root '{root}' does not exist"),
    ("corrupt", "error: {root}/train-images-idx3-ubyte.gz: cannot read"),
])
def test_missing_or_corrupt_dataset_keeps_the_prepared_data(project, tmp_path, fault, error):
    root, env = project
    raw = tmp_path / "raw"
    if fault == "corrupt":  # a download cut short: the gzip stream of the images ends early
        raw.mkdir()
        for split, n in (("train", 60), ("t10k", 20)):
            images = write_idx(raw / f"{split}-images-idx3-ubyte.gz", np.zeros((n, 28, 28)))
            write_idx(raw / f"{split}-labels-idx1-ubyte.gz", np.arange(n) % 10)
            images.write_bytes(images.read_bytes()[:-20])
    set_params(root, data={"dataset": "fashion-mnist", "root": str(raw),
                           "subset": {"train": 40, "val": 5, "test": 10}})
    before = checksums(root)
    proc = dvc(root, env, "repro", "prepare")
    assert_failed_and_intact(proc, root, before, error.format(root=raw))


def test_checkpoint_of_the_wrong_architecture_keeps_the_pruned_outputs(project):
    """A baseline of another architecture dropped into models/ and the prune stage run alone:
    prune stops before touching its outputs, and `dvc checkout --force` brings the recorded
    baseline back."""
    from bnnprune.models import build_model, model_config, save_checkpoint

    root, env = project
    recorded = checksums(root)
    save_checkpoint(root / "models/baseline.pt",
                    build_model(model_config("nin", 0.25, [1, 28, 28], 10)))
    before = checksums(root)
    proc = dvc(root, env, "repro", "--single-item", "prune")
    assert_failed_and_intact(proc, root, before, "error: models/baseline.pt: checkpoint of "
                             "architecture 'nin', but model.arch is 'cnn'")
    sh(["dvc", "checkout", "--force"], root, env)
    assert checksums(root) == recorded


def test_nan_loss_keeps_the_finetuned_outputs(project):
    """A pruned checkpoint whose BatchNorm scales are NaN (the valid lr range cannot produce a
    NaN loss: lr 10, constant, batch 4 stayed finite) fine-tuned alone."""
    root, env = project
    ckpt = torch.load(root / "models/pruned.pt", weights_only=False)
    for name, tensor in ckpt["state_dict"].items():
        if name.endswith("weight") and tensor.dim() == 1:
            tensor.fill_(float("nan"))
    torch.save(ckpt, root / "models/pruned.pt")
    before = checksums(root)
    proc = dvc(root, env, "repro", "--single-item", "finetune")
    assert_failed_and_intact(proc, root, before, "error: finetune: loss is nan at epoch 1 step 1")


class FailingServer(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_error(503, "tracking store down")

    do_POST = do_PATCH = do_DELETE = do_GET

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("server", ["unreachable", "failing"])
def test_tracking_down_when_the_stage_starts_keeps_outputs(project, server):
    root, env = project
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), FailingServer)
    Thread(target=httpd.serve_forever, daemon=True).start()
    port = httpd.server_address[1]
    if server == "unreachable":
        httpd.shutdown()
        httpd.server_close()
    uri = f"http://127.0.0.1:{port}"
    set_params(root, train={"seed": 1})
    before = checksums(root)
    try:
        proc = dvc(root, {**env, "MLFLOW_TRACKING_URI": uri}, "repro", "train")
    finally:
        if server == "failing":
            httpd.shutdown()
            httpd.server_close()
    assert_failed_and_intact(proc, root, before, f"error: MLflow tracking URI '{uri}' is "
                             f"not usable")


def stage_process(parent: psutil.Process, script: str, deadline: float) -> psutil.Process:
    """The Python process running `script`, not the shell DVC may start it from: with SHELL
    unset (as in CI) DVC runs `/bin/sh -c CMD`, and dash does not exec CMD."""
    while time.time() < deadline:
        for child in parent.children(recursive=True):
            try:
                if script in child.cmdline():
                    return child
            except psutil.NoSuchProcess:
                pass
        time.sleep(0.05)
    raise AssertionError(f"no process running {script}")


def test_stage_killed_with_sigkill_keeps_outputs(project):
    root, env = project
    set_params(root, train={"epochs": 40})
    before = checksums(root)
    proc = subprocess.Popen(["dvc", "repro", "train"], cwd=root, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    train = stage_process(psutil.Process(proc.pid), "stages/train.py", time.time() + 60)
    resume = root / ".bnnprune/resume/train.pt"
    deadline = time.time() + 60
    while not resume.exists() and time.time() < deadline:
        time.sleep(0.05)
    train.send_signal(signal.SIGKILL)  # mid-training: one epoch done, its resume state saved
    out, err = proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert re.search(r"exited with (-9|137)", err), err  # -9 direct, 137 through /bin/sh
    assert checksums(root) == before


@contextmanager
def full_tmpfs(folder: Path):
    """`folder` moved onto a tmpfs holding its files, then filled up to the last byte."""
    saved = folder.with_name(folder.name + ".saved")
    shutil.move(folder, saved)
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(folder)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        shutil.copytree(saved, folder, dirs_exist_ok=True)
        try:
            with open(folder / "filler", "wb", buffering=0) as f:
                while True:
                    f.write(b"\0" * 4096)
        except OSError as e:
            assert e.errno == errno.ENOSPC, e
        yield
    finally:
        subprocess.run(["umount", str(folder)], check=True)
        folder.rmdir()
        shutil.move(saved, folder)


@pytest.mark.parametrize("full", ["models", "reports"])
def test_full_disk_keeps_outputs_or_checkout_restores_them(project, full):
    """ENOSPC while the train stage writes its outputs. models/ full: the first checkpoint
    write fails and nothing is replaced. reports/ full: the checkpoints (written first) are
    new, the metrics and plots old, and `dvc checkout --force` restores the checkpoints."""
    root, env = project
    set_params(root, train={"seed": 1})
    recorded = checksums(root)
    with full_tmpfs(root / full):
        before = checksums(root)
        proc = dvc(root, env, "repro", "train")
        after = checksums(root)
    assert proc.returncode != 0
    assert "in write_atomic" in proc.stderr, proc.stderr[-3000:]  # failed writing an output
    assert first_error(proc).startswith("ERROR: failed to reproduce 'train'")
    assert set(after) == set(before)  # no temp file left behind
    changed = {k for k in before if after[k] != before[k]}
    if full == "models":
        assert changed == set()
    else:  # the filled tmpfs is gone with its unchanged reports; the new checkpoints stay
        assert changed == {"models/baseline.pt", "models/flips.pt"}
        sh(["dvc", "checkout", "--force"], root, env)
        assert checksums(root) == recorded


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_mlflow(folder: Path, port: int) -> subprocess.Popen:
    """`mlflow server` on loopback with a SQLite store in `folder`, up within 120 s."""
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1",
         "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
         "--artifacts-destination", str(folder / "artifacts")],
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
            return proc
        except OSError:
            assert proc.poll() is None, "mlflow server exited"
            time.sleep(0.2)
    stop(proc)
    raise AssertionError("mlflow server did not come up in 120 s")


def stop(server: subprocess.Popen) -> None:
    """Kill the server and the workers it started (its own session)."""
    os.killpg(server.pid, signal.SIGKILL)
    server.wait()


def test_tracking_server_killed_mid_stage_keeps_the_work_and_backfills(project, tmp_path):
    """The server dies after the first epoch is logged: training goes on, the stage writes its
    outputs and DVC records them (exit 0, a warning names the journal); once a server is back
    on the same store, `bnnprune backfill` completes the run."""
    root, env = project
    folder, port = tmp_path / "server", free_port()
    folder.mkdir()
    env = {**env, "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}"}
    epochs = 12
    set_params(root, train={"epochs": epochs})
    before = checksums(root)
    server = start_mlflow(folder, port)
    try:
        proc = subprocess.Popen(["dvc", "repro", "train"], cwd=root, env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        resume = root / ".bnnprune/resume/train.pt"
        deadline = time.time() + 120
        while not resume.exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
    finally:
        stop(server)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert "warning: MLflow tracking at" in err and "bnnprune backfill" in err
    after = checksums(root)
    changed = {k for k in before if after.get(k) != before[k]}
    assert {"models/baseline.pt", "reports/metrics/train.json"} <= changed  # the new training
    assert "up to date" in sh(["dvc", "status", "train"], root, env).stdout  # recorded by DVC
    journals = list((root / ".bnnprune/journal").glob("*.jsonl"))
    assert len(journals) == 1
    run_id = journals[0].stem

    server = start_mlflow(folder, port)
    try:
        backfill = sh(["bnnprune", "backfill"], root, env).stdout
        client = MlflowClient(env["MLFLOW_TRACKING_URI"])
        run = client.get_run(run_id)
        epochs_logged = client.get_metric_history(run_id, "train_loss")
        history = client.get_metric_history(run_id, "test_acc")
        artifacts = {a.path for a in client.list_artifacts(run_id)}
    finally:
        stop(server)
    assert "train: " in backfill and run_id in backfill
    assert run.info.status == "FINISHED"
    total = epochs + yaml.safe_load((root / "params.yaml").read_text())["train"]["tail_epochs"]
    assert sorted(m.step for m in epochs_logged) == list(range(1, total + 1))
    assert history and all(m.step == 0 for m in history)  # the stage's final value
    test_acc = json.loads((root / "reports/metrics/train.json").read_text())["test_acc"]
    assert run.data.metrics["test_acc"] == pytest.approx(test_acc)
    assert {"train.json", "train_history.csv", "flip_ratio.csv"} <= artifacts
    assert not list((root / ".bnnprune/journal").iterdir())
