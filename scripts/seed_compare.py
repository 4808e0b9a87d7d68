"""Train two architectures at several training seeds with params.yaml's `train` group (the
train stage's own `fit`), and compare their test accuracy: per seed, the paired difference with
a bootstrap interval over the test images; over seeds, the mean difference with a t-interval.

    PYTHONPATH=src python scripts/seed_compare.py --archs birealnet cnn --seeds 1 2

Each (arch, seed) is trained once and its per-image results kept in --out (resumable).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch

from bnnprune.models import build_model, model_config
from bnnprune.pipeline.config import load_params
from bnnprune.pipeline.data import load_prepared
from bnnprune.pipeline.train import evaluate, fit
from bnnprune.study.stats import accuracy_difference, mean_ci


def trained(arch: str, seed: int, out: Path, params_path: str, data: str) -> dict:
    path = out / f"{arch}-seed{seed}.json"
    if path.exists():
        result = json.loads(path.read_text())
        return {**result, "right": [c == "1" for c in result["right"]]}
    params = load_params(params_path)
    splits, card = load_prepared(data)
    cfg = replace(params.train, seed=seed)
    model = build_model(model_config(arch, params.model.width, card["shape"],
                                     card["num_classes"]), seed=seed)
    start = time.perf_counter()
    fit(model, splits["train"], splits["val"], card, cfg)
    seconds = time.perf_counter() - start
    test = splits["test"]
    right = (evaluate(model, test, card)["pred"] == test.labels).tolist()
    result = {"arch": arch, "seed": seed, "train_s": round(seconds, 1),
              "test_acc": sum(right) / len(right)}
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**result, "right": "".join("01"[r] for r in right)}))  # per image
    return {**result, "right": right}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", nargs=2, default=["birealnet", "cnn"], metavar=("A", "B"))
    parser.add_argument("--seeds", nargs="+", type=int, default=[1])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--data", default="data/prepared")
    parser.add_argument("--out", default="reports/seeds", type=Path)
    parser.add_argument("--resamples", type=int, default=10000)
    args = parser.parse_args()
    a, b = args.archs
    rows = []
    for seed in args.seeds:
        ra, rb = (trained(arch, seed, args.out, args.params, args.data) for arch in (a, b))
        d = accuracy_difference(ra["right"], rb["right"], args.resamples)
        rows.append({"seed": seed, f"acc_{a}": ra["test_acc"], f"acc_{b}": rb["test_acc"],
                     f"train_s_{a}": ra["train_s"], f"train_s_{b}": rb["train_s"], **d})
        print(json.dumps(rows[-1]), flush=True)
    print(json.dumps({"mean_diff_over_seeds": mean_ci([r["diff"] for r in rows])}))


if __name__ == "__main__":
    torch.set_num_threads(2)
    main()
