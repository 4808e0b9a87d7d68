"""The criteria study: pruning methods as (allocation, selection, recovery), run at BOP budgets
over seeds, and the direct test of the hypothesis "weights that flip often are insensitive".

A method prunes the baseline's units to a BOP budget. The units of a chain model (cnn, nin,
alexnet) are its binary layers, planned by block index with the chain planner and cut by its
own surgery (`pipeline.pruning`), as the study's committed results were made; those of any
other model (birealnet, a user's module) are its prunable coupled channel groups
(`core.groups.CouplingGraph`, named after their first binary writer), pruned by
`core.prune.prune`. `units_of` is where the two part. Per method:
- allocation (channels per unit), each scaled to the budget by `plan.budget_allocation`
  unless global: flip (fractions p_l, the patent's rule), sensitivity (the latent-weight paper's
  layer analysis: fractions 1 / (drop_l + plan.SENSITIVITY_FLOOR_PT), drop_l the validation drop
  in points when unit l alone loses `study.sensitivity_ratio` of its channels by latent
  selection), uniform (the same fraction everywhere), global (channel scores ranked across
  units until the budget is met, `plan.global_keep_counts`);
- selection (which channels): flip, latent or random (`plan.channel_scores`);
- recovery: `study.recovery_steps` steps of the one training loop (the finetune group with the
  study's batch size and LR), or for `scratch` the allocated architecture trained from new
  weights with the train group (the baseline's epochs), then the same recovery. A user's model
  cannot be rebuilt at its pruned widths, so it has no scratch cell.
The seed drives random selection, the recovery's data (a seeded subset in a seeded order) and
scratch's initial weights; methods compared at one seed share the recovery data and order.

A chain model's accuracies are measured with the packed CPU engine (`engine.PackedModel`),
which computes the same predictions as torch (the benchmark stage checks the whole test set;
every cell here re-checks a sample and records the mismatches). The engine runs the chain
models only: any other model is evaluated with torch and its cells say the check was skipped.
"""

from __future__ import annotations

import copy
import math
from dataclasses import replace
from typing import Any

import numba
import torch
import torch.nn.functional as F
from torch import nn

from bnnprune.core.flips import interval_counts
from bnnprune.core.groups import CouplingGraph
from bnnprune.core.ops import count_ops, example_input, reduction_pct
from bnnprune.core.plan import (
    METHODS,
    Method,
    Scores,
    round_keep,
    sensitivity_fractions,
)
from bnnprune.core.prune import group_p, group_scores, prune
from bnnprune.engines.packed import PackedModel
from bnnprune.models import build_model
from bnnprune.models.chain import BNN
from bnnprune.models.registry import is_user_arch
from bnnprune.pipeline.config import PruneConfig, StudyConfig, TrainConfig, scratch_error
from bnnprune.pipeline.data import Split, normalize
from bnnprune.pipeline.pruning import (
    binary_blocks,
    budget_allocation,
    channel_scores,
    global_keep_counts,
    layer_name,
    layer_p,
    prune_channels,
    select,
)
from bnnprune.pipeline.train import evaluate, fit
from bnnprune.study.stats import spearman_ci

PARITY_IMAGES = 512  # test images on which every cell checks the engine against torch
ENGINE_SKIPPED = "skipped: the packed engine runs the chain models cnn/nin/alexnet only"


# ---- evaluation: the packed engine (chain models), torch (any other) --------------------------

@torch.no_grad()
def evaluate_packed(model: BNN, split: Split, card: dict, batch_size: int = 1000
                    ) -> dict[str, Any]:
    """Accuracy, mean loss and predictions, like `train.evaluate`, on the packed engine."""
    model.eval()
    engine = PackedModel.from_model(model)
    loss, preds = 0.0, []
    for i in range(0, len(split), batch_size):
        images, labels = split.images[i:i + batch_size], split.labels[i:i + batch_size]
        logits = engine(normalize(images, card["mean"], card["std"]))
        loss += F.cross_entropy(logits, labels, reduction="sum").item()
        preds.append(logits.argmax(1))
    pred = torch.cat(preds)
    return {"acc": (pred == split.labels).float().mean().item(), "loss": loss / len(split),
            "pred": pred}


def evaluate_model(model: nn.Module, split: Split, card: dict) -> dict[str, Any]:
    """A chain model on the packed engine, any other with torch (`train.evaluate`)."""
    if isinstance(model, BNN):
        return evaluate_packed(model, split, card)
    return evaluate(model, split, card)


def head(split: Split, n: int) -> Split:
    return Split(split.images[:n], split.labels[:n])


def engine_mismatches(model: BNN, split: Split, card: dict) -> int:
    """Predictions on which the packed engine and torch disagree (a sample of the split)."""
    sample = head(split, PARITY_IMAGES)
    return int((evaluate_packed(model, sample, card)["pred"]
                != evaluate(model, sample, card)["pred"]).sum())


