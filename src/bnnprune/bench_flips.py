"""Overhead of per-step flip logging on the training step, measured side by side in one run."""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F

from bnnprune.binary import clip_latent_weights
from bnnprune.config import ModelConfig
from bnnprune.flips import FlipCounter
from bnnprune.models import build_model, model_config


def time_steps(model, optimizer, x, y, steps: int, counter: FlipCounter | None) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        clip_latent_weights(model)
        if counter is not None:
            counter.step()
    return (time.perf_counter() - start) / steps


def main(steps: int = 30, batch_size: int = 128, threads: int = 2, repeats: int = 5,
         model_cfg: ModelConfig | None = None, in_shape: tuple = (1, 28, 28)) -> dict:
    torch.manual_seed(0)
    torch.set_num_threads(threads)
    model_cfg = model_cfg or ModelConfig()
    model = build_model(model_config(model_cfg.arch, model_cfg.width, list(in_shape), 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    counter = FlipCounter(model, "step")
    counter.active = True
    x, y = torch.randn(batch_size, *in_shape), torch.randint(0, 10, (batch_size,))
    time_steps(model, optimizer, x, y, 3, counter)  # warm-up
    plain, logged = [], []
    for _ in range(repeats):  # interleaved, so both see the same machine load
        plain.append(time_steps(model, optimizer, x, y, steps, None))
        logged.append(time_steps(model, optimizer, x, y, steps, counter))
    ratios = [b / a for a, b in zip(plain, logged, strict=True)]
    result = {"step_ms_plain": 1000 * statistics.median(plain),
              "step_ms_logged": 1000 * statistics.median(logged),
              "overhead_pct": 100 * (statistics.median(ratios) - 1),
              "overhead_pct_min": 100 * (min(ratios) - 1),
              "overhead_pct_max": 100 * (max(ratios) - 1),
              "batch_size": batch_size, "threads": threads, "steps": steps, "repeats": repeats}
    print(f"train step: {result['step_ms_plain']:.1f} ms without flip logging, "
          f"{result['step_ms_logged']:.1f} ms with; overhead {result['overhead_pct']:+.2f}% "
          f"(median of {repeats} interleaved pairs; range {result['overhead_pct_min']:+.2f}% "
          f"to {result['overhead_pct_max']:+.2f}%)")
    return result
