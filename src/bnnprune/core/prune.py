"""`prune`: flip-guided (or baseline) structured pruning of any PyTorch BNN, and
`FlipImportance`, the flip rule as an importance for Torch-Pruning's pruners.

One function for every method the study compares: a method is an allocation and a selection
(`plan.METHODS`); the coupled groups come from a traced forward pass (`groups.CouplingGraph`),
so residual streams, concatenations and depthwise convs are pruned together by construction.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from bnnprune.core.binary import Binary
from bnnprune.core.flips import FlipCounter
from bnnprune.core.groups import SUPPORTED, CouplingGraph
from bnnprune.core.ops import count_ops, reduction_pct
from bnnprune.core.plan import (
    Method,
    PruneError,
    Scores,
    budget_allocation,
    channel_scores,
    check_round_to,
    flip_allocation,
    global_keep_counts,
    insensitive_fraction,
    method_of,
    select,
    sensitivity_fractions,
)

Flips = FlipCounter | dict[str, torch.Tensor]


@dataclass
class PruneReport:
    """What `prune` did: per coupled group its channels before/after, p and BOPs; totals."""

    method: str
    groups: dict[str, dict[str, Any]] = field(default_factory=dict)
    bops_before: int = 0
    bops_after: int = 0
    flops_before: int = 0
    flops_after: int = 0

    @property
    def reduction(self) -> float:
        """The BOP reduction as a fraction (0.5: half the BOPs gone)."""
        return reduction_pct(self.bops_before, self.bops_after) / 100

    @property
    def widths(self) -> dict[str, int]:
        return {n: g["channels_after"] for n, g in self.groups.items()}

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "groups": self.groups, "bops_before": self.bops_before,
                "bops_after": self.bops_after, "flops_before": self.flops_before,
                "flops_after": self.flops_after, "reduction": self.reduction}


def flip_counts(flips: Flips, interval: str = "window") -> dict[str, torch.Tensor]:
    """The counts of `flips`; of a FlipCounter, those of the method's interval (a dict is
    taken as the interval's counts)."""
    if isinstance(flips, FlipCounter):
        if interval != "tail":
            return flips.counts
        if not flips.tail_observations:
            raise PruneError("flips: the FlipCounter has no tail observations (its `tail` "
                             "interval was never on) for a method on the 'tail' interval; "
                             "allowed: a counter with tail counts, or its .tail_counts dict")
        return flips.tail_counts
    if isinstance(flips, dict):
        return flips
    raise PruneError(f"flips: {type(flips).__name__} is not allowed; allowed: a FlipCounter or "
                     f"its .counts dict")


def check_flips(counts: dict[str, torch.Tensor], graph: CouplingGraph, needed: bool) -> None:
    layers = graph.binaries
    if needed and set(counts) != set(layers):
        raise PruneError(f"flips: counts for layers {sorted(counts)} do not match the model's "
                         f"binary layers {sorted(layers)}")
    for n, c in counts.items():
        if n in layers and tuple(c.shape) != tuple(layers[n].weight.shape):
            raise PruneError(f"flips: layer {n!r} has counts of shape {tuple(c.shape)}, its "
                             f"weight is {tuple(layers[n].weight.shape)}")


def group_p(graph: CouplingGraph, counts: dict[str, torch.Tensor], tau: float
            ) -> dict[str, float]:
    """p per prunable group, over every binary weight that writes it (exact); {} without
    counts."""
    if not counts:
        return {}
    return {g: insensitive_fraction([graph.group_tensors(g, counts)], tau)
            for g in graph.widths()}


def group_scores(graph: CouplingGraph, selection: str, counts: dict[str, torch.Tensor],
                 tau: float, generator: torch.Generator) -> dict[str, Scores]:
    """Channel scores per prunable group, over the group's binary weights (and counts) stacked
    side by side."""
    return {g: channel_scores(selection, graph.weights(g),
                              graph.group_tensors(g, counts) if counts else None, tau, generator)
            for g in graph.widths()}


