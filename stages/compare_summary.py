"""compare_summary: one table of test accuracy vs BOP reduction for every pruning criterion."""

from bnnprune.cli import run_stage
from bnnprune.config import load_params
from bnnprune.files import load_json, save_csv, save_json
from bnnprune.prune import PruneError, compare_rows
from bnnprune.tracking import log_artifacts, log_metrics, stage_run
from bnnprune.train import fingerprint

MAIN, COMPARE = "reports/metrics/finetune.json", "reports/metrics/compare/{}.json"
PLOT, METRICS = "reports/plots/compare.csv", "reports/metrics/compare_summary.json"


def main() -> None:
    params = load_params()
    runs = [load_json(MAIN)]
    for criterion in params.prune.compare:
        try:
            runs.append(load_json(COMPARE.format(criterion)))
        except FileNotFoundError as e:
            raise PruneError(f"{e.filename}: not found; run the compare stage for "
                             f"{criterion!r} first (dvc repro compare)") from e
    rows, summary = compare_rows(runs)
    with stage_run("compare_summary", {"prune": params.prune}, fingerprint(rows)):
        save_csv(PLOT, rows)
        save_json(METRICS, summary)
        log_metrics({f"{r['criterion']}/{k}": v for r in rows for k, v in r.items()
                     if k != "criterion"})
        log_artifacts(PLOT, METRICS)
    for r in rows:
        print(f"{r['criterion']:>7}: BOPs -{r['bops_pct']:.1f}%  test_acc {r['test_acc']:.4f}  "
              f"drop {r['acc_drop_pt']:+.2f} pt")
    print(f"winner (highest test accuracy): {summary['winner']}")


if __name__ == "__main__":
    run_stage(main)
