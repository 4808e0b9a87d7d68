"""Training-step time of built-in architectures, side by side: one step of each per round
(the order rotating), so a busy machine slows them alike. Prints min and median ms per step
and each architecture's ratio to the first, with the load average.

    PYTHONPATH=src python scripts/step_time.py --archs cnn birealnet --threads 2
"""

from __future__ import annotations

import argparse
import os
import statistics

import torch
import torch.nn.functional as F

from bnnprune.core.binary import clip_latent_weights
from bnnprune.core.flips import FlipCounter
from bnnprune.engines.timing import time_interleaved
from bnnprune.models import build_model, model_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", nargs="+", default=["cnn", "birealnet"])
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=40)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x, y = torch.randn(args.batch, 1, 28, 28), torch.randint(0, 10, (args.batch,))

    def step_of(arch: str):
        model = build_model(model_config(arch, args.width, [1, 28, 28], 10), seed=0)
        opt = torch.optim.Adam(model.parameters(), 1e-3)
        counter = FlipCounter(model)

        def step() -> None:  # what the training loop does per batch
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            clip_latent_weights(model)
            counter.step()
        return step

    times = time_interleaved({a: step_of(a) for a in args.archs}, 3, args.rounds)
    first = statistics.median(times[args.archs[0]])
    print(f"batch {args.batch}, {args.threads} threads, {args.rounds} rounds, load "
          f"{os.getloadavg()[0]:.2f}")
    for arch, t in times.items():
        med = statistics.median(t)
        print(f"{arch:10s} min {min(t):7.2f} ms  median {med:7.2f} ms  "
              f"median / {args.archs[0]} {med / first:.2f}")


if __name__ == "__main__":
    main()
