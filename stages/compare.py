"""compare <criterion>: prune the baseline with another criterion to the same channel counts
as the prune stage (or, with prune.target_bop_reduction, to the same BOP target by its own
global ranking), then fine-tune it with the same budget; records BOPs and accuracy."""

import sys
import time
from dataclasses import replace

from bnnprune.cli import run_stage
from bnnprune.config import load_params
from bnnprune.data import load_prepared
from bnnprune.files import save_json
from bnnprune.flips import interval_counts, load_flips
from bnnprune.models import load_checkpoint, save_checkpoint
from bnnprune.prune import CRITERIA, PruneError, accuracy, finetune, prune_report, run_pruning
from bnnprune.tracking import log_artifacts, log_metrics, stage_run
from bnnprune.train import fingerprint, finish_resume

BASELINE, FLIPS, PRUNED = "models/baseline.pt", "models/flips.pt", "models/pruned.pt"
OUT, METRICS = "models/compare/{}.pt", "reports/metrics/compare/{}.json"
RESUME = ".bnnprune/resume/compare-{}.pt"


def main() -> None:
    if len(sys.argv) != 2 or sys.argv[1] not in CRITERIA:
        raise PruneError(f"usage: compare.py CRITERION; got {sys.argv[1:]}, allowed: "
                         f"{', '.join(CRITERIA)}")
    criterion = sys.argv[1]
    params = load_params()
    cfg = params.prune
    baseline, ckpt = load_checkpoint(BASELINE, arch=params.model.arch)
    flips = load_flips(FLIPS, baseline)
    _, pruned_ckpt = load_checkpoint(PRUNED, arch=params.model.arch)
    reference = pruned_ckpt["meta"]["prune"]
    splits, card = load_prepared("data/prepared")
    # same channels as the prune stage's result (equal BOPs), pruned in one shot; the retrain
    # epochs an iterative prune spent are added to the fine-tuning so the budgets match
    target = None if cfg.target_bop_reduction is not None else pruned_ckpt["config"]["channels"]
    ft_cfg = replace(params.finetune,
                     epochs=params.finetune.epochs + reference["retrain_epochs_total"])
    stage = f"compare@{criterion}"
    groups = {"prune": cfg, "finetune": ft_cfg}
    key = fingerprint(groups, criterion, ckpt["config"], ckpt["meta"], pruned_ckpt["config"])
    with stage_run(stage, groups, key):
        start = time.perf_counter()
        counts = interval_counts(flips, cfg.interval)
        model, rounds = run_pruning(baseline, counts, replace(cfg, iterations=1),
                                    criterion, target_channels=target)
        report = prune_report(baseline, model, rounds[0]["p"])
        before = accuracy(model, splits, card)
        result, metrics = finetune(model, splits, card, ft_cfg, reference["baseline_test_acc"],
                                   RESUME.format(criterion), desc=stage)
        seconds = time.perf_counter() - start
        total = report["total"]
        metrics = {"criterion": criterion, **metrics,
                   "bops_before": total["bops_before"], "bops_after": total["bops_after"],
                   "bops_reduction_pct": total["bops_reduction_pct"],
                   "ops_reduction_pct": total["ops_reduction_pct"],
                   "size_reduction_pct": total["size_bits_reduction_pct"],
                   "test_acc_before_finetune": before["test_acc"],
                   "channels": {name: r["channels_after"] for name, r in report["layers"].items()}}
        save_checkpoint(OUT.format(criterion), model, metrics=metrics, prune=report,
                        history=result.history)
        save_json(METRICS.format(criterion), metrics)
        log_metrics({**{k: v for k, v in metrics.items() if k not in ("criterion", "channels")},
                     "compare_seconds": seconds, "resumed_from_epoch": result.resumed_from_epoch})
        log_artifacts(METRICS.format(criterion))
        finish_resume(RESUME.format(criterion))
    print(f"{stage}: test_acc {metrics['test_acc']:.4f} (drop {metrics['acc_drop_pt']:+.2f} pt) "
          f"at -{metrics['bops_reduction_pct']:.1f}% BOPs in {seconds:.0f}s")


if __name__ == "__main__":
    run_stage(main)
