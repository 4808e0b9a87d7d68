"""MLflow runs across stages: the report stage's summary run (one per pipeline execution),
which links the stage runs, and `bnnprune compare` over the summary runs."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from bnnprune.core.files import load_json
from bnnprune.reports.report import (
    INPUTS,
    METRICS_JSON,
    PLOTS,
    SUMMARY_JSON,
    SUMMARY_MD,
    headline_metrics,
)

SUMMARY_TAG = "bnnprune.summary"  # tag of the one summary run per pipeline execution
LINK_TAG = "bnnprune.stage_run."  # + stage name: run id of the stage run the summary covers


def link_stage_runs(run: Any) -> dict[str, str]:
    """Tag the summary run with the run id of every stage: the newest finished run of that
    stage from the same git commit (and DVC experiment, when set), else - a stage DVC skipped
    because nothing changed - its newest finished run. Runs without a parent become children
    of the summary run, so the MLflow UI shows one row per pipeline execution."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    tags = run.data.tags
    same = {"git_commit": tags.get("git_commit"), "dvc_exp_name": tags.get("dvc_exp_name")}
    chosen: dict[str, tuple[bool, Any]] = {}  # stage -> (same execution?, run); newest first
    # newest by end time: a run resumed after a kill started long before it finished
    for found in client.search_runs([run.info.experiment_id], "attributes.status = 'FINISHED'",
                                    order_by=["attributes.end_time DESC"], max_results=1000):
        t = found.data.tags
        stage = t.get("stage")
        if not stage or SUMMARY_TAG in t or found.info.run_id == run.info.run_id:
            continue
        match = all(t.get(k) == v for k, v in same.items())
        if stage not in chosen or (match and not chosen[stage][0]):
            chosen[stage] = (match, found)
    links = {}
    for stage, (_, stage_run) in sorted(chosen.items()):
        links[stage] = stage_run.info.run_id
        # MLflow tag keys allow no '@' (foreach stages are named like compare@latent)
        key = LINK_TAG + re.sub(r"[^\w\-. :/]", ":", stage)
        client.set_tag(run.info.run_id, key, stage_run.info.run_id)
        if "mlflow.parentRunId" not in stage_run.data.tags:
            client.set_tag(stage_run.info.run_id, "mlflow.parentRunId", run.info.run_id)
    return links


def run_name(summary: dict[str, Any], dvc_exp_name: str | None = None) -> str:
    """A summary run's name: its DVC experiment's, else `<arch>/<dataset>/<criterion>/tau<tau>`."""
    if dvc_exp_name:
        return dvc_exp_name
    m = summary["model"]
    tau = "" if m.get("tau") is None else f"/tau{m['tau']:g}"
    return f"{m['arch']}/{summary['dataset']}/{m['criterion']}{tau}"


def log_summary_run(summary: dict[str, Any], root: str | Path = ".") -> dict[str, str]:
    """Inside the report stage's MLflow run: mark it as the summary run, name it after its
    configuration (run_name), log the prepared dataset as its input, the headline metrics and
    artifacts, link the stage runs."""
    import mlflow

    from bnnprune.pipeline.tracking import log_artifacts, log_dataset, log_metrics

    run = mlflow.active_run()
    if run is None:
        return {}
    name = run_name(summary, mlflow.get_run(run.info.run_id).data.tags.get("dvc_exp_name"))
    mlflow.set_tags({SUMMARY_TAG: "true", "dataset": summary["dataset"], "mlflow.runName": name})
    root = Path(root)
    card = root / INPUTS["card"][0]
    log_dataset(load_json(card), card.parent, context="evaluation")
    log_metrics(headline_metrics(summary))
    log_artifacts(root / SUMMARY_JSON, root / METRICS_JSON, root / SUMMARY_MD,
                  *(root / p for p in PLOTS.values()))
    return link_stage_runs(mlflow.get_run(run.info.run_id))


# headline metric (a prefix for speedups, whose names end in their batch size) -> column
COMPARE_METRICS = {"test_acc": "test_acc", "acc_drop_pt": "drop_pt",
                   "bops_reduction_pct": "BOPs-%", "ops_reduction_pct": "OPs-%",
                   "speedup_cpu_b": "x cpu", "speedup_ort_b": "x ort"}


def compare_table(runs: Any, all_params: bool = False) -> str:
    """A text table of summary runs (a `mlflow.search_runs` DataFrame): the params that differ
    between them (or all with `all_params`) and the headline metrics, newest first."""
    if runs.empty:
        return "no summary runs yet: run the pipeline (dvc repro) with MLflow tracking on"
    param_cols = [c for c in runs.columns if c.startswith("params.")]
    if not all_params:
        param_cols = [c for c in param_cols if runs[c].astype(str).nunique() > 1]
    header = ["run", "started", "experiment", "commit"] + [c.removeprefix("params.")
                                                            for c in param_cols]
    header += list(COMPARE_METRICS.values())
    # a speedup's column name ends in its batch size, which may differ between runs
    columns = {m: [c for c in runs.columns if c == f"metrics.{m}"
                   or (m.endswith("_b") and c.startswith(f"metrics.{m}"))]
               for m in COMPARE_METRICS}
    rows = [header]
    for _, r in runs.iterrows():
        row = [r["run_id"][:8], r["start_time"].strftime("%Y-%m-%d %H:%M"),
               str(r.get("tags.dvc_exp_name") or "-"), str(r.get("tags.git_commit") or "")[:7]]
        row += [str(r[c]) for c in param_cols]
        for m in COMPARE_METRICS:
            v = next((r[c] for c in columns[m] if r[c] == r[c]), None)  # the first not NaN
            row.append("-" if v is None else f"{v:.4g}")
        rows.append(row)
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True))
             for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def compare(max_runs: int = 20, all_params: bool = False) -> str:
    import mlflow

    from bnnprune.pipeline.tracking import EXPERIMENT, ensure_experiment

    ensure_experiment()
    runs = mlflow.search_runs(experiment_names=[EXPERIMENT],
                              filter_string=f"tags.`{SUMMARY_TAG}` = 'true'",
                              order_by=["attributes.start_time DESC"], max_results=max_runs)
    return compare_table(runs, all_params)
