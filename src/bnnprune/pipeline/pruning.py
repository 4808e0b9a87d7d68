"""Pruning the chain models (cnn, nin, alexnet) by block index, as the pipeline's prune stage
and the study have done from the start: the flip rule, criteria and allocations of
`core.plan` (one implementation), BOPs and surgery from `core.groups.CouplingGraph` (the one
graph walk every model is pruned by), the iterative prune -> retrain loop, and fine-tuning.

Channel counts come from the flip rule (so every criterion prunes to the same BOPs), from a
given list (`target_channels`), or, with `target_bop_reduction`, from the global ranking.
Surgery: the kept output channels of layer l select rows of its weight and entries of its
BatchNorm, and input channels of the next layer (a linear layer after a flatten: its column
groups (C, H*W)); the first (float) layer is never pruned. The result is a copy whose config
`channels` follows its layers.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from bnnprune.core import plan
from bnnprune.core.groups import CouplingGraph
from bnnprune.core.ops import count_ops, example_input, reduction_pct
from bnnprune.core.plan import (
    Method,  # noqa: F401  (re-exported: the chain planner's vocabulary)
    PruneError,
    channel_scores,
    check_round_to,
    insensitive_fraction,
    select,
)
from bnnprune.core.prune import PruneReport, prune
from bnnprune.models.chain import BNN
from bnnprune.pipeline.config import PruneConfig, TrainConfig
from bnnprune.pipeline.data import Split
from bnnprune.pipeline.train import FitResult, evaluate, fit

CRITERIA = ("flip", "latent", "random")


def layer_name(i: int) -> str:
    return f"blocks.{i}.layer"


def binary_blocks(model: BNN) -> list[int]:
    return [i for i, s in enumerate(model.specs) if s.binary]


def layer_p(counts: dict[str, torch.Tensor], tau: float) -> dict[str, float]:
    return {name: insensitive_fraction(c, tau) for name, c in counts.items()}


# ---- allocation on a chain: block index -> channels, through core.plan ------------------------

def widths_of(model: BNN) -> dict[int, int]:
    return {i: model.specs[i].out for i in binary_blocks(model)}


def chain_bops(model: BNN) -> Callable[[dict[int, int]], int]:
    """keep_n -> BOPs of `model` with binary block i at keep_n[i] channels (others in full),
    from one traced pass."""
    graph = CouplingGraph(model, example_input(model))
    return lambda keep_n: graph.bops({layer_name(i): n for i, n in keep_n.items()})


def flip_allocation(model: BNN, p: dict[str, float], min_channels: int, round_to: int
                    ) -> dict[int, int]:
    """The patent's rule: layer l keeps round(C_out,l * (1 - p_l))."""
    return plan.flip_allocation(widths_of(model), {i: p[layer_name(i)] for i in
                                                   binary_blocks(model)}, min_channels, round_to)


def budget_allocation(model: BNN, fractions: dict[int, float], budget: float, min_channels: int,
                      round_to: int) -> dict[int, int]:
    """`plan.budget_allocation` on the binary blocks of a chain."""
    widths = {i: model.specs[i].out for i in fractions}
    return plan.budget_allocation(widths, fractions, budget, chain_bops(model), min_channels,
                                  round_to)


def global_keep_counts(model: BNN, scores: dict[int, list[tuple[float, float]]], target: float,
                       min_channels: int, round_to: int = 1, max_ratio: float = 1.0
                       ) -> dict[int, int]:
    """`plan.global_keep_counts` on the binary blocks of a chain."""
    widths = {i: model.specs[i].out for i in scores}
    return plan.global_keep_counts(widths, scores, target, chain_bops(model), min_channels,
                                   round_to, max_ratio)


# ---- planning --------------------------------------------------------------------------------

@dataclass
class Plan:
    keep: dict[int, list[int]]  # block index -> kept output channels (sorted)
    p: dict[str, float]  # p_l per binary layer, from the flip counts the plan was made with
    counts: dict[int, int] = field(default_factory=dict)  # block index -> channels kept


def plan_pruning(model: BNN, flip_counts: dict[str, torch.Tensor], cfg: PruneConfig,
                 criterion: str, generator: torch.Generator,
                 target_channels: list[int] | None = None) -> Plan:
    """Decide which output channels of every binary layer survive: an allocation (target
    channels, the global ranking to prune.target_bop_reduction, or the flip rule) and a
    selection by `criterion`."""
    blocks = binary_blocks(model)
    check_round_to({layer_name(i): model.specs[i].out for i in blocks}, cfg.round_to)
    p = layer_p(flip_counts, cfg.tau)
    scores = {i: channel_scores(criterion, model.blocks[i].layer.weight,
                                flip_counts.get(layer_name(i)), cfg.tau, generator)
              for i in blocks}
    if target_channels is not None:
        channels = check_target_channels(model, target_channels, cfg.round_to)
        keep_n = {i: channels[i] for i in blocks}
    elif cfg.target_bop_reduction is not None:
        keep_n = global_keep_counts(model, scores, cfg.target_bop_reduction, cfg.min_channels,
                                    cfg.round_to, cfg.max_pruning_ratio)
    else:
        keep_n = flip_allocation(model, p, cfg.min_channels, cfg.round_to)
    return Plan(select(scores, keep_n), p, keep_n)


