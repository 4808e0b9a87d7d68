"""prune: remove the output channels of the baseline's binary layers that the flip rule (or
prune.criterion) marks as insensitive; optionally iterate prune -> retrain -> re-measure."""

import time

from bnnprune.cli import run_stage
from bnnprune.core.files import save_csv, save_json
from bnnprune.core.flips import interval_counts, load_flips
from bnnprune.models import load_checkpoint, save_checkpoint
from bnnprune.models.chain import BNN
from bnnprune.pipeline.config import load_params
from bnnprune.pipeline.data import load_prepared
from bnnprune.pipeline.pruning import (
    PruneError,
    accuracy,
    channel_rows,
    prune_any,
    prune_report,
    retrain_config,
    run_pruning,
)
from bnnprune.pipeline.tracking import layer_segment, log_artifacts, log_metrics, stage_run
from bnnprune.pipeline.train import fingerprint, finish_resume, fit

BASELINE, FLIPS, OUT = "models/baseline.pt", "models/flips.pt", "models/pruned.pt"
METRICS, PLOT = "reports/metrics/prune.json", "reports/plots/prune_channels.csv"
RESUME = ".bnnprune/resume/prune-round{}.pt"


def main() -> None:
    params = load_params()
    cfg = params.prune
    baseline, ckpt = load_checkpoint(BASELINE, arch=params.model.arch)
    flips = load_flips(FLIPS, baseline)
    baseline_metrics = ckpt["meta"].get("metrics", {})
    if "test_acc" not in baseline_metrics:
        raise PruneError(f"{BASELINE}: no baseline test accuracy in its metadata; produce it "
                         f"with the train stage (dvc repro train)")
    splits, card = load_prepared("data/prepared")
    retrain_cfg = retrain_config(params.finetune, cfg)
    resumes = []

    def retrain(model, round_done):
        resumes.append(RESUME.format(round_done))
        result = fit(model, splits["train"], splits["val"], card, retrain_cfg, resumes[-1],
                     desc=f"retrain {round_done}")
        return result.model, result.flips.counts

    groups = {"prune": cfg, "finetune": params.finetune}
    with stage_run("prune", groups, fingerprint(groups, ckpt["config"], ckpt["meta"])):
        start = time.perf_counter()
        counts = interval_counts(flips, cfg.interval)
        if isinstance(baseline, BNN):
            model, rounds = run_pruning(baseline, counts, cfg, retrain=retrain)
            report = prune_report(baseline, model, rounds[0]["p"])
        else:  # birealnet, a user's model: coupled groups from the graph
            model, rounds, coupled = prune_any(baseline, counts, cfg)
            report = prune_report(baseline, model, rounds[0]["p"], coupled)
        seconds = time.perf_counter() - start
        metrics = {"criterion": cfg.criterion, "tau": cfg.tau, **report,
                   "rounds": sum(r["pruned"] for r in rounds),
                   "max_p": {str(r["round"]): r["max_p"] for r in rounds},
                   "retrain_epochs_total": retrain_cfg.epochs * len(resumes),
                   "baseline_test_acc": baseline_metrics["test_acc"],
                   **accuracy(model, splits, card)}
        save_checkpoint(OUT, model, prune=metrics, rounds=rounds, baseline=baseline_metrics)
        save_json(METRICS, metrics)
        save_csv(PLOT, channel_rows(report))
        total = report["total"]
        log_metrics({"wall_time_s": seconds, "final/val_acc": metrics["val_acc"],
                     "test_acc": metrics["test_acc"],
                     **{k.replace("size_bits", "model_size_bits"): v for k, v in total.items()
                        if k != "size_bits_reduction_pct"},
                     "model_size_reduction_pct": total["size_bits_reduction_pct"],
                     **{f"p/{layer_segment(name)}": r["p"]
                        for name, r in report["layers"].items()}})
        log_artifacts(METRICS, PLOT)
        for path in resumes:
            finish_resume(path)
    total = report["total"]
    print(f"prune ({cfg.criterion}, tau {cfg.tau:g}): channels {rounds[0]['channels_before']} -> "
          f"{rounds[-1]['channels_after']}, BOPs -{total['bops_reduction_pct']:.1f}%, test_acc "
          f"before fine-tuning {metrics['test_acc']:.4f}")


if __name__ == "__main__":
    run_stage(main)