def plan(graph: CouplingGraph, counts: dict[str, torch.Tensor], method: Method,
         target_bop_reduction: float | None, tau: float, round_to: int, min_channels: int,
         seed: int, sensitivity: dict[str, float] | None = None,
         widths: dict[str, int] | None = None, max_pruning_ratio: float = 1.0
         ) -> tuple[dict[str, list[int]], dict[str, float]]:
    """Kept channels per prunable group, and p per group."""
    full = graph.widths()
    if not full:
        raise PruneError("no prunable group: every binary layer's channels reach the model's "
                         "output layer")
    check_round_to(full, round_to)
    p = group_p(graph, counts, tau)
    scores = group_scores(graph, method.selection, counts, tau,
                          torch.Generator().manual_seed(seed))
    if widths is not None:
        unknown = set(widths) - set(full)
        if unknown:
            raise PruneError(f"widths: unknown groups {sorted(unknown)}; allowed: {list(full)}")
        keep_n = {g: widths.get(g, c) for g, c in full.items()}
        for g, n in keep_n.items():
            if not 1 <= n <= full[g] or (n != full[g] and n % round_to):
                raise PruneError(f"widths: group {g!r} cannot keep {n} of {full[g]} channels; "
                                 f"allowed: multiples of round_to {round_to} or all {full[g]}")
    elif method.allocation == "global":
        if target_bop_reduction is None:
            raise PruneError("method with a global allocation needs target_bop_reduction")
        keep_n = global_keep_counts(full, scores, target_bop_reduction, graph.bops,
                                    min_channels, round_to, max_pruning_ratio)
    elif target_bop_reduction is None:
        if method.allocation != "flip":
            raise PruneError(f"allocation {method.allocation!r} needs target_bop_reduction; "
                             f"only the flip allocation has a budget of its own (the flip rule)")
        keep_n = flip_allocation(full, p, min_channels, round_to)
    else:
        if method.allocation == "flip":
            fractions = p
        elif method.allocation == "uniform":
            fractions = dict.fromkeys(full, 1.0)
        elif method.allocation == "sensitivity":
            if sensitivity is None:
                raise PruneError("allocation 'sensitivity' (method 'latent') needs "
                                 "sensitivity={group: validation drop in points}")
            fractions = sensitivity_fractions({g: sensitivity[g] for g in full})
        else:
            raise PruneError(f"allocation {method.allocation!r} is not allowed")
        keep_n = budget_allocation(full, fractions, target_bop_reduction, graph.bops,
                                   min_channels, round_to)
    return select(scores, keep_n), p


