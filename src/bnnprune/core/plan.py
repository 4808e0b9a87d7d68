"""Pruning plans: allocation (how many channels each coupled group keeps) and selection (which
ones), two separate, swappable pieces. Both work on any model: a group is keyed by a name, has
a width, and `bops(widths)` says what the model costs at given widths.

The flip rule, per group g with flip counts F of every binary weight that writes its channels:
    insensitive = F > tau;  p_g = insensitive.mean();  keep_g = round_keep(C_g * (1 - p_g))
Kept counts are rounded to the nearest multiple of `round_to` (halves up), never below the
smallest multiple >= min_channels, never above C_g (a group no wider than that floor keeps all
its channels). Every allocation rounds the same way, so BOPs are reported after rounding.

Allocations: `flip` (the rule above), `uniform` (the same fraction everywhere), `sensitivity`
(fractions 1 / (drop + floor) from measured layer drops), each scaled to a BOP budget by
`budget_allocation`; `global` ranks channels of all groups together (`global_keep_counts`).
Selections (channel scores, higher = pruned first, comparable across groups):
    flip    fraction of the channel's weights that are insensitive, then its mean flip count;
    latent  mean |w| of the channel relative to its group's mean |w| (negated);
    random  a seeded uniform number.
Ties always fall to the lower channel index, so every plan is deterministic.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable
from dataclasses import dataclass

import torch

from bnnprune.core.errors import UserError
from bnnprune.core.ops import reduction_pct

CRITERIA = ("flip", "latent", "random")
ALLOCATIONS = ("flip", "uniform", "sensitivity", "global")
SENSITIVITY_FLOOR_PT = 0.5  # a layer whose drop is below this counts as (almost) insensitive

Key = Hashable
Scores = list[tuple[float, float]]
Bops = Callable[[dict], int]


class PruneError(UserError, ValueError):
    """A pruning request that cannot be met; the message names the value and what is allowed."""


@dataclass(frozen=True)
class Method:
    allocation: str  # flip | uniform | sensitivity | global
    selection: str  # flip | latent | random
    interval: str = "window"  # flip counts: window | tail
    scratch: bool = False


METHODS = {
    "flip": Method("flip", "flip"),
    "flip_tail": Method("flip", "flip", "tail"),
    "latent": Method("sensitivity", "latent"),
    "random": Method("flip", "random"),
    "uniform": Method("uniform", "random"),
    "uniform_flip": Method("uniform", "flip"),
    "global": Method("global", "flip"),
    # the study's names for the same methods
    "flip_random": Method("flip", "random"),
    "uniform_random": Method("uniform", "random"),
    "global_flip": Method("global", "flip"),
    "scratch": Method("flip", "flip", scratch=True),
}


def method_of(name: str | Method) -> Method:
    if isinstance(name, Method):
        return name
    if name not in METHODS:
        raise PruneError(f"method {name!r} is not allowed; allowed: {', '.join(METHODS)}")
    return METHODS[name]


# ---- the flip rule ----------------------------------------------------------------------------

def insensitive_fraction(counts: torch.Tensor | list[torch.Tensor], tau: float) -> float:
    """p: the fraction of weights whose flip count is > tau (of a tensor: its float32 mean, as
    the chain models have always had it; over a list of tensors: exact)."""
    if isinstance(counts, torch.Tensor):
        return (counts > tau).float().mean().item()
    over = sum(int((c > tau).sum()) for c in counts)
    return over / max(sum(c.numel() for c in counts), 1)


def round_keep(c_out: int, desired: float, min_channels: int, round_to: int = 1) -> int:
    """Kept channels: `desired` rounded to the nearest multiple of round_to (halves up), at least
    the smallest multiple >= min_channels, at most c_out. A group no wider than that floor keeps
    all its channels."""
    floor = round_to * math.ceil(min_channels / round_to)
    if c_out <= floor:
        return c_out
    return min(c_out, max(floor, round_to * math.floor(desired / round_to + 0.5)))


def flip_keep(c_out: int, p: float, min_channels: int, round_to: int = 1) -> int:
    """The patent's count round(C_out * (1 - p)), rounded as `round_keep`."""
    return round_keep(c_out, c_out * (1 - p), min_channels, round_to)


def check_round_to(widths: dict[Key, int], round_to: int) -> None:
    """A round_to wider than a group leaves it nothing to keep but all its channels."""
    if round_to < 1:
        raise PruneError(f"round_to: {round_to}; allowed: an integer >= 1")
    narrow = {n: w for n, w in widths.items() if w < round_to}
    if narrow:
        raise PruneError(f"round_to: {round_to} cannot be met: groups {narrow} have fewer "
                         f"channels; allowed: 1..{min(widths.values())}")


# ---- selection --------------------------------------------------------------------------------

def channel_scores(criterion: str, weight: torch.Tensor, counts: torch.Tensor | None, tau: float,
                   generator: torch.Generator) -> Scores:
    """(primary, secondary) per output channel (row of `weight`, the rows of all binary weights
    of a group stacked side by side), comparable across groups (see module doc)."""
    c_out = weight.shape[0]
    if criterion == "flip":
        if counts is None:
            raise PruneError("criterion 'flip' needs flip counts")
        per_channel = counts.reshape(c_out, -1).float()  # (C_out, weights per channel)
        primary = (per_channel > tau).float().mean(1)
        secondary = per_channel.mean(1)
    elif criterion == "latent":
        magnitude = weight.detach().reshape(c_out, -1).abs().mean(1)  # (C_out,)
        primary = -magnitude / magnitude.mean().clamp_min(1e-12)
        secondary = torch.zeros(c_out)
    elif criterion == "random":
        primary = torch.rand(c_out, generator=generator)
        secondary = torch.zeros(c_out)
    else:
        raise PruneError(f"criterion: {criterion!r} is not allowed; allowed: "
                         f"{', '.join(CRITERIA)}")
    return list(zip(primary.tolist(), secondary.tolist(), strict=True))