def check_target_channels(model: BNN, target: list[int], round_to: int = 1) -> list[int]:
    current = [s.out for s in model.specs]
    if len(target) != len(current):
        raise PruneError(f"target channels {target}: {len(target)} layers, the model has "
                         f"{len(current)} ({current})")
    for i, (t, c, s) in enumerate(zip(target, current, model.specs, strict=True)):
        if not s.binary and t != c:
            raise PruneError(f"target channels {target}: layer {i} is full precision and is "
                             f"never pruned; it must keep {c} channels")
        if not 1 <= t <= c:
            raise PruneError(f"target channels {target}: layer {i} cannot keep {t} of {c} "
                             f"channels; allowed: 1..{c}")
        if s.binary and t != c and t % round_to:
            raise PruneError(f"target channels {target}: layer {i} keeps {t}, not a multiple "
                             f"of prune.round_to {round_to}; allowed: multiples of {round_to} "
                             f"or all {c}")
    return list(target)


# ---- surgery ---------------------------------------------------------------------------------

def prune_channels(model: BNN, keep: dict[int, list[int]]) -> BNN:
    """A new, physically smaller BNN keeping output channels `keep[i]` of body layer i (layers
    not in `keep` keep all): the coupled-group surgery of `core.groups` on a copy, so the BN,
    the next layer's inputs and the classifier's columns (after a flatten) shrink with it."""
    for i in keep:
        if not (0 <= i < len(model.specs)) or not model.specs[i].binary:
            raise PruneError(f"layer {i} is not a binary layer; only binary layers are pruned "
                             f"(binary: {binary_blocks(model)})")
    pruned = copy.deepcopy(model)
    CouplingGraph(pruned, example_input(pruned)).apply(
        {layer_name(i): list(kept) for i, kept in keep.items()})
    pruned.sync_config()
    return pruned


# ---- the prune loop --------------------------------------------------------------------------

def channels_of(model: BNN) -> list[int]:
    return [s.out for s in model.specs]


Retrain = Callable[[BNN, int], tuple[BNN, dict[str, torch.Tensor]]]


def run_pruning(model: BNN, flip_counts: dict[str, torch.Tensor], cfg: PruneConfig,
                criterion: str | None = None, retrain: Retrain | None = None,
                target_channels: list[int] | None = None) -> tuple[BNN, list[dict[str, Any]]]:
    """Prune, then (iterative mode) retrain with flip logging and prune again, for up to
    `cfg.iterations` rounds while max_l p_l keeps falling. Returns the model and one record
    per round: p_l, max p_l, channels before/after."""
    criterion = criterion or cfg.criterion
    if cfg.iterations > 1 and (cfg.target_bop_reduction is not None or target_channels):
        raise PruneError(f"prune.iterations: {cfg.iterations} with a fixed target (target "
                         f"channels or prune.target_bop_reduction); allowed: 1")
    if cfg.iterations > 1 and retrain is None:
        raise PruneError("prune.iterations > 1 needs a retrain step")
    generator = torch.Generator().manual_seed(cfg.seed)
    rounds: list[dict[str, Any]] = []
    for r in range(1, cfg.iterations + 1):
        plan = plan_pruning(model, flip_counts, cfg, criterion, generator, target_channels)
        max_p = max(plan.p.values(), default=0.0)
        if rounds and not max_p < rounds[-1]["max_p"]:
            rounds.append({"round": r, "p": plan.p, "max_p": max_p, "pruned": False,
                           "channels_before": channels_of(model),
                           "channels_after": channels_of(model)})
            break
        before = channels_of(model)
        model = prune_channels(model, plan.keep)
        rounds.append({"round": r, "p": plan.p, "max_p": max_p, "pruned": True,
                       "channels_before": before, "channels_after": channels_of(model)})
        if r < cfg.iterations:
            model, flip_counts = retrain(model, r)
    return model, rounds


def retrain_config(finetune: TrainConfig, cfg: PruneConfig) -> TrainConfig:
    """The short retrain between rounds: the finetune group, `retrain_epochs` long, counting
    flips over its last min(flip_window, retrain_epochs) epochs."""
    return replace(finetune, epochs=cfg.retrain_epochs,
                   flip_window=min(finetune.flip_window, cfg.retrain_epochs))


