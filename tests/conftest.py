import gzip
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
REPO = Path(__file__).resolve().parents[1]


def write_idx(path: Path, array: np.ndarray, magic_dims: int | None = None,
              compress: bool = True) -> Path:
    dims = array.ndim if magic_dims is None else magic_dims
    raw = struct.pack(">I", 0x0800 | dims) + struct.pack(f">{array.ndim}I", *array.shape)
    raw += array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if compress else raw)
    return path


@pytest.fixture
def idx_root(tmp_path: Path) -> Path:
    """A tiny Fashion-MNIST-style folder: 60 train and 20 test 28x28 images, 10 classes."""
    rng = np.random.default_rng(0)
    root = tmp_path / "idx"
    root.mkdir()
    for split, n in (("train", 60), ("t10k", 20)):
        write_idx(root / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        write_idx(root / f"{split}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    return root


def tiny_bnn(arch: str, in_shape: list[int], width: float, channels: list[int] | None = None,
             seed: int = 0):
    """A small BNN in eval mode with random BatchNorm statistics (some gamma < 0, and a
    constant channel: gamma 0), so folded thresholds of every kind are exercised."""
    from bnnprune.models import build_model, model_config

    cfg = model_config(arch, width, in_shape, 10)
    if channels is not None:
        cfg["channels"] = channels
    model = build_model(cfg, seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
                n = m.num_features
                m.weight.copy_(torch.randn(n, generator=g))
                m.weight[0] = 0.0
                m.bias.copy_(torch.randn(n, generator=g))
                m.running_mean.copy_(torch.randn(n, generator=g) * 3)
                m.running_var.copy_(torch.rand(n, generator=g) * 20 + 0.5)
    return model.eval()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


TINY = {
    "data": {"dataset": "synthetic", "subset": {"train": 200, "val": 50, "test": 50}},
    "model": {"width": 0.25},
    "train": {"epochs": 2, "batch_size": 32, "threads": 1},
    # timing budgets: the numbers are not asserted on, only that the stages run and report
    "export": {"latency_batch_sizes": [1, 8], "latency_repeats": 2, "threads": 1},
    "benchmark": {"batch_size": 16, "threads": 1, "warmup": 1, "repeats": 2},
    # the smallest study that still pairs seeds: 2 methods x 1 budget x 2 seeds
    "study": {"methods": ["flip", "flip_random"], "budgets": [0.3], "seeds": [0, 1],
              "recovery_steps": 2, "batch_size": 32, "channel_samples": 3,
              "sensitivity_images": 50, "bootstrap": 200},
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


def copy_project(root: Path, **override) -> tuple[Path, dict]:
    """A committed copy of the repo (tracked + new files) with tiny params, and its env."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                           cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    for name in files:  # sources only: no trained models from the developer's workspace
        if (REPO / name).is_file() and not name.startswith(("models/", "data/")):
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, root / name)
    # numba's on-disk cache of the kernels the suite has compiled so far: valid in the copy
    # (same source size and mtime, which copy2 keeps), so its stages skip ~15 s of compiling
    for cache in (REPO / "src").rglob("__pycache__/*.nb[ic]"):
        (root / cache.relative_to(REPO)).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(cache, root / cache.relative_to(REPO))
    params = merge(tiny_params(yaml.safe_load((root / "params.yaml").read_text())), override)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}", "GIT_AUTHOR_NAME": "t",
           "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    env.pop("DVC_EXP_NAME", None)
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "init"]):
        sh(cmd, root, env)
    return root, env


@pytest.fixture(scope="session")
def e2e_project(tmp_path_factory):
    """One real `dvc repro` of the whole pipeline on tiny synthetic data, in a committed copy
    of the repo: the most expensive set-up of the suite, shared by test_pipeline and
    test_reliability's queued experiments (which may add experiments to it; the test that
    changes the workspace, test_pipeline's `dvc exp run`, is the last of test_pipeline).
    The prune rule is loosened (tau 0, floor 2 channels) so that the tiny network really
    shrinks and export/benchmark/report measure a pruned model. MLflow tracks to a database
    outside the project (as with a tracking server), which leaves the project's default
    `mlflow.db` to the queued experiments. Under pytest-xdist each worker builds its own (a
    session fixture is per process); a worker runs its tests in collection order, so
    test_faults still copies the project before test_pipeline's `dvc exp run` changes it."""
    root, env = copy_project(tmp_path_factory.mktemp("e2e") / "repo",
                             prune={"tau": 0, "min_channels": 2})
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{root.parent / 'tracking.db'}"
    sh(["dvc", "repro"], root, env)
    return root, env
