"""MLflow wiring: one run per stage, in one experiment, in the project's `mlflow.db`.

`MLFLOW_TRACKING_URI` overrides the default `sqlite:///<project>/mlflow.db`. DVC runs queued
experiments in temporary copies of the project; the default URI points at the project itself
there too (DVC_ROOT), so every experiment lands in the same database.
`BNNPRUNE_MLFLOW=off` turns tracking off explicitly (every DVC output is still written).

Tracking that stops working in the middle of a stage does not stop the stage: from the first
failed call on, everything the run would have logged (metrics with their steps and times, tags,
artifacts, its end) goes to a journal, `.bnnprune/journal/<run id>.jsonl` in the project, the
stage writes its outputs and ends with a warning, and `bnnprune backfill` replays the journal
once the server is back. A server that cannot be reached when a stage starts stops the stage
before any work (TrackingError).

Metric names follow one rule, METRIC_NAME, checked on every metric logged through this module
(library code's `mlflow.log_metrics` included, see _fluent_calls_journaled): snake_case segments
joined by "/" (MLflow groups charts on it); a unit suffix where the quantity has one (`_s`,
`_ms`, `_bytes`, `_bits`, `_pct`, `_pt`); no bare "size" and no "seconds". A batch size is part of
a latency or speedup name (`_b64`). A value logged without a step for a metric that already has
a per-step curve in the run (a stage's final val_acc after its per-epoch val_acc) is logged as
`final/<name>`, so the curve is not followed by a point at step 0. Layer names become segments
through layer_segment ("blocks.1.layer" -> "blocks_1").

The experiment is tagged as a model-training one (EXPERIMENT_KIND; MLflow 3.17's UI picks its
view from its sidebar switch instead, see README). The training and summary runs log the
prepared dataset as a dataset input (log_dataset), its digest from the card's checksums
(dataset_digest).

A run that ends FAILED carries its error: tag `error` (type and message) and the artifact
`error.txt` (the traceback), logged before it is marked FAILED.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")

import mlflow  # noqa: E402
import numpy as np  # noqa: E402
from mlflow.entities import (  # noqa: E402
    Dataset,
    DatasetInput,
    InputTag,
    LoggedModelOutput,
    Metric,
    Param,
    RunTag,
)
from mlflow.exceptions import MlflowException  # noqa: E402
from mlflow.tracking import MlflowClient, fluent  # noqa: E402

from bnnprune.core.errors import UserError
from bnnprune.core.files import file_lock, load_json, save_json, write_atomic  # noqa: E402
from bnnprune.pipeline.config import flat_dict  # noqa: E402

EXPERIMENT = os.environ.get("BNNPRUNE_EXPERIMENT", "bnnprune")
RUN_STATE_DIR = Path(".bnnprune/runs")
JOURNAL_DIR = ".bnnprune/journal"  # under the project root


# The naming rule for metric names (see the module docstring): snake_case segments joined by "/",
# and no unit spelled "seconds"/"secs" or a segment ending in a bare "size" (say `_bytes`/`_bits`).
METRIC_NAME = re.compile(r"(?!.*(?:^|[/_])(?:seconds|secs?)(?:$|[/_]))(?!.*(?:^|[/_])size(?:$|/))"
                         r"[a-z][a-z0-9_]*(?:/[a-z0-9][a-z0-9_]*)*")

# The experiment tag that says what it is for ("genai_development" is the GenAI kind)
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


class TrackingError(UserError, RuntimeError):
    pass


class MetricNameError(ValueError):
    """A metric name that breaks the naming rule (METRIC_NAME): a bug in the code logging it."""


def layer_segment(layer: str) -> str:
    """A model layer's name as a metric name segment: "blocks.1.layer" -> "blocks_1"."""
    return layer.removesuffix(".layer").replace(".", "_")


def metric_name(name: str) -> str:
    """`name` itself; MetricNameError when it breaks METRIC_NAME."""
    if not METRIC_NAME.fullmatch(name):
        raise MetricNameError(
            f"metric name {name!r} breaks the naming rule (tracking.METRIC_NAME): snake_case "
            f"segments joined by '/', units as suffixes (_s, _ms, _bytes, _bits, _pct), no bare "
            f"'size' and no 'seconds'")
    return name


def param_value(value: Any) -> str:
    """A param as MLflow shows it: strings as they are, anything else as in params.yaml (JSON:
    null, true, [0.3, 0.5]) rather than Python's repr ("None", "True")."""
    return value if isinstance(value, str) else json.dumps(value)


