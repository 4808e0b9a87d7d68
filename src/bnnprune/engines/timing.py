"""Side-by-side timing: every candidate once per round, the order rotating."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def time_interleaved(fns: dict[str, Callable[[], Any]], warmup: int,
                     repeats: int) -> dict[str, list[float]]:
    """ms per call of each fn; one call of each per round, rotating the order."""
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for i in range(len(names)):
            n = names[(r + i) % len(names)]
            start = time.perf_counter()
            fns[n]()
            times[n].append(1000 * (time.perf_counter() - start))
    return times