def engine_parity(model: nn.Module, split: Split, card: dict) -> dict[str, Any]:
    """A cell's engine check: mismatches on a sample of `split`, or (not a chain model) None
    and why."""
    if not isinstance(model, BNN):
        return {"engine_mismatches": None, "parity_images": 0, "engine": ENGINE_SKIPPED}
    return {"engine_mismatches": engine_mismatches(model, split, card),
            "parity_images": min(PARITY_IMAGES, len(split))}


# ---- a model's units: what the study prunes, scores and removes -------------------------------

def allocate(method: Method, model: BNN, counts: dict[str, torch.Tensor],
             scores: dict[int, Scores], budget: float, cfg: PruneConfig,
             layer_drops_pt: dict[str, float] | None) -> dict[int, int]:
    """Channels kept per binary block of a chain for `method` at a BOP `budget` (fraction)."""
    blocks = binary_blocks(model)
    if method.allocation == "global":
        return global_keep_counts(model, scores, budget, cfg.min_channels, cfg.round_to,
                                  cfg.max_pruning_ratio)
    if method.allocation == "flip":
        by_name = layer_p(counts, cfg.tau)
    elif method.allocation == "uniform":
        by_name = {layer_name(i): 1.0 for i in blocks}
    elif method.allocation == "sensitivity":
        if layer_drops_pt is None:
            raise ValueError("the sensitivity allocation needs the layer sensitivities")
        by_name = sensitivity_fractions(layer_drops_pt)
    else:
        raise ValueError(f"allocation {method.allocation!r}; allowed: flip, sensitivity, "
                         f"uniform, global")
    fractions = {i: by_name[layer_name(i)] for i in blocks}
    return budget_allocation(model, fractions, budget, cfg.min_channels, cfg.round_to)


class ChainUnits:
    """A chain model's units: its binary layers (`blocks.<i>.layer`), planned by block index
    with the chain planner and cut by the chain's surgery (`pruning.prune_channels`)."""

    def __init__(self, model: BNN):
        self.model = model
        self.index = {layer_name(i): i for i in binary_blocks(model)}

    def widths(self) -> dict[str, int]:
        return {n: self.model.specs[i].out for n, i in self.index.items()}

    def scores(self, selection: str, counts: dict[str, torch.Tensor], tau: float,
               generator: torch.Generator) -> dict[str, Scores]:
        return {n: channel_scores(selection, self.model.blocks[i].layer.weight, counts.get(n),
                                  tau, generator) for n, i in self.index.items()}

    def p(self, counts: dict[str, torch.Tensor], tau: float) -> dict[str, float]:
        return layer_p(counts, tau)

    def keep(self, kept: dict[str, list[int]]) -> BNN:
        """A copy keeping channels kept[unit] of the units named (the others in full)."""
        return prune_channels(self.model, {self.index[n]: k for n, k in kept.items()})

    def prune(self, method: Method, counts: dict[str, torch.Tensor], budget: float, seed: int,
              cfg: PruneConfig, drops_pt: dict[str, float] | None
              ) -> tuple[BNN, dict[str, int]]:
        generator = torch.Generator().manual_seed(seed)
        named = self.scores(method.selection, counts, cfg.tau, generator)
        scores = {self.index[n]: s for n, s in named.items()}
        keep_n = allocate(method, self.model, counts, scores, budget, cfg, drops_pt)
        return (prune_channels(self.model, select(scores, keep_n)),
                {layer_name(i): n for i, n in keep_n.items()})


class GroupUnits:
    """Any other model's units: its prunable coupled channel groups, pruned by
    `core.prune.prune` and cut by `CouplingGraph.apply` (on a copy)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.inputs = example_input(model)
        self.graph = CouplingGraph(copy.deepcopy(model), self.inputs)

    def widths(self) -> dict[str, int]:
        return self.graph.widths()

    def scores(self, selection: str, counts: dict[str, torch.Tensor], tau: float,
               generator: torch.Generator) -> dict[str, Scores]:
        return group_scores(self.graph, selection, counts, tau, generator)

    def p(self, counts: dict[str, torch.Tensor], tau: float) -> dict[str, float]:
        return group_p(self.graph, counts, tau)

    def keep(self, kept: dict[str, list[int]]) -> nn.Module:
        model = copy.deepcopy(self.model)
        CouplingGraph(model, self.inputs).apply(kept)
        if hasattr(model, "sync_config"):
            model.sync_config()
        return model

    def prune(self, method: Method, counts: dict[str, torch.Tensor], budget: float, seed: int,
              cfg: PruneConfig, drops_pt: dict[str, float] | None
              ) -> tuple[nn.Module, dict[str, int]]:
        pruned, report = prune(self.model, self.inputs, counts, method=method,
                               target_bop_reduction=budget, tau=cfg.tau, round_to=cfg.round_to,
                               min_channels=cfg.min_channels, seed=seed, sensitivity=drops_pt)
        return pruned, report.widths


def units_of(model: nn.Module) -> ChainUnits | GroupUnits:
    return ChainUnits(model) if isinstance(model, BNN) else GroupUnits(model)


def prune_with(method: Method, model: nn.Module, flips: dict[str, Any], budget: float,
               seed: int, cfg: PruneConfig, layer_drops_pt: dict[str, float] | None = None
               ) -> tuple[nn.Module, dict[str, int]]:
    """The baseline pruned by `method` to `budget`: (physically smaller model, channels kept
    per unit)."""
    counts = interval_counts(flips, method.interval)
    return units_of(model).prune(method, counts, budget, seed, cfg, layer_drops_pt)


def check_scratch(model: nn.Module) -> None:
    """`scratch` rebuilds the pruned architecture from its config: a user's model cannot."""
    arch = model.config["arch"]
    if is_user_arch(arch):
        raise scratch_error(arch)


