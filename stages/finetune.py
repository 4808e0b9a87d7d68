"""finetune: retrain the pruned model (its surviving latent weights) with the finetune group,
distilling from the unpruned baseline when finetune.distill > 0.

With finetune.nproc > 1 it re-runs itself under torchrun (DDP); rank 0 alone tracks and writes."""

import time
from contextlib import nullcontext

from bnnprune.cli import run_stage
from bnnprune.core.files import save_csv, save_json
from bnnprune.models import load_checkpoint, save_checkpoint
from bnnprune.pipeline.config import as_dict, load_params
from bnnprune.pipeline.data import load_prepared
from bnnprune.pipeline.pruning import finetune
from bnnprune.pipeline.tracking import log_artifacts, log_metrics, stage_run
from bnnprune.pipeline.train import (
    fingerprint,
    finish_distributed,
    finish_resume,
    init_distributed,
    launch,
)

BASELINE, PRUNED, OUT = "models/baseline.pt", "models/pruned.pt", "models/finetuned.pt"
METRICS, PLOT = "reports/metrics/finetune.json", "reports/plots/finetune_history.csv"
RESUME = ".bnnprune/resume/finetune.pt"


def main() -> None:
    params = load_params()
    cfg = params.finetune
    launch(cfg.nproc, __file__, "finetune")
    rank = init_distributed(cfg)
    model, ckpt = load_checkpoint(PRUNED, arch=params.model.arch)
    teacher = load_checkpoint(BASELINE, arch=params.model.arch)[0] if cfg.distill else None
    splits, card = load_prepared("data/prepared")
    pruned = ckpt["meta"]["prune"]
    key = fingerprint({"finetune": cfg}, ckpt["config"], pruned)
    # the run records the prune settings of the model it fine-tunes, as well as its own
    ran = {"finetune": cfg, "prune": {**as_dict(params.prune), "criterion": pruned["criterion"],
                                      "tau": pruned["tau"]}}
    with stage_run("finetune", ran, key) if rank == 0 else nullcontext():
        start = time.perf_counter()
        result, metrics = finetune(model, splits, card, cfg, pruned["baseline_test_acc"],
                                   RESUME, desc="finetune", teacher=teacher)
        seconds = time.perf_counter() - start
        finish_distributed()
        if rank != 0:
            return
        metrics = {"criterion": pruned["criterion"], **metrics,
                   "bops_reduction_pct": pruned["total"]["bops_reduction_pct"],
                   "ops_reduction_pct": pruned["total"]["ops_reduction_pct"],
                   "size_reduction_pct": pruned["total"]["size_bits_reduction_pct"],
                   "test_acc_before_finetune": pruned["test_acc"]}
        save_checkpoint(OUT, model, metrics=metrics, prune=pruned, history=result.history,
                        baseline=ckpt["meta"].get("baseline", {}))
        save_json(METRICS, metrics)
        save_csv(PLOT, result.history)
        log_metrics({"final/val_acc": metrics["val_acc"], "test_acc": metrics["test_acc"],
                     "test_loss": metrics["test_loss"],
                     "test_acc_before_finetune": metrics["test_acc_before_finetune"],
                     "baseline_test_acc": metrics["baseline_test_acc"],
                     "acc_drop_pt": metrics["acc_drop_pt"],
                     "bops_reduction_pct": metrics["bops_reduction_pct"],
                     "ops_reduction_pct": metrics["ops_reduction_pct"],
                     "model_size_reduction_pct": metrics["size_reduction_pct"],
                     "wall_time_s": seconds, "resumed_from_epoch": result.resumed_from_epoch})
        log_artifacts(METRICS, PLOT)
        finish_resume(RESUME)
    print(f"finetune: test_acc {metrics['test_acc']:.4f} (baseline "
          f"{metrics['baseline_test_acc']:.4f}, drop {metrics['acc_drop_pt']:+.2f} pt) at "
          f"-{metrics['bops_reduction_pct']:.1f}% BOPs in {seconds:.0f}s")


if __name__ == "__main__":
    run_stage(main)
