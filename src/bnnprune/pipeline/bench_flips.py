"""Overhead of per-step flip logging on the training step, measured side by side in one run."""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F

from bnnprune.core.binary import clip_latent_weights
from bnnprune.core.flips import FlipCounter
from bnnprune.models import build_model, model_config
from bnnprune.pipeline.config import ModelConfig


def time_steps(model, optimizer, x, y, steps: int,
               counter: FlipCounter | None) -> tuple[float, float]:
    """Mean seconds per training step, and the part of it spent in flip logging."""
    logging = 0.0
    start = time.perf_counter()
    for _ in range(steps):
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        clip_latent_weights(model)
        if counter is not None:
            t = time.perf_counter()
            counter.step()
            logging += time.perf_counter() - t
    return (time.perf_counter() - start) / steps, logging / steps


def main(steps: int = 30, batch_size: int = 128, threads: int = 2, repeats: int = 5,
         model_cfg: ModelConfig | None = None, in_shape: tuple = (1, 28, 28)) -> dict:
    torch.manual_seed(0)
    torch.set_num_threads(threads)
    model_cfg = model_cfg or ModelConfig()
    model = build_model(model_config(model_cfg.arch, model_cfg.width, list(in_shape), 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    counter = FlipCounter(model, granularity="step")
    counter.active = True
    x, y = torch.randn(batch_size, *in_shape), torch.randint(0, 10, (batch_size,))
    time_steps(model, optimizer, x, y, 3, counter)  # warm-up
    plain, logged, inside = [], [], []
    for _ in range(repeats):  # interleaved, so both see the same machine load
        plain.append(time_steps(model, optimizer, x, y, steps, None)[0])
        total, flip = time_steps(model, optimizer, x, y, steps, counter)
        logged.append(total)
        inside.append(flip / (total - flip))
    ratios = [b / a for a, b in zip(plain, logged, strict=True)]
    result = {"step_ms_plain": 1000 * statistics.median(plain),
              "step_ms_logged": 1000 * statistics.median(logged),
              "overhead_pct": 100 * (statistics.median(ratios) - 1),
              "overhead_pct_range": [100 * (min(ratios) - 1), 100 * (max(ratios) - 1)],
              "logging_share_pct": 100 * statistics.median(inside),
              "batch_size": batch_size, "threads": threads, "steps": steps, "repeats": repeats}
    print(f"train step: {result['step_ms_plain']:.1f} ms without flip logging, "
          f"{result['step_ms_logged']:.1f} ms with: {result['overhead_pct']:+.2f}% (median of "
          f"{repeats} interleaved pairs; range {ratios and result['overhead_pct_range'][0]:+.2f}%"
          f" to {result['overhead_pct_range'][1]:+.2f}%)\n"
          f"time inside the flip counter: {result['logging_share_pct']:.2f}% of the rest of "
          f"the step (timed within the same steps)")
    return result