def prune_order(scores: Scores) -> list[int]:
    """Channel indices, most prunable first (ties: lower index first)."""
    return sorted(range(len(scores)), key=lambda c: (-scores[c][0], -scores[c][1], c))


def select(scores: dict[Key, Scores], keep_n: dict[Key, int]) -> dict[Key, list[int]]:
    """Selection: the `keep_n[k]` least prunable channels of every group, sorted."""
    return {k: sorted(prune_order(s)[len(s) - keep_n[k]:]) for k, s in scores.items()}


# ---- allocation -------------------------------------------------------------------------------

def flip_allocation(widths: dict[Key, int], p: dict[Key, float], min_channels: int,
                    round_to: int) -> dict[Key, int]:
    """The patent's rule: group g keeps round(C_g * (1 - p_g))."""
    return {k: flip_keep(c, p[k], min_channels, round_to) for k, c in widths.items()}


def sensitivity_fractions(drops_pt: dict[Key, float]) -> dict[Key, float]:
    """Per-group prune fractions from sensitivity: 1 / (max(drop, 0) + floor)."""
    return {n: 1.0 / (max(d, 0.0) + SENSITIVITY_FLOOR_PT) for n, d in drops_pt.items()}


def budget_allocation(widths: dict[Key, int], fractions: dict[Key, float], budget: float,
                      bops: Bops, min_channels: int, round_to: int) -> dict[Key, int]:
    """Per-group prune fractions scaled to a BOP budget: group k keeps
    round_keep(C_k * (1 - min(1, s * fractions[k]))), with the smallest s (bisection) whose
    rounded counts cut BOPs by at least `budget` (a fraction). Rounding overshoots in steps of
    round_to channels, so blocks of round_to channels are then given back, the group rounded
    down furthest first, while the budget still holds: methods meet a budget about equally."""
    def desired(s: float) -> dict[Key, float]:
        return {k: widths[k] * (1 - min(1.0, s * f)) for k, f in fractions.items()}

    def keep(s: float) -> dict[Key, int]:
        return {k: round_keep(widths[k], d, min_channels, round_to)
                for k, d in desired(s).items()}

    start = bops({})
    meets = lambda k: 1 - bops(k) / start >= budget  # noqa: E731
    reached = lambda s: meets(keep(s))  # noqa: E731
    top = 1 / max(min(f for f in fractions.values() if f > 0), 1e-9) if any(
        f > 0 for f in fractions.values()) else 0.0
    if not reached(top):
        most = 1 - bops(keep(top)) / start
        raise PruneError(f"BOP budget {budget} cannot be reached with min_channels "
                         f"{min_channels} and round_to {round_to} (at most {most:.4f}); "
                         f"allowed: a lower budget, a smaller min_channels or round_to")
    lo, hi = 0.0, top
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if reached(mid) else (mid, hi)
    kept, wish = keep(hi), desired(hi)
    order = list(kept)
    while True:
        for k in sorted(order, key=lambda k: (kept[k] - wish[k], order.index(k))):
            more = {**kept, k: min(widths[k], kept[k] + round_to)}
            if more[k] > kept[k] and meets(more):
                kept = more
                break
        else:
            return kept


def global_keep_counts(widths: dict[Key, int], scores: dict[Key, Scores], target: float,
                       bops: Bops, min_channels: int, round_to: int = 1,
                       max_ratio: float = 1.0) -> dict[Key, int]:
    """Rank channels best-first across all groups; a group gives up round_to channels each time
    round_to of its channels have been ranked, while BOPs stay above the target, and never more
    than `max_ratio` of its channels (Torch-Pruning's max_pruning_ratio). A step that
    would reach the target is a candidate end, not taken at once: its group stops there and
    the ranking goes on in the other groups, so a coarse group's big step cannot overshoot the
    target when a finer one lands nearer. The candidate nearest the target wins (ties: the
    first found)."""
    if not 0 < max_ratio <= 1:
        raise PruneError(f"max_pruning_ratio: {max_ratio}; allowed: a fraction in (0, 1]")
    channels = dict(widths)
    if target <= 0:
        return channels
    lowest = {k: w - round_to * math.floor(w * max_ratio / round_to)  # the cap
              for k, w in widths.items()}
    ranked_in = dict.fromkeys(scores, 0)
    position = {k: i for i, k in enumerate(scores)}
    start = bops({})
    ranked = sorted((-s[0], -s[1], position[k], c) for k, layer in scores.items()
                    for c, s in enumerate(layer))
    keys = list(scores)
    stopped: set[Key] = set()
    best: tuple[float, dict[Key, int]] | None = None
    for *_, i, _c in ranked:
        k = keys[i]
        if k in stopped:
            continue
        ranked_in[k] += 1
        fewer = round_keep(widths[k], widths[k] - round_to * (ranked_in[k] // round_to),
                           min_channels, round_to)
        if fewer >= channels[k] or fewer < lowest[k]:
            continue
        trial = {**channels, k: fewer}
        reached = reduction_pct(start, bops(trial))
        if reached < 100 * target:
            channels = trial
            continue
        stopped.add(k)
        if best is None or reached < best[0]:
            best = (reached, trial)
    if best is None:
        most = reduction_pct(start, bops(channels))
        raise PruneError(f"target_bop_reduction: {target} cannot be reached with min_channels "
                         f"{min_channels}, round_to {round_to} and max_pruning_ratio "
                         f"{max_ratio} (at most {most / 100:.4f}); allowed: a lower target, a "
                         f"smaller min_channels or round_to, or a larger max_pruning_ratio")
    return best[1]