# ---- recovery --------------------------------------------------------------------------------

def recovery_config(finetune: TrainConfig, cfg: StudyConfig, seed: int, n_train: int
                    ) -> tuple[TrainConfig, int]:
    """The finetune group sized to `cfg.recovery_steps` steps: (config, images per epoch)."""
    images = cfg.recovery_steps * cfg.batch_size
    per_epoch = min(n_train, images)
    epochs = math.ceil(images / per_epoch)
    per_epoch = min(per_epoch, math.ceil(cfg.recovery_steps / epochs) * cfg.batch_size)
    return replace(finetune, epochs=epochs, batch_size=cfg.batch_size, lr=cfg.lr, seed=seed,
                   flip_window=1, tail_epochs=0), per_epoch


def recover(model: nn.Module, splits: dict[str, Split], card: dict, finetune: TrainConfig,
            cfg: StudyConfig, seed: int, desc: str) -> list[dict[str, Any]]:
    """`cfg.recovery_steps` steps of training on a seeded subset; returns the epoch history."""
    if cfg.recovery_steps == 0:
        return []
    train = splits["train"]
    rcfg, per_epoch = recovery_config(finetune, cfg, seed, len(train))
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
    subset = Split(train.images[order[:per_epoch]], train.labels[order[:per_epoch]])
    val = head(splits["val"], cfg.sensitivity_images)
    return fit(model, subset, val, card, rcfg, desc=desc).history


def run_cell(name: str, budget: float, seed: int, baseline: nn.Module, flips: dict[str, Any],
             splits: dict[str, Split], card: dict, prune_cfg: PruneConfig, study: StudyConfig,
             train: TrainConfig, finetune: TrainConfig,
             layer_drops_pt: dict[str, float] | None, resume_path: str | None = None
             ) -> dict[str, Any]:
    """One study cell: prune by method `name` to `budget`, measure, recover, measure."""
    method = METHODS[name]
    if method.scratch:
        check_scratch(baseline)
    pruned, channels = prune_with(method, baseline, flips, budget, seed, prune_cfg,
                                  layer_drops_pt)
    before = evaluate_model(pruned, splits["test"], card)
    if method.scratch:
        pruned = build_model(pruned.config, seed=seed)
        fit(pruned, splits["train"], splits["val"], card, replace(train, seed=seed),
            resume_path, desc=f"{name} scratch")
    history = recover(pruned, splits, card, finetune, study, seed, desc=f"{name} recovery")
    after = evaluate_model(pruned, splits["test"], card)
    ops_b, ops_a = count_ops(baseline).total, count_ops(pruned).total
    return {
        "method": name, "budget": budget, "seed": seed, "allocation": method.allocation,
        "selection": method.selection, "interval": method.interval, "scratch": method.scratch,
        "channels": channels,
        "bops_reduction_pct": reduction_pct(ops_b["bops"], ops_a["bops"]),
        "ops_reduction_pct": reduction_pct(ops_b["ops"], ops_a["ops"]),
        "test_acc_before_recovery": before["acc"], "test_loss_before_recovery": before["loss"],
        "test_acc": after["acc"], "test_loss": after["loss"],
        "recovery_steps": study.recovery_steps,
        "final_train_loss": history[-1]["train_loss"] if history else None,
        **engine_parity(pruned, splits["test"], card),
    }


# ---- sensitivity: units and channels ----------------------------------------------------------

