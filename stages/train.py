"""train: train the baseline BNN, logging per-weight sign flips over the last epochs.

With train.nproc > 1 it re-runs itself under torchrun (DDP); rank 0 alone tracks and writes."""

import time
from contextlib import nullcontext

from bnnprune.cli import run_stage
from bnnprune.core.files import save_csv, save_json, save_torch
from bnnprune.models import build_model, model_config, save_checkpoint
from bnnprune.pipeline.config import load_params
from bnnprune.pipeline.data import load_prepared
from bnnprune.pipeline.tracking import log_artifacts, log_dataset, log_metrics, stage_run
from bnnprune.pipeline.train import (
    evaluate,
    fingerprint,
    finish_distributed,
    finish_resume,
    fit,
    init_distributed,
    launch,
)

RESUME = ".bnnprune/resume/train.pt"


def main() -> None:
    params = load_params()
    splits, card = load_prepared("data/prepared")
    cfg = params.train
    launch(cfg.nproc, __file__, "train")
    rank = init_distributed(cfg)
    groups = {"data": params.data, "model": params.model, "train": cfg}
    key = fingerprint(groups, card["sources"])
    with stage_run("train", groups, key) if rank == 0 else nullcontext():
        m = params.model
        model = build_model(model_config(m.arch, m.width, card["shape"], card["num_classes"],
                                         m.kwargs, m.binary), seed=cfg.seed)
        start = time.perf_counter()
        result = fit(model, splits["train"], splits["val"], card, cfg, RESUME)
        seconds = time.perf_counter() - start
        finish_distributed()
        if rank != 0:
            return
        val, test = (evaluate(model, splits[k], card) for k in ("val", "test"))
        metrics = {"val_acc": val["acc"], "val_loss": val["loss"], "test_acc": test["acc"],
                   "test_loss": test["loss"], "flip_observations": result.flips.observations}
        save_checkpoint("models/baseline.pt", model, metrics=metrics, history=result.history)
        save_torch("models/flips.pt", result.flips.export(model.config, cfg.flip_window,
                                                       cfg.tail_epochs))
        save_json("reports/metrics/train.json", metrics)
        save_csv("reports/plots/train_history.csv", result.history)
        save_csv("reports/plots/flip_ratio.csv", result.flip_history)
        log_metrics({**metrics, "wall_time_s": seconds,
                     "resumed_from_epoch": result.resumed_from_epoch})
        log_dataset(card, "data/prepared", context="training")
        log_artifacts("reports/metrics/train.json", "reports/plots/train_history.csv",
                      "reports/plots/flip_ratio.csv")
        finish_resume(RESUME)
    print(f"train: val_acc {val['acc']:.4f} test_acc {test['acc']:.4f} in {seconds:.0f}s")


if __name__ == "__main__":
    run_stage(main)
