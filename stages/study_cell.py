"""study_cell METHOD BUDGET SEED: one cell of the criteria study (dvc.yaml's `study` matrix):
prune the baseline by METHOD to a BOP reduction of BUDGET, recover, measure."""

import sys
import time

import mlflow

from bnnprune.cli import run_stage
from bnnprune.core.files import load_json, save_json
from bnnprune.core.flips import load_flips
from bnnprune.models import load_checkpoint
from bnnprune.pipeline.config import ConfigError, load_params
from bnnprune.pipeline.data import load_prepared
from bnnprune.pipeline.tracking import log_artifacts, log_metrics, stage_run
from bnnprune.pipeline.train import fingerprint, finish_resume
from bnnprune.study.cells import METHODS, cell_path, parent_run, run_cell, set_threads

BASELINE, FLIPS = "models/baseline.pt", "models/flips.pt"
LAYERS = "reports/study/layer_sensitivity.json"


def parse_args(argv: list[str]) -> tuple[str, float, int]:
    if len(argv) != 3 or argv[0] not in METHODS:
        raise ConfigError(f"usage: study_cell.py METHOD BUDGET SEED; got {argv}; METHOD one "
                          f"of {', '.join(METHODS)}")
    try:
        return argv[0], float(argv[1]), int(argv[2])
    except ValueError as e:
        raise ConfigError(f"study_cell.py: BUDGET must be a number and SEED an integer; "
                          f"got {argv[1:]}") from e


def main() -> None:
    name, budget, seed = parse_args(sys.argv[1:])
    params = load_params()
    baseline, ckpt = load_checkpoint(BASELINE, arch=params.model.arch)
    flips = load_flips(FLIPS, baseline)
    layers = load_json(LAYERS)["layers"]
    splits, card = load_prepared("data/prepared")
    set_threads(params.finetune.threads)
    out = cell_path(name, budget, seed)
    resume = f".bnnprune/resume/study-{name}-{budget}-{seed}.pt"
    groups = {"prune": params.prune, "study": params.study, "finetune": params.finetune,
              "train": params.train}
    key = fingerprint(groups, name, budget, seed, ckpt["meta"], layers)
    parent = parent_run(params, ckpt["meta"])
    with stage_run(f"study@{name}-{budget:g}-{seed}", groups, key) as run:
        if run is not None and parent:
            mlflow.set_tags({"mlflow.parentRunId": parent, "study.method": name,
                             "study.budget": str(budget), "study.seed": str(seed)})
        start = time.perf_counter()
        cell = run_cell(name, budget, seed, baseline, flips, splits, card, params.prune,
                        params.study, params.train, params.finetune,
                        {n: r["drop_pt"] for n, r in layers.items()}, resume)
        cell["wall_time_s"] = time.perf_counter() - start
        save_json(out, cell)
        log_metrics({k: v for k, v in cell.items() if isinstance(v, (int, float))
                     and not isinstance(v, bool) and k not in ("budget", "seed")})
        log_artifacts(out)
        finish_resume(resume)
    print(f"study {name} at -{100 * budget:g}% BOPs, seed {seed}: BOPs "
          f"-{cell['bops_reduction_pct']:.1f}%, test_acc {cell['test_acc_before_recovery']:.4f}"
          f" -> {cell['test_acc']:.4f} after {params.study.recovery_steps} recovery steps "
          f"({cell['wall_time_s']:.0f}s)")


if __name__ == "__main__":
    run_stage(main)
