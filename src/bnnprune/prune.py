"""Flip-guided structured pruning (and the latent / random baselines), physical surgery.

Per binary layer l with flip counts F (the weight's shape, counted over the pruning interval):
    insensitive = F > tau;  p_l = insensitive.mean()
    keep_l = max(min_channels, round_half_up(C_out * (1 - p_l)))   (at most C_out)
Which channels go, most prunable first:
    flip    most insensitive weights, then highest total flip count;
    latent  smallest mean |latent weight|;
    random  a seeded permutation.
Ties always fall to the lower channel index, so every plan is deterministic.

Channel counts come from the flip rule (so every criterion prunes to the same BOPs), from a
given list (`target_channels`), or, with `target_bop_reduction`, from a global ranking: every
channel of every binary layer gets a score comparable across layers, and channels are removed
best-first until total BOPs have dropped by the target:
    flip    fraction of the channel's weights that are insensitive (then its mean flip count
            per weight): both are per-weight rates, so layers of any size compare directly;
    latent  mean |w| of the channel divided by the mean |w| of its layer (layers whose latent
            weights sit at different scales compare by relative magnitude);
    random  a seeded uniform number.

Surgery: the kept output channels of layer l select rows of its weight and entries of its
BatchNorm, and input channels of the next layer; a linear layer after a flatten has its columns
grouped (C, H*W); the classifier after the last body layer likewise. The first (float) layer is
never pruned. The result is a fresh `BNN` whose config `channels` changed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from bnnprune.config import PruneConfig, TrainConfig
from bnnprune.data import Split
from bnnprune.models import BNN, build_model
from bnnprune.ops import count_ops, reduction_pct
from bnnprune.train import FitResult, evaluate, fit

CRITERIA = ("flip", "latent", "random")


class PruneError(ValueError):
    """A pruning request that cannot be met; the message names the value and what is allowed."""


def layer_name(i: int) -> str:
    return f"blocks.{i}.layer"


def binary_blocks(model: BNN) -> list[int]:
    return [i for i, s in enumerate(model.specs) if s.binary]


# ---- the flip rule --------------------------------------------------------------------------

def insensitive_fraction(counts: torch.Tensor, tau: float) -> float:
    """p_l: the fraction of a layer's weights whose flip count is > tau."""
    return (counts > tau).float().mean().item()


def flip_keep(c_out: int, p: float, min_channels: int) -> int:
    """round(C_out * (1 - p)) (halves round up), never below min_channels nor above C_out."""
    return min(c_out, max(min_channels, math.floor(c_out * (1 - p) + 0.5)))


def layer_p(counts: dict[str, torch.Tensor], tau: float) -> dict[str, float]:
    return {name: insensitive_fraction(c, tau) for name, c in counts.items()}


# ---- channel scores: higher = pruned first ----------------------------------------------------

def channel_scores(criterion: str, weight: torch.Tensor, counts: torch.Tensor | None, tau: float,
                   generator: torch.Generator) -> list[tuple[float, float]]:
    """(primary, secondary) per output channel, comparable across layers (see module doc)."""
    c_out = weight.shape[0]
    if criterion == "flip":
        if counts is None:
            raise PruneError("criterion 'flip' needs flip counts")
        per_channel = counts.reshape(c_out, -1).float()  # (C_out, C_in*k*k)
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
        raise PruneError(f"prune.criterion: {criterion!r} is not allowed; allowed: "
                         f"{', '.join(CRITERIA)}")
    return list(zip(primary.tolist(), secondary.tolist(), strict=True))


def prune_order(scores: list[tuple[float, float]]) -> list[int]:
    """Channel indices, most prunable first (ties: lower index first)."""
    return sorted(range(len(scores)), key=lambda c: (-scores[c][0], -scores[c][1], c))


# ---- planning --------------------------------------------------------------------------------

@dataclass
class Plan:
    keep: dict[int, list[int]]  # block index -> kept output channels (sorted)
    p: dict[str, float]  # p_l per binary layer, from the flip counts the plan was made with
    counts: dict[int, int] = field(default_factory=dict)  # block index -> channels kept


