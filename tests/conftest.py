import gzip
import os
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from bnnprune.core.files import file_lock

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


def project_env(root: Path, tracking_uri: str | None = None) -> dict:
    """The environment the stages of the project copy `root` run with: this interpreter's
    tools first, MLflow tracking to `tracking_uri` (default: the project's own mlflow.db)."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "MLFLOW_TRACKING_URI": tracking_uri or f"sqlite:///{root / 'mlflow.db'}",
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    env.pop("DVC_EXP_NAME", None)
    return env


# What the tiny pipelines' stages run on the engines: compiled once per session into this
# checkout's own numba cache, which `copy_project` copies along. On a fresh clone (CI) the cache
# is empty, and each stage of each pipeline would otherwise compile the same kernels anew.
WARM_KERNELS = """
import sys, torch
sys.path.insert(0, sys.argv[1])  # tests/: the user's model
from bnnprune.engines.bench_kernels import PeakXorPopcount
from bnnprune.engines.packed import PackedModel
from bnnprune.models import build_model, model_config
PeakXorPopcount(1, reps=1)
for arch, kwargs, binary in (("cnn", None, None), ("birealnet", None, None),
                             ("usermodels.tiny_bireal:build", {"width": 8},
                              ["usermodels.tiny_bireal:MyBinaryConv"])):
    model = build_model(model_config(arch, 0.25, [1, 28, 28], 10, kwargs, binary), seed=0)
    PackedModel.from_model(model.eval())(torch.zeros(2, 1, 28, 28))