# ---- reporting -------------------------------------------------------------------------------

def prune_report(before: nn.Module, after: nn.Module, p: dict[str, float],
                 groups: PruneReport | None = None) -> dict[str, Any]:
    """Per binary layer of a chain (or per coupled group, from `groups`, of any other model)
    p, channels and BOPs before/after; totals and reductions in %."""
    ops_b, ops_a = count_ops(before), count_ops(after)
    layers = {}
    if groups is not None:
        for name, g in groups.groups.items():
            layers[name] = {k: g[k] for k in ("p", "channels_before", "channels_after",
                                              "bops_before", "bops_after")}
            layers[name]["bops_reduction_pct"] = reduction_pct(g["bops_before"], g["bops_after"])
            layers[name]["layers"] = g["writers"]
    for i in binary_blocks(before) if groups is None else []:
        row_b, row_a = ops_b.layers[i], ops_a.layers[i]
        layers[row_b["name"]] = {
            "p": p.get(layer_name(i)), "channels_before": row_b["out_channels"],
            "channels_after": row_a["out_channels"], "bops_before": row_b["bops"],
            "bops_after": row_a["bops"],
            "bops_reduction_pct": reduction_pct(row_b["bops"], row_a["bops"])}
    total = {}
    for key in ("bops", "flops", "ops", "size_bits"):
        b, a = ops_b.total[key], ops_a.total[key]
        total.update({f"{key}_before": b, f"{key}_after": a,
                      f"{key}_reduction_pct": reduction_pct(b, a)})
    return {"layers": layers, "total": total}


def _index(name: str, position: int) -> int:
    """A chain block's index (`blocks.<i>.layer`), else the group's position."""
    part = name.split(".")[1] if name.count(".") else ""
    return int(part) if name.startswith("blocks.") and part.isdigit() else position


def prune_any(model: nn.Module, counts: dict[str, torch.Tensor], cfg: PruneConfig
              ) -> tuple[nn.Module, list[dict[str, Any]], PruneReport]:
    """A model that is not a chain (birealnet, a user's module) through `core.prune.prune`:
    the flip rule (or `prune.criterion` under it), or with prune.target_bop_reduction the
    global ranking by the criterion. Returns the model, its one round (as `run_pruning`'s,
    per coupled group) and the groups' report."""
    if cfg.iterations > 1:
        raise PruneError(f"prune.iterations: {cfg.iterations} on a {model.config['arch']!r} "
                         f"model; allowed: 1 (the iterative loop runs on the chain models)")
    allocation = "flip" if cfg.target_bop_reduction is None else "global"
    pruned, report = prune(model, example_input(model), counts,
                           method=Method(allocation, cfg.criterion),
                           target_bop_reduction=cfg.target_bop_reduction, tau=cfg.tau,
                           round_to=cfg.round_to, min_channels=cfg.min_channels, seed=cfg.seed,
                           max_pruning_ratio=cfg.max_pruning_ratio)
    groups = report.groups.values()
    p = {n: g["p"] for n, g in report.groups.items()}
    rounds = [{"round": 1, "p": p, "max_p": max(p.values(), default=0.0), "pruned": True,
               "channels_before": [g["channels_before"] for g in groups],
               "channels_after": [g["channels_after"] for g in groups]}]
    return pruned, rounds, report


def channel_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Plot data: channels (and BOPs) per binary layer before/after."""
    return [{"layer": name, "index": _index(name, i),
             "channels_before": r["channels_before"],
             "channels_after": r["channels_after"], "p": r["p"], "bops_before": r["bops_before"],
             "bops_after": r["bops_after"]} for i, (name, r) in enumerate(report["layers"].items())]


def finetune(model: BNN, splits: dict[str, Split], card: dict, cfg: TrainConfig,
             baseline_test_acc: float, resume_path: str | None, desc: str,
             teacher: nn.Module | None = None) -> tuple[FitResult, dict[str, Any]]:
    """Fine-tune a pruned model with the one training loop (distilling from `teacher` when
    `cfg.distill` > 0); accuracies and the drop in points."""
    result = fit(model, splits["train"], splits["val"], card, cfg, resume_path, desc=desc,
                 teacher=teacher)
    val, test = (evaluate(model, splits[k], card) for k in ("val", "test"))
    return result, {"val_acc": val["acc"], "test_acc": test["acc"], "test_loss": test["loss"],
                    "baseline_test_acc": baseline_test_acc,
                    "acc_drop_pt": 100.0 * (baseline_test_acc - test["acc"]),
                    "epochs": cfg.epochs, "distill": cfg.distill}


def accuracy(model: nn.Module, splits: dict[str, Split], card: dict) -> dict[str, float]:
    return {f"{k}_acc": evaluate(model, splits[k], card)["acc"] for k in ("val", "test")}