def plan_pruning(model: BNN, flip_counts: dict[str, torch.Tensor], cfg: PruneConfig,
                 criterion: str, generator: torch.Generator,
                 target_channels: list[int] | None = None) -> Plan:
    """Decide which output channels of every binary layer survive."""
    blocks = binary_blocks(model)
    p = layer_p(flip_counts, cfg.tau)
    weights = {i: model.blocks[i].layer.weight for i in blocks}
    scores = {i: channel_scores(criterion, weights[i], flip_counts.get(layer_name(i)), cfg.tau,
                                generator) for i in blocks}
    if target_channels is not None:
        channels = check_target_channels(model, target_channels)
        keep_n = {i: channels[i] for i in blocks}
    elif cfg.target_bop_reduction is not None:
        keep_n = global_keep_counts(model, scores, cfg.target_bop_reduction, cfg.min_channels)
    else:
        keep_n = {i: flip_keep(model.specs[i].out, p[layer_name(i)], cfg.min_channels)
                  for i in blocks}
    keep = {}
    for i in blocks:
        order = prune_order(scores[i])
        keep[i] = sorted(order[len(order) - keep_n[i]:])
    return Plan(keep, p, keep_n)


def check_target_channels(model: BNN, target: list[int]) -> list[int]:
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
    return list(target)


def global_keep_counts(model: BNN, scores: dict[int, list[tuple[float, float]]], target: float,
                       min_channels: int) -> dict[int, int]:
    """Remove channels best-first across all binary layers until BOPs drop by `target`."""
    channels = [s.out for s in model.specs]
    bops = lambda: count_ops({**model.config, "channels": channels})["total"]["bops"]  # noqa: E731
    start = bops()
    ranked = sorted(((-s[0], -s[1], i, c) for i, layer in scores.items()
                     for c, s in enumerate(layer)))
    for *_, i, _c in ranked:
        if reduction_pct(start, bops()) >= 100 * target:
            break
        if channels[i] > min(min_channels, model.specs[i].out):
            channels[i] -= 1
    reached = reduction_pct(start, bops())
    if reached < 100 * target:
        raise PruneError(f"prune.target_bop_reduction: {target} cannot be reached with "
                         f"prune.min_channels {min_channels} (at most {reached / 100:.4f}); "
                         f"allowed: a lower target or a smaller min_channels")
    return {i: channels[i] for i in scores}


# ---- surgery ---------------------------------------------------------------------------------

def _take_inputs(weight: torch.Tensor, keep: list[int] | None, c_prev: int) -> torch.Tensor:
    """Keep input channels `keep` of a conv (O, C, k, k) or linear (O, C*G) weight, where a
    linear after a flatten groups its columns (C, G) with G = H*W."""
    if keep is None:
        return weight
    if weight.dim() == 4:
        return weight[:, keep]
    out, cols = weight.shape
    group = cols // c_prev
    return weight.reshape(out, c_prev, group)[:, keep].reshape(out, len(keep) * group)


@torch.no_grad()
def prune_channels(model: BNN, keep: dict[int, list[int]]) -> BNN:
    """A new, physically smaller BNN keeping output channels `keep[i]` of body layer i (layers
    not in `keep` keep all), with the surviving latent weights and BN state copied in."""
    for i, kept in keep.items():
        if not (0 <= i < len(model.specs)) or not model.specs[i].binary:
            raise PruneError(f"layer {i} is not a binary layer; only binary layers are pruned "
                             f"(binary: {binary_blocks(model)})")
        c = model.specs[i].out
        if not kept or sorted(set(kept)) != list(kept) or kept[0] < 0 or kept[-1] >= c:
            raise PruneError(f"layer {i}: kept channels {kept} must be sorted, unique, "
                             f"non-empty and within 0..{c - 1}")
    channels = [len(keep[i]) if i in keep else s.out for i, s in enumerate(model.specs)]
    pruned = build_model({**model.config, "channels": channels})
    prev: list[int] | None = None  # kept output channels of the previous layer (None: all)
    c_prev = model.config["in_shape"][0]
    for i, (old, new) in enumerate(zip(model.blocks, pruned.blocks, strict=True)):
        out = keep.get(i)
        weight = _take_inputs(old.layer.weight, prev, c_prev)
        new.layer.weight.copy_(weight if out is None else weight[out])
        for name, t in old.bn.state_dict().items():
            new.bn.state_dict()[name].copy_(t if out is None or t.dim() == 0 else t[out])
        prev, c_prev = out, model.specs[i].out
    pruned.classifier.weight.copy_(_take_inputs(model.classifier.weight, prev, c_prev))
    pruned.classifier.bias.copy_(model.classifier.bias)
    pruned.train(model.training)
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

