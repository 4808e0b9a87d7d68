"""MLflow wiring: one run per stage, in one experiment, in the project's `mlflow.db`.

`MLFLOW_TRACKING_URI` overrides the default `sqlite:///<project>/mlflow.db`. DVC runs queued
experiments in temporary copies of the project; the default URI points at the project itself
there too (DVC_ROOT), so every experiment lands in the same database.
`BNNPRUNE_MLFLOW=off` turns tracking off explicitly (every DVC output is still written).
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")

import mlflow  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from bnnprune.config import flat_dict  # noqa: E402
from bnnprune.files import load_json, save_json  # noqa: E402

EXPERIMENT = os.environ.get("BNNPRUNE_EXPERIMENT", "bnnprune")
RUN_STATE_DIR = Path(".bnnprune/runs")


class TrackingError(RuntimeError):
    pass


def enabled() -> bool:
    return os.environ.get("BNNPRUNE_MLFLOW", "on").lower() not in ("off", "0", "false")


def project_root() -> Path:
    """The project folder: DVC sets DVC_ROOT to it, also for queued experiments that run in
    temporary copies; otherwise the working directory."""
    return Path(os.environ.get("DVC_ROOT") or Path.cwd()).resolve()


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{project_root() / 'mlflow.db'}"


def git_commit() -> str:
    """The commit of the checkout the stage runs in: for a queued experiment, DVC's temporary
    copy (its baseline commit), not the project's HEAD, which may have moved on since."""
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


@contextmanager
def _sqlite_creation_lock(uri: str) -> Iterator[None]:
    """Serialise the first use of a SQLite store across processes: MLflow creates and migrates
    the schema on first use, and two experiments starting together would race on it."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    lock_path = Path(uri.removeprefix("sqlite:///") + ".lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def ensure_experiment(retries: int = 3) -> str:
    """Point MLflow at the tracking URI and return the experiment id, creating it once.

    Fails with one clear error when the tracking server cannot be reached."""
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    for attempt in range(retries):
        try:
            with _sqlite_creation_lock(uri):
                client = MlflowClient(uri)
                exp = client.get_experiment_by_name(EXPERIMENT)
                return exp.experiment_id if exp else client.create_experiment(EXPERIMENT)
        except Exception as e:  # no server, or a database we cannot open
            last = e
            time.sleep(0.5 * (attempt + 1))
    raise TrackingError(
        f"MLflow tracking URI {uri!r} is not usable ({type(last).__name__}: {last}). Fix or "
        f"unset MLFLOW_TRACKING_URI, or set BNNPRUNE_MLFLOW=off to run without tracking.")


def _tags(stage: str, config_hash: str) -> dict[str, str]:
    tags = {"stage": stage, "git_commit": git_commit(), "config_hash": config_hash}
    if os.environ.get("DVC_EXP_NAME"):
        tags["dvc_exp_name"] = os.environ["DVC_EXP_NAME"]
    return tags


@contextmanager
def stage_run(stage: str, params: Any, config_hash: str) -> Iterator[Any]:
    """One MLflow run for one stage execution.

    A run left RUNNING by a killed process of the same stage and config is continued (and
    tagged `resumed`) instead of duplicated. The run ends FAILED if the stage raises."""
    if not enabled():
        yield None
        return
    experiment_id = ensure_experiment()
    state_file = RUN_STATE_DIR / f"{stage}.json"
    run_id = None
    if state_file.is_file():
        state = load_json(state_file)
        if state.get("config_hash") == config_hash:
            run_id = state["run_id"]
    with mlflow.start_run(run_id=run_id, experiment_id=None if run_id else experiment_id,
                          run_name=None if run_id else stage,
                          tags=None if run_id else _tags(stage, config_hash)) as run:
        if run_id:
            mlflow.set_tag("resumed", "true")
        else:
            mlflow.log_params({k: v for k, v in flat_dict(params).items()})
        save_json(state_file, {"run_id": run.info.run_id, "config_hash": config_hash})
        yield run
    state_file.unlink(missing_ok=True)


def log_metrics(metrics: dict[str, float], step: int | None = None) -> None:
    if mlflow.active_run():
        mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)


def log_artifacts(*paths: str | Path) -> None:
    if not mlflow.active_run():
        return
    for p in map(Path, paths):
        if p.is_dir():
            mlflow.log_artifacts(str(p), artifact_path=p.name)
        elif p.is_file():
            mlflow.log_artifact(str(p))