def prune(model: nn.Module, example_inputs: torch.Tensor | tuple, flips: Flips | None, *,
          method: str | Method = "flip", target_bop_reduction: float | None = None,
          tau: float = 2, round_to: int = 8, min_channels: int = 8, binary: Binary = None,
          seed: int = 0, ignored_layers: list[nn.Module] | None = None,
          sensitivity: dict[str, float] | None = None,
          widths: dict[str, int] | None = None,
          max_pruning_ratio: float = 1.0) -> tuple[nn.Module, PruneReport]:
    """Prune `model`'s coupled channel groups; returns (a smaller copy, report). `model` is left
    untouched.

    method: flip (the flip rule), flip_tail, latent, random, uniform, uniform_flip, global
    (see `plan.METHODS`). With `target_bop_reduction` (a fraction) every allocation is scaled
    to cut BOPs by at least that much; without it, the flip rule decides the widths.
    `widths` fixes the kept channels per group instead (selection still by `method`).
    `max_pruning_ratio` caps the share of a group's channels the global ranking may remove
    (as Torch-Pruning's pruners; 1: no cap)."""
    meth = method_of(method)
    counts = flip_counts(flips, meth.interval) if flips is not None else {}
    if meth.selection == "flip" or (meth.allocation == "flip" and widths is None):
        if not counts:
            raise PruneError(f"method {method!r} needs flip counts (a FlipCounter or its "
                             f".counts)")
    if target_bop_reduction is not None and not 0 <= target_bop_reduction < 1:
        raise PruneError(f"target_bop_reduction: {target_bop_reduction}; allowed: a fraction "
                         f"in [0, 1)")
    pruned = copy.deepcopy(model)
    ignored = [dict(pruned.named_modules())[n] for n, m in model.named_modules()
               if any(m is i for i in ignored_layers or [])]
    graph = CouplingGraph(pruned, example_inputs, binary, ignored)
    check_flips(counts, graph, needed=bool(counts))
    before = graph.ops
    keep, p = plan(graph, counts, meth, target_bop_reduction, tau, round_to, min_channels, seed,
                   sensitivity, widths, max_pruning_ratio)
    graph.apply(keep)
    if hasattr(pruned, "sync_config"):
        pruned.sync_config()
    try:
        after = count_ops(pruned, example_inputs, binary)
    except RuntimeError as e:
        raise PruneError(f"the pruned model does not run ({e}); an op in {type(model).__name__} "
                         f"is not one the surgery supports: {SUPPORTED}") from e
    for name, kept in keep.items():
        for w in graph.groups[name].writers:
            got = graph.binaries[w].weight.shape[0]
            if got != len(kept):
                raise PruneError(f"group {name!r}: layer {w!r} kept {got} channels, not "
                                 f"{len(kept)}; an op between the group's layers is not one "
                                 f"the surgery supports: {SUPPORTED}")
    report = PruneReport(str(method) if isinstance(method, str) else repr(method),
                         bops_before=before.bops, bops_after=after.bops,
                         flops_before=before.flops, flops_after=after.flops)
    for name, group in graph.prunable.items():
        report.groups[name] = {
            "channels_before": group.width, "channels_after": len(keep[name]),
            "p": p.get(name), "writers": list(group.writers), "members": group.members,
            "bops_before": sum(before.row(w)["bops"] for w in group.writers),
            "bops_after": sum(after.row(w)["bops"] for w in group.writers),
            "kept": keep[name]}
    pruned.train(model.training)
    return pruned, report


class FlipImportance:
    """The flip rule as a Torch-Pruning importance: a channel that flips often is unimportant.

        pruner = torch_pruning.pruner.MetaPruner(model, example_inputs,
                                                 importance=bnnprune.FlipImportance(counter))

    A channel's importance is minus the fraction of its binary weights whose flip count is
    > tau, less a small tie-break by its mean flip count, summed over every binary layer of
    the group that writes it. `counter` is a FlipCounter on the model being pruned, or its
    `.counts` with `model=`."""

    def __init__(self, counter: Flips, tau: float = 2, model: nn.Module | None = None):
        self.counts = flip_counts(counter)
        if isinstance(counter, FlipCounter):
            layers = counter.layers
        elif model is not None:
            modules = dict(model.named_modules())
            layers = {n: modules[n] for n in self.counts}
        else:
            raise PruneError("FlipImportance: pass a FlipCounter, or its .counts with model=")
        self.by_module = {id(m): n for n, m in layers.items()}
        self.tau = tau

    def __call__(self, group: Any) -> torch.Tensor | None:
        root = [int(i) for i in group.items[0].root_idxs]
        at = {r: j for j, r in enumerate(root)}  # root channel -> position in the answer
        score = torch.zeros(len(root))
        found = False
        for item in group.items:
            name = self.by_module.get(id(item.dep.target.module))
            if name is None or not group._DG.is_out_channel_pruning_fn(item.dep.handler):
                continue
            found = True
            idxs = [int(i) for i in item.idxs]
            c = self.counts[name][idxs].reshape(len(idxs), -1).float()  # (channels, weights)
            mean = c.mean(1)
            s = -((c > self.tau).float().mean(1) + 1e-3 * mean / (1 + mean))
            for j, r in enumerate(int(i) for i in item.root_idxs):
                score[at[r]] += s[j]
        return score if found else None