def prune_report(before: BNN, after: BNN, p: dict[str, float]) -> dict[str, Any]:
    """Per binary layer p_l, channels and BOPs before/after; totals and reductions in %."""
    ops_b, ops_a = count_ops(before), count_ops(after)
    layers = {}
    for i in binary_blocks(before):
        row_b, row_a = ops_b["layers"][i], ops_a["layers"][i]
        layers[row_b["name"]] = {
            "p": p.get(layer_name(i)), "channels_before": row_b["out_channels"],
            "channels_after": row_a["out_channels"], "bops_before": row_b["bops"],
            "bops_after": row_a["bops"],
            "bops_reduction_pct": reduction_pct(row_b["bops"], row_a["bops"])}
    total = {}
    for key in ("bops", "flops", "ops", "size_bits"):
        b, a = ops_b["total"][key], ops_a["total"][key]
        total.update({f"{key}_before": b, f"{key}_after": a,
                      f"{key}_reduction_pct": reduction_pct(b, a)})
    return {"layers": layers, "total": total}


def channel_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Plot data: channels (and BOPs) per binary layer before/after."""
    return [{"layer": name, "index": int(name.split(".")[1]),
             "channels_before": r["channels_before"],
             "channels_after": r["channels_after"], "p": r["p"], "bops_before": r["bops_before"],
             "bops_after": r["bops_after"]} for name, r in report["layers"].items()]


def finetune(model: BNN, splits: dict[str, Split], card: dict, cfg: TrainConfig,
             baseline_test_acc: float, resume_path: str | None, desc: str
             ) -> tuple[FitResult, dict[str, Any]]:
    """Fine-tune a pruned model with the one training loop; accuracies and the drop in points."""
    result = fit(model, splits["train"], splits["val"], card, cfg, resume_path, desc=desc)
    val, test = (evaluate(model, splits[k], card) for k in ("val", "test"))
    return result, {"val_acc": val["acc"], "test_acc": test["acc"], "test_loss": test["loss"],
                    "baseline_test_acc": baseline_test_acc,
                    "acc_drop_pt": 100.0 * (baseline_test_acc - test["acc"]),
                    "epochs": cfg.epochs}


def accuracy(model: nn.Module, splits: dict[str, Split], card: dict) -> dict[str, float]:
    return {f"{k}_acc": evaluate(model, splits[k], card)["acc"] for k in ("val", "test")}


def compare_rows(runs: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Rows (criterion, bops_pct, test_acc, acc_drop_pt) of the plot file, and a summary naming
    the criterion with the highest test accuracy and its margin over the runner-up."""
    by_criterion: dict[str, dict[str, Any]] = {}
    for run in runs:
        by_criterion.setdefault(run["criterion"], run)
    rows = [{"criterion": c, "bops_pct": r["bops_reduction_pct"], "test_acc": r["test_acc"],
             "acc_drop_pt": r["acc_drop_pt"]} for c, r in by_criterion.items()]
    ranked = sorted(rows, key=lambda r: -r["test_acc"])
    bops = [r["bops_pct"] for r in rows]
    summary = {
        "winner": ranked[0]["criterion"],
        "winner_margin_pt": (100.0 * (ranked[0]["test_acc"] - ranked[1]["test_acc"])
                             if len(ranked) > 1 else 0.0),
        "bops_pct_spread": max(bops) - min(bops),
        "criteria": {c: {"bops_reduction_pct": r["bops_reduction_pct"],
                         "test_acc": r["test_acc"], "val_acc": r["val_acc"],
                         "acc_drop_pt": r["acc_drop_pt"]} for c, r in by_criterion.items()},
    }
    return rows, summary
