"""Test accuracy of two checkpoints on the same prepared test set, and their difference with a
bootstrap 95% interval over the test images (test-set sampling only: one training run each,
so training noise is not in it).

    PYTHONPATH=src python scripts/accuracy_diff.py A.pt B.pt [--data data/prepared]
"""

from __future__ import annotations

import argparse
import json

import torch

from bnnprune.models import load_checkpoint
from bnnprune.pipeline.data import load_prepared
from bnnprune.pipeline.train import evaluate
from bnnprune.study.stats import accuracy_difference


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a")
    parser.add_argument("b")
    parser.add_argument("--data", default="data/prepared")
    parser.add_argument("--resamples", type=int, default=10000)
    args = parser.parse_args()
    torch.set_num_threads(2)
    splits, card = load_prepared(args.data)
    test = splits["test"]
    right = {}
    with torch.no_grad():
        for path in (args.a, args.b):
            model = load_checkpoint(path)[0]
            right[path] = (evaluate(model, test, card)["pred"] == test.labels).tolist()
    r = accuracy_difference(right[args.a], right[args.b], args.resamples)
    print(json.dumps({"a": args.a, "b": args.b, "acc_a": sum(right[args.a]) / r["n"],
                      "acc_b": sum(right[args.b]) / r["n"], **r}, indent=1))


if __name__ == "__main__":
    main()