"""
WARM_WAIT = 600  # s: only a bound


def warm_kernels() -> None:
    """Compile the engines' kernels into the checkout's cache, once per session (a marker
    next to the session's shared folder, named by the environment); a failure here is only
    reported: the stages then compile for themselves, as they would anyway."""
    shared = os.environ.get("BNNPRUNE_TEST_SHARED")
    if not shared:
        return
    done = Path(shared) / "kernels-warm"
    with file_lock(Path(shared) / "kernels-warm.lock"):
        if done.exists():
            return
        proc = subprocess.run([sys.executable, "-c", WARM_KERNELS, str(Path(__file__).parent)],
                              cwd=REPO, capture_output=True, text=True, timeout=WARM_WAIT,
                              env={**os.environ, "PYTHONPATH": str(REPO / "src")})
        if proc.returncode != 0:
            print(f"warming the numba kernels failed (the stages compile them):\n{proc.stderr}")
        done.write_text(str(proc.returncode))


def copy_project(root: Path, **override) -> tuple[Path, dict]:
    """A committed copy of the repo (tracked + new files) with tiny params, and its env."""
    warm_kernels()
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
    env = project_env(root)
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "init"]):
        sh(cmd, root, env)
    return root, env


# --- the shared end-to-end project -----------------------------------------------------------
# One real `dvc repro` of the whole pipeline on tiny synthetic data (~2 CPU-minutes), built once
# per session for every pytest-xdist worker: the first worker whose collected tests use
# `e2e_project` starts the build in a background process as its session begins (so both workers
# go on with other tests meanwhile), under a lock in the folder the workers share; the tests get
# copies of the finished build (a copytree: seconds), never the build itself.

E2E_OVERRIDE = {"prune": {"tau": 0, "min_channels": 2}}
E2E_WAIT = 1800  # s: only a bound; the wait ends when the build does


def build_e2e(folder: Path) -> None:
    """The build itself: `folder`/repo, tracked to `folder`/tracking.db (outside the project,
    as with a tracking server, which leaves the project's default `mlflow.db` to the queued
    experiments). The prune rule is loosened (tau 0, floor 2 channels) so that the tiny network
    really shrinks and export/benchmark/report measure a pruned model."""
    root, env = copy_project(folder / "repo", **E2E_OVERRIDE)
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{folder / 'tracking.db'}"
    sh(["dvc", "repro"], root, env)


def shared_folder(tmp_path_factory) -> Path:
    """The session's temporary folder that every xdist worker sees (each worker's own
    basetemp is a `popen-gwN` folder inside it)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def start_e2e_build(shared: Path) -> subprocess.Popen | None:
    """Start the build in the background unless a worker already has."""
    folder = shared / "e2e"
    with file_lock(shared / "e2e.lock"):
        if folder.exists():
            return None
        folder.mkdir()
        log = open(folder / "build.log", "w")  # the child's: closed here once it has it
        code = ("import sys; from pathlib import Path; sys.path.insert(0, sys.argv[1]); "
                "import conftest; folder = Path(sys.argv[2])\n"
                "try:\n    conftest.build_e2e(folder); status = '0'\n"
                "except BaseException as e:\n    print(e, flush=True); status = '1'\n"
                "(folder / 'status.tmp').write_text(status)\n"
                "(folder / 'status.tmp').rename(folder / 'status')")
        proc = subprocess.Popen([sys.executable, "-c", code, str(Path(__file__).parent),
                                 str(folder)], stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTEST_XDIST_WORKER": ""})
        log.close()
        (folder / "pid").write_text(str(proc.pid))
        return proc


def alive(pid: int) -> bool:
    try:  # a zombie (ended, not yet reaped by the worker that started it) is not alive
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def wait_e2e_build(shared: Path) -> Path:
    folder = shared / "e2e"
    status, deadline = folder / "status", time.time() + E2E_WAIT
    while not status.exists():
        assert time.time() < deadline, f"the e2e build in {folder} did not end in {E2E_WAIT} s"
        pid = folder / "pid"
        if pid.exists() and not alive(int(pid.read_text())) and not status.exists():
            raise AssertionError(f"the e2e build in {folder} was killed:\n"
                                 + (folder / "build.log").read_text()[-6000:])
        time.sleep(0.5)
    assert status.read_text() == "0", (folder / "build.log").read_text()[-6000:]
    return folder / "repo"


@pytest.fixture(scope="session", autouse=True)
def _e2e_build_in_background(request, tmp_path_factory):
    """Starts the shared build at the session's first test when a collected test needs it;
    names the shared folder for `warm_kernels` (this process, its children)."""
    os.environ["BNNPRUNE_TEST_SHARED"] = str(shared_folder(tmp_path_factory))
    proc = None
    if any({"e2e_project", "e2e_build"} & set(getattr(item, "fixturenames", ()))
           for item in request.session.items):
        proc = start_e2e_build(shared_folder(tmp_path_factory))
    yield
    if proc is not None:
        proc.wait()


def copy_e2e(build: Path, root: Path) -> tuple[Path, dict]:
    """A copy of the finished build at `root` with its own copy of the tracking database
    (`root`/../tracking.db), and its env. The MLflow runs keep the artifact folder of the build
    (`build`/mlruns), which stays as it is: the copies only read it or add new runs' files."""
    root.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(build, root, symlinks=True)
    shutil.copy2(build.parent / "tracking.db", root.parent / "tracking.db")
    return root, project_env(root, f"sqlite:///{root.parent / 'tracking.db'}")


@pytest.fixture(scope="session")
def e2e_build(tmp_path_factory) -> Path:
    """The project folder of the one finished build (read only: copy it with `copy_e2e`)."""
    shared = shared_folder(tmp_path_factory)
    start_e2e_build(shared)  # when no collected test asked for it (a test run by its id)
    return wait_e2e_build(shared)


@pytest.fixture(scope="session")
def e2e_project(e2e_build, tmp_path_factory) -> tuple[Path, dict]:
    """This worker's copy of the finished end-to-end project: every stage of `dvc repro` run,
    tracked to ../tracking.db. The tests read it and run DVC commands that change nothing
    (status, a no-op repro, `bnnprune check` into a copy of the database); a test that changes
    the project or its database works on a copy of its own (`copy_e2e`)."""
    return copy_e2e(e2e_build, tmp_path_factory.mktemp("e2e") / "repo")


# --- spreading the suite over the pytest-xdist workers ----------------------------------------
# A work unit is a module (its module fixtures set up once, on one worker), except in the
# modules of SPLIT, whose tests are units of their own: they are few and long, and share nothing
# costlier than a copy. The units go out longest first (estimated CPU seconds below, measured
# 2026-12-06; a unit not listed counts 1 s per test), to whichever worker is free, so that the
# short ones even out the end. Those that wait for the shared e2e build come after the long ones
# that do not, which keep both workers busy while it runs in the background.

SPLIT = {"tests/test_faults.py", "tests/test_any_model_outputs.py", "tests/test_pipeline.py",
         "tests/test_reliability.py", "tests/test_dvc_remote.py", "tests/test_registry.py",
         "tests/test_ddp.py", "tests/test_tracking.py"}
COST = {  # unit -> estimated CPU seconds on an idle core
    "tests/test_any_model_outputs.py::test_birealnet_runs_the_whole_pipeline": 120,
    "tests/test_any_model_outputs.py::test_a_users_model_runs_the_whole_pipeline": 110,
    "tests/test_ddp.py::test_torchrun_two_processes_train_resume_after_kill": 60,
    "tests/test_kernels_triton.py": 60, "tests/test_kernels_cpu.py": 40, "tests/test_api.py": 35,
    "tests/test_export.py": 30, "tests/test_study.py": 30, "tests/test_benchmark.py": 30,
    "tests/test_report.py": 20, "tests/test_triton_engine.py": 20, "tests/test_engine.py": 15,
    "tests/test_study_any_model.py": 15, "tests/test_engine_residual.py": 15,
    "tests/test_distill.py": 10, "tests/test_prune.py": 20, "tests/test_gate.py": 10,
    "tests/test_reliability.py::test_sigkill_mid_training_then_rerun_resumes_and_completes_one"
    "_mlflow_run": 40,
    "tests/test_reliability.py::test_same_params_and_seed_give_identical_metrics_files": 30,
    "tests/test_reliability.py::test_queued_experiments_run_in_parallel_and_all_reach_mlflow": 60,
    "tests/test_server.py": 90,
    "tests/test_faults.py::test_tracking_server_killed_mid_stage_keeps_the_work_and_backfills": 60,
    "tests/test_dvc_remote.py::test_push_then_fresh_clone_pull_and_repro_runs_nothing": 30,
    "tests/test_pipeline.py::test_exp_run_with_override_shows_in_exp_show": 30,
    "tests/test_registry.py::test_report_registers_candidate_and_check_promotes_champion": 15,
    "tests/test_mlflow_store.py": 15,
}
COST.update({f"tests/test_faults.py::{name}": 20 for name in (
    "test_stage_killed_with_sigkill_keeps_outputs",
    "test_full_disk_keeps_outputs_or_checkout_restores_them[models]",
    "test_full_disk_keeps_outputs_or_checkout_restores_them[reports]",
    "test_nan_loss_keeps_the_finetuned_outputs",
    "test_checkpoint_of_the_wrong_architecture_keeps_the_pruned_outputs")})


def unit_of(nodeid: str) -> str:
    module = nodeid.split("::", 1)[0]
    return nodeid if module in SPLIT else module


def pytest_collection_modifyitems(config, items):
    """Orders the units longest first (see above); a unit's own tests keep their order."""
    units: dict[str, list] = {}
    for item in items:
        units.setdefault(unit_of(item.nodeid), []).append(item)

    def cost(unit: str) -> float:
        return COST.get(unit, len(units[unit]))

    def waits_for_e2e(unit: str) -> bool:
        return any({"e2e_project", "e2e_build"} & set(item.fixturenames) for item in units[unit])

    ahead = sorted((u for u in units if not waits_for_e2e(u) and cost(u) >= 30), key=cost,
                   reverse=True)
    rest = sorted((u for u in units if u not in ahead), key=cost, reverse=True)
    items[:] = [item for unit in ahead + rest for item in units[unit]]


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """pytest-xdist's loadscope scheduler with `unit_of`'s units, taken in collection order,
    for the default `--dist load` (another `--dist` given on the command line is kept)."""
    if config.getvalue("dist") != "load":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class UnitScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return unit_of(nodeid)

    config.option.loadscopereorder = False  # the collection's order, set above
    return UnitScheduling(config, log)
