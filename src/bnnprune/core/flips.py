"""Per-weight sign-flip counting over the pruning interval, and per-layer flip ratios."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from bnnprune.core.binary import Binary, binary_layers
from bnnprune.core.errors import UserError


class FlipCounter:
    """Counts, per binary weight, changes of `weight >= 0` between consecutive observations;
    the first observation is compared with the weights at construction.

        counter = bnnprune.FlipCounter(model)          # or binary=[MyBinaryConv, ...]
        ...; optimizer.step(); counter.step()
        counter.counts["layer1.0.conv"]                # int tensor shaped like the weight

    Observations happen at every `step()` (`granularity="step"`) or at every epoch end
    (`"epoch"`). With no interval configured (`active` is None), every observation counts at
    once: after N steps, `observations == N`. The training loop configures intervals instead:
    flips are summed per epoch and added, at the end of the epoch, to `counts` if the epoch is
    `active` (the pruning interval: the schedule's last flip_window epochs) or to `tail_counts`
    if it is in the `tail` (the near-convergence interval: constant low LR after the schedule);
    the per-epoch flip ratio of each layer (flips / (weights * observations)) is kept for every
    epoch.
    """

    def __init__(self, model: nn.Module, binary: Binary = None, granularity: str = "step"):
        if granularity not in ("step", "epoch"):
            raise ValueError(f"flip granularity {granularity!r}; allowed: 'step', 'epoch'")
        self.layers = binary_layers(model, binary)
        self.granularity = granularity
        self.prev = {n: m.weight.detach() >= 0 for n, m in self.layers.items()}
        self.counts = {n: torch.zeros_like(p, dtype=torch.int32) for n, p in self.prev.items()}
        self.tail_counts = {n: torch.zeros_like(c) for n, c in self.counts.items()}
        self.observations = self.tail_observations = 0
        self.active: bool | None = None  # None: no interval, every observation counts
        self.tail = False
        self._epoch = {n: torch.zeros_like(c) for n, c in self.counts.items()}
        self._epoch_obs = 0

    def observe(self) -> None:
        for n, m in self.layers.items():
            cur = m.weight.detach() >= 0
            flipped = cur != self.prev[n]
            self._epoch[n] += flipped
            if self.active is None:
                self.counts[n] += flipped
            self.prev[n] = cur
        self._epoch_obs += 1
        if self.active is None:
            self.observations += 1

    def step(self) -> None:
        if self.granularity == "step":
            self.observe()

    def end_epoch(self) -> dict[str, float]:
        """Close an epoch: add its flips to the counts if in the interval, and return each
        layer's mean flip ratio per observation in the epoch."""
        if self.granularity == "epoch":
            self.observe()
        obs = max(self._epoch_obs, 1)
        ratios = {n: int(e.sum()) / (e.numel() * obs) for n, e in self._epoch.items()}
        if self.active:
            for n, e in self._epoch.items():
                self.counts[n] += e
            self.observations += self._epoch_obs
        if self.tail:
            for n, e in self._epoch.items():
                self.tail_counts[n] += e
            self.tail_observations += self._epoch_obs
        for e in self._epoch.values():
            e.zero_()
        self._epoch_obs = 0
        return ratios

    def state_dict(self) -> dict[str, Any]:
        return {"prev": {n: p.cpu() for n, p in self.prev.items()},
                "counts": {n: c.cpu() for n, c in self.counts.items()},
                "tail_counts": {n: c.cpu() for n, c in self.tail_counts.items()},
                "observations": self.observations, "tail_observations": self.tail_observations,
                "active": self.active, "tail": self.tail}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # copies: counting on must change neither `state` nor a counter it came from
        device = next(iter(self.prev.values())).device if self.prev else "cpu"
        self.prev = {n: p.to(device, copy=True) for n, p in state["prev"].items()}
        self.counts = {n: c.to(device, copy=True) for n, c in state["counts"].items()}
        self.tail_counts = {n: c.to(device, copy=True) for n, c in state["tail_counts"].items()}
        self.observations, self.tail_observations = (state["observations"],
                                                     state["tail_observations"])
        self.active, self.tail = state["active"], state["tail"]

    def export(self, model_config: dict, window_epochs: int, tail_epochs: int = 0
               ) -> dict[str, Any]:
        """The content of models/flips.pt."""
        return {
            "counts": {n: c.cpu() for n, c in self.counts.items()},
            "observations": self.observations,
            "tail_counts": {n: c.cpu() for n, c in self.tail_counts.items()},
            "tail_observations": self.tail_observations,
            "granularity": self.granularity,
            "window_epochs": window_epochs,
            "tail_epochs": tail_epochs,
            "model_config": model_config,
        }


class FlipsError(UserError, ValueError):
    pass


def load_flips(path: str | Path, model: nn.Module) -> dict[str, Any]:
    """Load a flips file and check it belongs to `model` (same binary layers and shapes)."""
    path = Path(path)
    if not path.is_file():
        raise FlipsError(f"{path}: flips file not found")
    try:
        flips = torch.load(path, map_location="cpu", weights_only=True)
        counts = flips["counts"]
    except Exception as e:
        raise FlipsError(f"{path}: not a bnnprune flips file ({type(e).__name__}: {e})") from e
    layers = binary_layers(model)
    if set(counts) != set(layers):
        raise FlipsError(f"{path}: flip counts for layers {sorted(counts)} do not match the "
                         f"checkpoint's binary layers {sorted(layers)}")
    for n, m in layers.items():
        if tuple(counts[n].shape) != tuple(m.weight.shape):
            raise FlipsError(f"{path}: layer {n} has flip counts of shape "
                             f"{tuple(counts[n].shape)}, but its weight is "
                             f"{tuple(m.weight.shape)}")
    return flips


def interval_counts(flips: dict[str, Any], interval: str) -> dict[str, torch.Tensor]:
    """The flip counts of one pruning interval: 'window' (the schedule's last flip_window
    epochs) or 'tail' (the constant-low-LR epochs after it)."""
    if interval == "window":
        return flips["counts"]
    if interval != "tail":
        raise FlipsError(f"flip interval {interval!r}; allowed: 'window', 'tail'")
    if not flips.get("tail_observations"):
        raise FlipsError("flip interval 'tail': the baseline was trained without a tail "
                         "(train.tail_epochs: 0); allowed: set train.tail_epochs >= 1, or use "
                         "the interval 'window'")
    return flips["tail_counts"]
