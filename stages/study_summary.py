"""study_summary: the study's table, paired differences, hypothesis tables, findings and
Pareto plot, from the cells of study.methods x study.budgets x study.seeds and of the scratch
control at study.scratch_budgets x study.seeds."""

import mlflow

from bnnprune.cli import run_stage
from bnnprune.core.files import load_json, save_csv, save_json, write_atomic
from bnnprune.models import load_checkpoint
from bnnprune.pipeline.config import load_params
from bnnprune.pipeline.tracking import log_artifacts, log_metrics, stage_run
from bnnprune.pipeline.train import fingerprint
from bnnprune.reports.plots import pareto_plot
from bnnprune.study.cells import parent_run
from bnnprune.study.report import (
    findings_md,
    load_cells,
    plot_rows,
    summarize,
    tables_md,
)

HYPOTHESIS = "reports/study/hypothesis.json"
METRICS, MD = "reports/metrics/study.json", "reports/study/summary.md"
PLOT, CSV = "reports/plots/study_pareto.png", "reports/plots/study.csv"


def main() -> None:
    params = load_params()
    study = params.study
    _, ckpt = load_checkpoint("models/baseline.pt", arch=params.model.arch)
    cells = (load_cells(".", study.methods, study.budgets, study.seeds)
             + load_cells(".", ["scratch"], study.scratch_budgets, study.seeds))
    methods = study.methods + (["scratch"] if study.scratch_budgets else [])
    budgets = sorted({*study.budgets, *study.scratch_budgets})
    hypothesis = load_json(HYPOTHESIS)
    summary = summarize(cells, methods, budgets, ckpt["meta"]["metrics"]["test_acc"])
    card = load_json("data/prepared/card.json")
    setting = (f"{params.model.arch} (width {params.model.width:g}) on {card['dataset']}, one "
               f"baseline (train.seed {params.train.seed}, test acc "
               f"{100 * summary['baseline_test_acc']:.2f}%); seeds {study.seeds} vary random "
               f"selection and the recovery's data; recovery {study.recovery_steps} steps at "
               f"batch {study.batch_size}, lr {study.lr:g}; prune.tau {params.prune.tau:g}, "
               f"round_to {params.prune.round_to}, min_channels {params.prune.min_channels}")
    summary["setting"] = setting
    summary["hypothesis"] = {k: hypothesis[k] for k in ("channels", "layers")}
    lines = ["## Findings", "", *findings_md(summary, hypothesis, setting), "",
             "## Study tables", "", *tables_md(summary, hypothesis)]
    parent = parent_run(params, ckpt["meta"])
    groups = {"study": study}
    with stage_run("study_summary", groups, fingerprint(groups, summary)) as run:
        if run is not None and parent:
            mlflow.set_tag("mlflow.parentRunId", parent)
        save_json(METRICS, summary)
        write_atomic(MD, lambda p: p.write_text("\n".join(lines) + "\n"))
        pareto_plot(summary, PLOT)
        save_csv(CSV, plot_rows(summary))
        log_metrics({f"test_acc/{m}/budget_{100 * float(b):.0f}_pct": r["after"]["mean"]
                     for m, rows in summary["methods"].items() for b, r in rows.items()})
        log_artifacts(METRICS, MD, PLOT, CSV)
    print("\n".join(lines))


if __name__ == "__main__":
    run_stage(main)
