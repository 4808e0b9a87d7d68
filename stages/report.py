"""report: reports/summary.json + summary.md + plots from every stage's outputs, and one MLflow
summary run per pipeline execution that links the stage runs."""

from bnnprune.cli import run_stage
from bnnprune.pipeline.config import load_params
from bnnprune.pipeline.tracking import stage_run
from bnnprune.pipeline.train import fingerprint
from bnnprune.reports.report import SUMMARY_JSON, load_inputs, write_report
from bnnprune.tracking.registry import register_candidate
from bnnprune.tracking.runs import log_summary_run


def main() -> None:
    params = load_params()
    inputs = load_inputs()
    with stage_run("report", params, fingerprint(params, inputs)):
        summary = write_report(inputs=inputs)
        links = log_summary_run(summary)
        registered = register_candidate(summary, SUMMARY_JSON)
    print(f"report: {SUMMARY_JSON}: test_acc {summary['baseline']['test_acc']:.4f} -> "
          f"{summary['pruned']['test_acc']:.4f} ({summary['acc_drop_pt']:+.2f} pt drop), BOPs "
          f"-{summary['reduction']['bops_pct']:.1f}%, speedup {summary['speedup']}; study: "
          f"{len(summary['study']['verdict']['wins_over_all_controls'])} CI-clear wins of a "
          f"flip-derived method over every control; linked stage runs: "
          f"{', '.join(links) or 'none'}")
    if registered:
        print(f"report: registered models:/{registered[0]}/{registered[1]} (alias candidate)")


if __name__ == "__main__":
    run_stage(main)