def enabled() -> bool:
    return os.environ.get("BNNPRUNE_MLFLOW", "on").lower() not in ("off", "0", "false")


def project_root() -> Path:
    """The project folder: DVC sets DVC_ROOT to it, also for queued experiments that run in
    temporary copies; otherwise the working directory."""
    return Path(os.environ.get("DVC_ROOT") or Path.cwd()).resolve()


def project_path(path: str | Path) -> str:
    """`path` as outputs and runs record it: relative to the checkout the stage runs in (the
    working directory; a queued experiment's temporary copy too), so checkouts in different
    folders record the same; a path outside it is kept as it is."""
    try:
        return Path(path).resolve().relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return str(path)


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
    with file_lock(uri.removeprefix("sqlite:///") + ".lock"):
        yield


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
                if exp is None:
                    return client.create_experiment(EXPERIMENT, tags=EXPERIMENT_KIND)
                for key, value in EXPERIMENT_KIND.items():
                    if exp.tags.get(key) != value:  # created before the tag, or by MLflow
                        client.set_experiment_tag(exp.experiment_id, key, value)
                return exp.experiment_id
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


def is_outage(e: BaseException) -> bool:
    """A failure of the tracking server or store (unreachable, timed out, 5xx), as opposed to a
    call MLflow rejects (4xx: a bug to fix, not something to replay later)."""
    if isinstance(e, MlflowException):
        return e.get_http_status_code() >= 500
    return isinstance(e, OSError)


class _Journal:
    """What the active stage run could not log, appended as JSON lines (the first names the
    run and its tracking URI); artifacts are copied beside it, as they were when logged."""

    def __init__(self, run_id: str, stage: str, uri: str) -> None:
        self.path = project_root() / JOURNAL_DIR / f"{run_id}.jsonl"
        self.header = {"op": "run", "run_id": run_id, "stage": stage, "uri": uri}
        self.error: str | None = None
        self.calls = 0
        self.curves: set[str] = set()  # metric names logged with a step in this run

    def add(self, entry: dict[str, Any]) -> None:
        if not self.path.exists():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps(self.header) + "\n")
        with open(self.path, "a") as f:
            f.write(json.dumps(entry) + "\n")
        self.calls += 1

    def copy(self, path: Path) -> str:
        dest = self.path.with_suffix("") / str(self.calls) / path.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if path.is_dir() else shutil.copy2)(path, dest)
        return str(dest)


_journal: _Journal | None = None


def _call(entry: Callable[[], dict[str, Any]], call: Callable[[], Any]) -> None:
    """Make one tracking call; once tracking has failed in this run, journal `entry()`."""
    if _journal is not None and _journal.error is None:
        try:
            call()
            return
        except Exception as e:
            if not is_outage(e):
                raise
            _journal.error = f"{type(e).__name__}: {e}"
    if _journal is not None:
        _journal.add(entry())


def log_metrics(metrics: dict[str, float], step: int | None = None) -> None:
    """Log metrics to the active run, named by the rule (metric_name); without a step, a metric
    with a per-step curve in this run goes to `final/<name>`."""
    if not mlflow.active_run():
        return
    values = {metric_name(k): float(v) for k, v in metrics.items()}
    if _journal is not None:
        if step is None:
            values = {f"final/{k}" if k in _journal.curves else k: v for k, v in values.items()}
        else:
            _journal.curves.update(values)
    now = int(time.time() * 1000)
    _call(lambda: {"op": "metrics", "metrics": values, "step": step or 0, "timestamp": now},
          lambda: fluent.log_metrics(values, step=step, timestamp=now))


def set_tags(tags: dict[str, Any]) -> None:
    if mlflow.active_run():
        values = {k: str(v) for k, v in tags.items()}
        _call(lambda: {"op": "tags", "tags": values}, lambda: fluent.set_tags(values))


def set_tag(key: str, value: Any) -> None:
    set_tags({key: value})


def log_params(params: dict[str, Any]) -> None:
    if mlflow.active_run():
        values = {k: param_value(v) for k, v in params.items()}
        _call(lambda: {"op": "params", "params": values}, lambda: fluent.log_params(values))


def log_artifacts(*paths: str | Path) -> None:
    """Log files and folders (a folder under its own name); a journaled one is copied as it is
    now, since the file may change before the backfill."""
    if not mlflow.active_run():
        return
    for p in filter(Path.exists, map(Path, paths)):
        where = p.name if p.is_dir() else None
        _call(lambda p=p, w=where: {"op": "artifact", "path": _journal.copy(p),
                                    "artifact_path": w},
              (lambda p=p, w=where: mlflow.log_artifacts(str(p), artifact_path=w))
              if p.is_dir() else (lambda p=p: mlflow.log_artifact(str(p))))