def layer_sensitivity(model: nn.Module, val: Split, card: dict, ratio: float, cfg: PruneConfig
                      ) -> dict[str, dict[str, float]]:
    """Per unit (a chain's binary layer, another model's coupled group): the validation drop
    (points, and loss rise) when that unit alone loses `ratio` of its channels by latent
    selection (rounded as every allocation)."""
    units = units_of(model)
    base = evaluate_model(model, val, card)
    latent = units.scores("latent", {}, cfg.tau, torch.Generator().manual_seed(0))
    out = {}
    for name, c in units.widths().items():
        keep = round_keep(c, c * (1 - ratio), cfg.min_channels, cfg.round_to)
        m = evaluate_model(units.keep(select({name: latent[name]}, {name: keep})), val, card)
        out[name] = {"channels": c, "kept": keep, "drop_pt": 100 * (base["acc"] - m["acc"]),
                     "loss_rise": m["loss"] - base["loss"]}
    return out


def channel_sensitivity(model: nn.Module, val: Split, card: dict, samples: int, seed: int = 0
                        ) -> dict[str, dict[int, float]]:
    """Per unit, for a seeded sample of its channels: the validation loss rise when that
    channel alone is removed."""
    units = units_of(model)
    base = evaluate_model(model, val, card)["loss"]
    generator = torch.Generator().manual_seed(seed)
    out: dict[str, dict[int, float]] = {}
    for name, c in units.widths().items():
        sample = sorted(torch.randperm(c, generator=generator)[:samples].tolist())
        out[name] = {
            ch: evaluate_model(units.keep({name: [k for k in range(c) if k != ch]}), val,
                               card)["loss"] - base
            for ch in sample}
    return out


CRITERION_SCORES = {  # criterion -> (selection, flip interval or None)
    "flip_window": ("flip", "window"),
    "flip_tail": ("flip", "tail"),
    "latent": ("latent", None),
}


def hypothesis_tables(model: nn.Module, flips: dict[str, Any],
                      layers: dict[str, dict[str, float]], channels: dict[str, dict[int, float]],
                      cfg: PruneConfig, resamples: int) -> dict[str, Any]:
    """Spearman rho (bootstrap 95% CI) between each criterion's prunability score and the
    measured insensitivity (minus the loss rise): per unit, over all sampled channels, and at
    unit level p_l against minus the unit's drop. rho > 0: the criterion ranks the channels
    whose removal hurts least as the most prunable."""
    units = units_of(model)
    tables: dict[str, Any] = {"channels": {}, "layers": {}}
    generator = torch.Generator().manual_seed(0)
    for criterion, (selection, interval) in CRITERION_SCORES.items():
        if interval == "tail" and not flips.get("tail_observations"):
            continue
        counts = interval_counts(flips, interval) if interval else {}
        rows, pooled_x, pooled_y = {}, [], []
        for name, scores in units.scores(selection, counts, cfg.tau, generator).items():
            sample = channels[name]
            x = [scores[ch][0] + 1e-6 * scores[ch][1] for ch in sample]
            y = [-rise for rise in sample.values()]
            rows[name] = spearman_ci(x, y, resamples)
            pooled_x += x
            pooled_y += y
        rows["all layers"] = spearman_ci(pooled_x, pooled_y, resamples)
        tables["channels"][criterion] = rows
        if interval:
            p = units.p(counts, cfg.tau)
            tables["layers"][criterion] = spearman_ci(
                [p[n] for n in layers], [-r["drop_pt"] for r in layers.values()], resamples)
    return tables


def set_threads(threads: int) -> None:
    if threads:
        torch.set_num_threads(threads)
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))


# ---- files and MLflow ------------------------------------------------------------------------

CELLS = "reports/study/cells"


def cell_path(method: str, budget: float, seed: int) -> str:
    return f"{CELLS}/{method}-{budget:g}-{seed}.json"


def study_key(params: Any, baseline_meta: dict) -> str:
    """What makes two cells members of one study: the baseline and every setting but the
    lists of methods, budgets and seeds (adding a seed or a budget joins the same study)."""
    from bnnprune.pipeline.train import fingerprint

    study = replace(params.study, methods=[], budgets=[], seeds=[])
    return fingerprint(study, params.prune, params.finetune, params.train, baseline_meta)


def parent_run(params: Any, baseline_meta: dict) -> str | None:
    """The id of the study's parent MLflow run (created by the first cell that needs it), or
    None when tracking is off."""
    from mlflow.tracking import MlflowClient

    from bnnprune.pipeline.tracking import enabled, ensure_experiment, git_commit, tracking_uri

    if not enabled():
        return None
    experiment = ensure_experiment()
    client = MlflowClient(tracking_uri())
    key = study_key(params, baseline_meta)
    found = client.search_runs([experiment], f"tags.study_key = '{key}' and "
                               f"tags.stage = 'study'", max_results=1)
    if found:
        return found[0].info.run_id
    run = client.create_run(experiment, run_name="study",
                            tags={"stage": "study", "study_key": key, "git_commit": git_commit()})
    client.set_terminated(run.info.run_id)
    return run.info.run_id
