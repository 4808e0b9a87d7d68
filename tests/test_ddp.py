"""Distributed training: `train.nproc: 2` runs the train stage under a real torchrun with DDP
(gloo on CPU); the ranks' flip counts agree at every epoch end; rank 0 alone writes and logs;
a killed run resumes from its last epoch."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml
from mlflow.tracking import MlflowClient

from bnnprune.core.flips import load_flips
from bnnprune.models import load_checkpoint

from conftest import copy_project, sh

PY = sys.executable
EPOCHS = 4
TRAIN_IMAGES = 640


def process_tree(pid: int) -> list[int]:
    """`pid` and its descendants (torchrun starts its workers in sessions of their own, so a
    process-group kill does not reach them)."""
    parent = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
    tree = [pid]
    for p in tree:
        tree += [c for c, pp in parent.items() if pp == p]
    return tree


def test_torchrun_two_processes_train_resume_after_kill(tmp_path):
    root, env = copy_project(tmp_path / "repo",
                             data={"subset": {"train": TRAIN_IMAGES, "val": 50, "test": 50}},
                             train={"epochs": EPOCHS, "nproc": 2, "batch_size": 32})
    env = {**env, "PYTHONPATH": "src"}
    sh([PY, "stages/prepare.py"], root, {**env, "BNNPRUNE_MLFLOW": "off"})
    resume = root / ".bnnprune/resume/train.pt"
    # kill the whole process tree (the stage, torchrun and both workers) after the first epoch
    proc = subprocess.Popen([PY, "stages/train.py"], cwd=root, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not resume.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    for pid in process_tree(proc.pid):
        os.kill(pid, signal.SIGKILL)
    proc.wait()
    killed_after = torch.load(resume, weights_only=False)["epoch"] + 1
    assert killed_after < EPOCHS + 1, "training finished before the kill"
    assert not (root / "models/baseline.pt").exists()

    out = sh([PY, "stages/train.py"], root, env)
    log = out.stdout + out.stderr
    assert "torch.distributed.run --standalone --nproc_per_node=2" in log
    assert f"resuming from .bnnprune/resume/train.pt after epoch {killed_after}" in log
    epochs = EPOCHS + 1  # + the tail epoch
    agreed = [e for e in range(killed_after + 1, epochs + 1)
              if f"train epoch {e}: flip counts identical on 2 ranks" in log]
    assert agreed == list(range(killed_after + 1, epochs + 1)), log[-3000:]
    assert (root / "models/baseline.pt").exists() and not resume.exists()
    # the flip counts (rank 0's; equal on every rank by the checksum): the model's binary layers
    # and shapes, one observation per global step of every counted epoch (those before the
    # kill included), and flips that happened, at most one per weight and observation
    flips = load_flips(root / "models/flips.pt", load_checkpoint(root / "models/baseline.pt")[0])
    train = yaml.safe_load((root / "params.yaml").read_text())["train"]
    steps = math.ceil(TRAIN_IMAGES / train["batch_size"])
    assert flips["observations"] == min(train["flip_window"], EPOCHS) * steps
    assert flips["tail_observations"] == train["tail_epochs"] * steps
    counts = torch.cat([c.flatten() for c in flips["counts"].values()])
    assert 0 < counts.sum() and 0 <= counts.min() and counts.max() <= flips["observations"]
    metrics = json.loads((root / "reports/metrics/train.json").read_text())
    assert metrics["flip_observations"] == flips["observations"]
    # rank 0 alone tracked: one train run, continued after the kill
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("bnnprune")
    runs = [r for r in client.search_runs([exp.experiment_id])
            if r.data.tags.get("stage") == "train"]
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].data.tags.get("resumed") == "true"
    assert runs[0].data.params["train.nproc"] == "2"
    assert runs[0].data.tags["mlflow.source.name"] == "stages/train.py"  # not the folder
    history = client.get_metric_history(runs[0].info.run_id, "val_acc")
    assert sorted(m.step for m in history if m.step) == list(range(1, epochs + 1))