def dataset_digest(card: dict[str, Any]) -> str:
    """The prepared dataset's digest: of the card's source checksums and what decides the splits
    (seed, validation fraction, split sizes), so another subset or split gets another digest."""
    keys = ("dataset", "sources", "seed", "val_fraction", "sizes")
    text = json.dumps({k: card.get(k) for k in keys}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def log_dataset(card: dict[str, Any], path: str | Path, context: str) -> None:
    """Log the prepared dataset (folder `path`, described by `card`) as an input of the active
    run: metadata only (name, digest, where it is in the project, tensor schema), nothing is
    read again."""
    if not mlflow.active_run():
        return
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.types import Schema, TensorSpec

    schema = Schema([TensorSpec(np.dtype(np.uint8), (-1, *card["shape"]), "images"),
                     TensorSpec(np.dtype(np.int64), (-1,), "labels")])
    with warnings.catch_warnings():  # MLflow registers the local source for "" and "file://"
        warnings.filterwarnings("ignore", "The specified dataset source can be interpreted")
        source = resolve_dataset_source(project_path(path))
    dataset = MetaDataset(source, card["dataset"], dataset_digest(card), schema)
    _call(lambda: {"op": "dataset", "dataset": dataset.to_dict(), "context": context},
          lambda: mlflow.log_input(dataset, context=context))


def log_model_output(model_id: str) -> None:
    """Show the LoggedModel `model_id` (logged by another run) as an output of the active run."""
    if mlflow.active_run():
        _call(lambda: {"op": "model_output", "model_id": model_id},
              lambda: mlflow.log_outputs([LoggedModelOutput(model_id, step=0)]))


@contextmanager
def _fluent_calls_journaled() -> Iterator[None]:
    """Library code that calls mlflow's fluent API itself (train.fit's per-epoch metrics,
    study/report tags) goes through the journal too while a stage run is active."""
    saved = mlflow.log_metrics, mlflow.set_tags, mlflow.set_tag
    mlflow.log_metrics, mlflow.set_tags, mlflow.set_tag = log_metrics, set_tags, set_tag
    try:
        yield
    finally:
        mlflow.log_metrics, mlflow.set_tags, mlflow.set_tag = saved


def _record_error(e: BaseException) -> None:
    """Tag the active run with the error that ends it, and log its traceback as error.txt."""
    message = f"{type(e).__name__}: {e}"
    set_tag("error", message if len(message) <= 5000 else message[:4997] + "...")
    text = "".join(traceback.format_exception(e))
    _call(lambda: {"op": "text", "text": text, "artifact_file": "error.txt"},
          lambda: mlflow.log_text(text, "error.txt"))


def _run_params(stage: str, params: Any) -> dict[str, Any]:
    """The params a stage's run records: its groups, flattened. A study cell (stage
    `study@<method>-<budget>-<seed>`) selects channels by its method, not by prune.criterion:
    it records study.method / study.budget / study.seed instead."""
    flat = flat_dict(params)
    cell = stage.removeprefix("study@").rsplit("-", 2)
    if stage.startswith("study@") and len(cell) == 3:
        method, budget, seed = cell
        flat.pop("prune.criterion", None)
        flat.update({"study.method": method, "study.budget": float(budget),
                     "study.seed": int(seed)})
    return flat


def _end_run(status: str) -> None:
    now = int(time.time() * 1000)
    _call(lambda: {"op": "end", "status": status, "end_time": now},
          lambda: mlflow.end_run(status))
    if mlflow.active_run():  # end_run was skipped (tracking already down): pop the run here
        fluent._active_run_stack.get().pop()


@contextmanager
def stage_run(stage: str, params: Any, config_hash: str) -> Iterator[Any]:
    """One MLflow run for one stage execution.

    A run left RUNNING by a killed process of the same stage and config is continued (and
    tagged `resumed`) instead of duplicated. The run ends FAILED if the stage raises. When
    tracking fails mid-stage the stage still finishes: see the module docstring."""
    global _journal
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
    try:
        run = mlflow.start_run(run_id=run_id, experiment_id=None if run_id else experiment_id,
                               run_name=None if run_id else stage,
                               tags=None if run_id else _tags(stage, config_hash))
    except Exception as e:
        if is_outage(e):
            raise TrackingError(f"MLflow tracking URI {tracking_uri()!r} failed when stage "
                                f"{stage!r} started its run ({type(e).__name__}: {e})") from e
        raise
    journal = _journal = _Journal(run.info.run_id, stage, tracking_uri())
    if run_id:  # tagged as this execution's (the summary run links runs by these tags)
        tags = _tags(stage, config_hash)
        set_tags({**tags, "resumed": "true"})
        if "dvc_exp_name" in run.data.tags and "dvc_exp_name" not in tags:
            _call(lambda: {"op": "delete_tag", "key": "dvc_exp_name"},
                  lambda: MlflowClient().delete_tag(run.info.run_id, "dvc_exp_name"))
    else:
        log_params(_run_params(stage, params))
    save_json(state_file, {"run_id": run.info.run_id, "config_hash": config_hash})
    try:
        with _fluent_calls_journaled():
            yield run
    except BaseException as e:
        _record_error(e)
        _end_run("FAILED")
        if isinstance(e, MlflowException) and is_outage(e):  # a call not journaled (log_model)
            raise TrackingError(f"MLflow tracking failed in stage {stage!r} "
                                f"({type(e).__name__}: {e}); outputs written before this "
                                f"point are kept") from e
        raise
    else:
        _end_run("FINISHED")
    finally:
        _journal = None
    state_file.unlink(missing_ok=True)
    if journal.error:
        print(f"warning: MLflow tracking at {journal.header['uri']!r} failed during stage "
              f"{stage!r} ({journal.error}). The stage finished and wrote its outputs; "
              f"{journal.calls} tracking call(s) of run {run.info.run_id} were saved to "
              f"{journal.path}. Run `bnnprune backfill` once the server is back.",
              file=sys.stderr)


def _replay(client: MlflowClient, run_id: str, entry: dict[str, Any]) -> None:
    op = entry["op"]
    if op == "metrics":
        client.log_batch(run_id, metrics=[Metric(k, v, entry["timestamp"], entry["step"])
                                          for k, v in entry["metrics"].items()])
    elif op == "tags":
        client.log_batch(run_id, tags=[RunTag(k, v) for k, v in entry["tags"].items()])
    elif op == "params":
        client.log_batch(run_id, params=[Param(k, v) for k, v in entry["params"].items()])
    elif op == "artifact":
        if Path(entry["path"]).is_dir():
            client.log_artifacts(run_id, entry["path"], entry["artifact_path"])
        else:
            client.log_artifact(run_id, entry["path"], entry["artifact_path"])
    elif op == "text":
        client.log_text(run_id, entry["text"], entry["artifact_file"])
    elif op == "dataset":
        tags = [InputTag("mlflow.data.context", entry["context"])]
        client.log_inputs(run_id, [DatasetInput(Dataset(**entry["dataset"]), tags)])
    elif op == "model_output":
        client.log_outputs(run_id, [LoggedModelOutput(entry["model_id"], step=0)])
    elif op == "delete_tag":
        client.delete_tag(run_id, entry["key"])
    elif op == "end":
        client.set_terminated(run_id, entry["status"], entry["end_time"])
    else:
        raise TrackingError(f"unknown journal entry {op!r}; expected metrics, tags, params, "
                            f"artifact, text, dataset, model_output, delete_tag or end")


def backfill() -> list[str]:
    """Replay every journal under the project into the tracking store its run lives in, in
    order; a journal is deleted once all of it is logged. Returns one line per journal."""
    lines = []
    for path in sorted((project_root() / JOURNAL_DIR).glob("*.jsonl")):
        header, *entries = (json.loads(line) for line in path.read_text().splitlines())
        client = MlflowClient(header["uri"])
        for done, entry in enumerate(entries):
            try:
                _replay(client, header["run_id"], entry)
            except Exception as e:
                rest = [header, *entries[done:]]
                write_atomic(path, lambda p, r=rest: p.write_text(
                    "".join(json.dumps(x) + "\n" for x in r)))
                raise TrackingError(
                    f"{path}: back-filling run {header['run_id']} into {header['uri']!r} "
                    f"failed after {done} of {len(entries)} calls ({type(e).__name__}: {e}); "
                    f"the rest is kept: run `bnnprune backfill` again") from e
        shutil.rmtree(path.with_suffix(""), ignore_errors=True)
        path.unlink()
        lines.append(f"{header['stage']}: {len(entries)} call(s) logged to run "
                     f"{header['run_id']} at {header['uri']}")
    return lines
