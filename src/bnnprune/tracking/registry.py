"""MLflow Model Registry, in MLflow 3's conventions (aliases, no stages).

The report stage registers the pruned ONNX model (models/model.onnx) that the export stage logged
(`pruned_bnn_onnx`, found by the file's sha256; logged by the summary run only when the export
stage ran without tracking; either way an output of the summary run, whose page then lists the
registered version) as a new version of the registered model `bnnprune-<dataset>-<arch>`,
tagged with the config hash, the git commit, the sha256 of reports/summary.json and the headline
metrics (what the gate judges), with the alias `candidate`. `bnnprune check` moves the alias
`champion` to the version registered for the judged summary.json only when the gate passes.
Clients load `models:/<name>@champion`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import mlflow
from mlflow.tracking import MlflowClient

from bnnprune.core.files import load_json
from bnnprune.pipeline.data import load_prepared, sha256
from bnnprune.pipeline.export import ONNX_MODEL_NAMES, log_onnx_model
from bnnprune.pipeline.tracking import (
    TrackingError,
    ensure_experiment,
    log_model_output,
    tracking_uri,
)
from bnnprune.reports.thresholds import CHECKS

CANDIDATE, CHAMPION = "candidate", "champion"
ONNX_MODEL = "models/model.onnx"
CARD = "data/prepared/card.json"
SUMMARY_TAG = "summary_sha256"  # version tag: which reports/summary.json it was reported in


class RegistryError(TrackingError):
    """Nothing to register, or nothing registered to promote."""


def model_name(summary: dict[str, Any]) -> str:
    """`bnnprune-<dataset>-<arch>`: one registered model per dataset and architecture."""
    try:
        dataset, arch = summary["dataset"], summary["model"]["arch"]
    except (KeyError, TypeError) as e:
        raise RegistryError(f"summary has no dataset / model.arch ({e}); regenerate it with the "
                            f"report stage (dvc repro report)") from e
    return re.sub(r"[^\w.-]", "-", f"bnnprune-{dataset}-{arch}")


def _headline(summary: dict[str, Any]) -> dict[str, str]:
    tags = {"baseline.test_acc": summary["baseline"]["test_acc"]}
    for check in CHECKS:
        node: Any = summary
        for part in check.key:
            node = node.get(part) if isinstance(node, dict) else None
        tags[".".join(check.key)] = node
    return {k: f"{v:.6g}" if isinstance(v, float) else str(v) for k, v in tags.items()
            if v is not None}  # a check without a value (backend not run): no "None" tag


def register_candidate(summary: dict[str, Any], summary_path: str | Path,
                       onnx_path: str | Path = ONNX_MODEL, card_path: str | Path = CARD
                       ) -> tuple[str, str] | None:
    """Inside the report stage's MLflow run: log `onnx_path` as a model of the run, register it
    as a new version and point `candidate` at it. Returns (name, version); None when tracking
    is off (no active run)."""
    run = mlflow.active_run()
    if run is None:
        return None
    for path in (onnx_path, card_path, summary_path):
        if not Path(path).is_file():
            raise RegistryError(f"{path}: not found; run the export and report stages first")
    name = model_name(summary)
    logged = logged_onnx_model(run.info.experiment_id, sha256(Path(onnx_path)))
    if logged is None:
        test = load_prepared(Path(card_path).parent)[0]["test"]
        logged = log_onnx_model(onnx_path, load_json(card_path), ONNX_MODEL_NAMES["pruned"],
                                test.images)
    elif logged.source_run_id != run.info.run_id:  # the export stage's: an output of this run too
        log_model_output(logged.model_id)
    run_tags = mlflow.get_run(run.info.run_id).data.tags
    tags = {"config_hash": run_tags.get("config_hash", ""),
            "git_commit": run_tags.get("git_commit", ""),
            "dvc_exp_name": run_tags.get("dvc_exp_name", ""),
            SUMMARY_TAG: sha256(Path(summary_path)), "onnx_sha256": sha256(Path(onnx_path)),
            **_headline(summary)}
    version = mlflow.register_model(f"models:/{logged.model_id}", name,
                                    tags={k: v for k, v in tags.items() if v}).version
    client = MlflowClient()
    client.set_registered_model_alias(name, CANDIDATE, version)
    return name, str(version)


def logged_onnx_model(experiment_id: str, digest: str) -> Any:
    """The newest pruned ONNX model logged in the experiment whose file has sha256 `digest`."""
    found = mlflow.search_logged_models(
        [experiment_id], filter_string=f"name = '{ONNX_MODEL_NAMES['pruned']}' and "
        f"tags.onnx_sha256 = '{digest}'", order_by=[{"field_name": "creation_time",
                                                     "ascending": False}],
        max_results=1, output_format="list")
    return found[0] if found else None


def promote(summary: dict[str, Any], summary_path: str | Path) -> str:
    """Move `champion` to the version registered for this summary file (same sha256); one line
    saying what was done. RegistryError when there is no such version."""
    name = model_name(summary)
    digest = sha256(Path(summary_path))
    ensure_experiment()  # points MLflow at the project's store; a clear error when unreachable
    client = MlflowClient()
    found = client.search_model_versions(f"name = '{name}' and tags.{SUMMARY_TAG} = '{digest}'")
    if not found:
        raise RegistryError(f"no version of registered model {name!r} at {tracking_uri()!r} was "
                            f"registered for {summary_path} (sha256 {digest[:12]}); run the "
                            f"report stage with MLflow tracking on first")
    version = max(found, key=lambda v: int(v.version)).version
    client.set_registered_model_alias(name, CHAMPION, version)
    return f"registry: {CHAMPION} -> models:/{name}/{version} ({tracking_uri()})"
