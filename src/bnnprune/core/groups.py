"""Coupled channel groups of any model, from one traced forward pass (Torch-Pruning's
`DependencyGraph`), and the surgery that removes a group's channels everywhere at once.

A group is the set of channels that must go together: a residual stream with every layer that
writes or reads it (convs, BN, PReLU, `(1, C, 1, 1)` parameters, downsample shortcuts), a slice
of a concatenation's consumer, or a depthwise conv tied to its input. A group is prunable when a
binary layer writes it and the model's output layer does not; it is named after the first
binary layer (in module order) that writes it.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from bnnprune.core.binary import Binary, binary_layers
from bnnprune.core.ops import OpCount, count_ops
from bnnprune.core.plan import PruneError

SUPPORTED = ("Conv2d (dense or depthwise), Linear, BatchNorm, PReLU, LayerNorm, GroupNorm, "
             "elementwise ops (add, mul, sign), concatenation, pooling, flatten, and binary "
             "layers with a 2-D or 4-D `weight`")


class BinaryWeightPruner(tp.pruner.function.BasePruningFunc):
    """Slices a binary layer that is not an nn.Conv2d / nn.Linear: `weight` on dim 0 (outputs)
    or dim 1 (inputs), every other parameter or buffer whose dim 0 is the output width, and the
    attributes out_channels / in_channels / out_features / in_features when present."""

    def prune_out_channels(self, layer: nn.Module, idxs: list[int]) -> nn.Module:
        width = layer.weight.shape[0]
        keep = sorted(set(range(width)) - set(idxs))
        index = torch.tensor(keep, dtype=torch.long, device=layer.weight.device)
        for name, p in list(layer.named_parameters(recurse=False)):
            if p.dim() >= 1 and p.shape[0] == width:
                setattr(layer, name, nn.Parameter(p.data.index_select(0, index),
                                                  requires_grad=p.requires_grad))
        for name, b in list(layer.named_buffers(recurse=False)):
            if b is not None and b.dim() >= 1 and b.shape[0] == width:
                setattr(layer, name, b.index_select(0, index))
        for attr in ("out_channels", "out_features"):
            if hasattr(layer, attr):
                setattr(layer, attr, len(keep))
        return layer

    def prune_in_channels(self, layer: nn.Module, idxs: list[int]) -> nn.Module:
        width = layer.weight.shape[1]
        keep = sorted(set(range(width)) - set(idxs))
        index = torch.tensor(keep, dtype=torch.long, device=layer.weight.device)
        layer.weight = nn.Parameter(layer.weight.data.index_select(1, index))
        for attr in ("in_channels", "in_features"):
            if hasattr(layer, attr):
                setattr(layer, attr, len(keep))
        return layer

    def get_out_channels(self, layer: nn.Module) -> int:
        return layer.weight.shape[0]

    def get_in_channels(self, layer: nn.Module) -> int:
        return layer.weight.shape[1]


@dataclass
class Group:
    name: str
    width: int
    writers: dict[str, list[int]]  # binary layer -> its output channel for each group channel
    members: list[str]  # every module or parameter the group's channels pass through
    prunable: bool = True


@dataclass
class LayerCost:
    """How one binary layer's BOPs follow the group widths."""
    name: str
    bops: int
    out_channels: int
    in_channels: int
    out_from: dict[str, int] = field(default_factory=dict)  # group -> output indices from it
    in_from: dict[str, int] = field(default_factory=dict)  # group -> input indices from it
    dense: bool = True  # its weights per output grow with its inputs (not depthwise)


class CouplingGraph:
    """The coupled groups of `model` and its cost as a function of their widths."""

    def __init__(self, model: nn.Module, example_inputs: torch.Tensor | tuple,
                 binary: Binary = None, ignored_layers: list[nn.Module] | None = None):
        self.model = model
        self.binaries = binary_layers(model, binary)
        self.ops: OpCount = count_ops(model, example_inputs, binary)
        modules = dict(model.named_modules())
        names = {m: n for n, m in modules.items()}
        custom = {type(m): BinaryWeightPruner() for m in self.binaries.values()
                  if not isinstance(m, nn.Conv2d | nn.Linear)}
        was_training = model.training
        model.eval()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.dg = tp.DependencyGraph().build_dependency(
                model, example_inputs=example_inputs, customized_pruners=custom, verbose=False)
        model.train(was_training)
        self._check_grouped_convs()
        output_layer = self.ops.layers[-1]["name"]
        ignored = {names[m] for m in ignored_layers or []} | {output_layer}
        self.groups: dict[str, Group] = {}
        self._tp_roots: dict[str, tuple[nn.Module, Any]] = {}
        member_of: dict[tuple[str, bool], tuple[str, list[int]]] = {}
        for name, layer in self.binaries.items():
            if (name, True) in member_of:
                continue
            out_fn = self.dg.get_pruner_of_module(layer).prune_out_channels
            width = self.dg.get_out_channels(layer)
            group = self.dg.get_pruning_group(layer, out_fn, idxs=list(range(width)))
            writers, members, prunable = {}, [], True
            for item in group.items:
                target = item.dep.target.module
                is_out = self.dg.is_out_channel_pruning_fn(item.dep.handler)
                member = names.get(target) or self.dg._param_to_name.get(target)
                if member is None:
                    continue
                members.append(member)
                idxs = [int(i) for i in item.idxs]
                member_of[(member, is_out)] = (name, idxs)
                if is_out and member in self.binaries:
                    root = [int(i) for i in item.root_idxs]
                    order = sorted(range(len(idxs)), key=lambda j: root[j])
                    writers[member] = [idxs[j] for j in order]
                if is_out and member in ignored:
                    prunable = False
            self.groups[name] = Group(name, width, writers, sorted(set(members)), prunable)
            self._tp_roots[name] = (layer, out_fn)
        self.costs = []
        for row in self.ops.layers:
            if not row["binary"]:
                continue
            module = modules[row["name"]]
            cost = LayerCost(row["name"], row["bops"], row["out_channels"],
                             self.dg.get_in_channels(module) or 0,
                             dense=getattr(module, "groups", 1) == 1)
            for is_out, into in ((True, cost.out_from), (False, cost.in_from)):
                if (row["name"], is_out) in member_of:
                    g, idxs = member_of[(row["name"], is_out)]
                    into[g] = len(idxs)
            self.costs.append(cost)

    def _check_grouped_convs(self) -> None:
        for name, m in self.model.named_modules():
            groups = getattr(m, "groups", 1)
            if isinstance(m, nn.Conv2d) and groups > 1 and groups != m.in_channels:
                raise PruneError(f"module {name!r}: Conv2d with groups={groups} (neither dense "
                                 f"nor depthwise) is not supported; supported: {SUPPORTED}")

    @property
    def prunable(self) -> dict[str, Group]:
        return {n: g for n, g in self.groups.items() if g.prunable}

    def widths(self) -> dict[str, int]:
        return {n: g.width for n, g in self.prunable.items()}

    def bops(self, widths: dict[str, int]) -> int:
        """BOPs of the model with groups at `widths` (the others in full), exactly."""
        def left(full: int, taken: dict[str, int]) -> Fraction:
            """The share of `full` channels left when each group g keeps widths[g]."""
            gone = sum(n * (1 - Fraction(widths.get(g, self.groups[g].width),
                                         self.groups[g].width)) for g, n in taken.items())
            return (full - gone) / full

        total = Fraction(0)
        for c in self.costs:
            share = left(c.out_channels, c.out_from)
            if c.dense and c.in_channels:
                share *= left(c.in_channels, c.in_from)
            total += c.bops * share
        return int(total)

    def group_tensors(self, name: str, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """The rows of every binary layer writing group `name`, side by side:
        (width, weights per channel summed over writers), ordered as the group's channels."""
        rows = [tensors[w][idxs].reshape(len(idxs), -1)  # (width, C_in*k*k) per writer
                for w, idxs in self.groups[name].writers.items()]
        return torch.cat(rows, dim=1)

    def weights(self, name: str) -> torch.Tensor:
        return self.group_tensors(name, {n: m.weight.detach()
                                         for n, m in self.binaries.items()})

    def apply(self, keep: dict[str, list[int]]) -> None:
        """Remove every channel of group g not in keep[g] (group channel indices), in place."""
        for name, kept in keep.items():
            group = self.groups[name]
            if not group.prunable:
                raise PruneError(f"group {name!r} feeds the model's output layer and is not "
                                 f"pruned; prunable groups: {list(self.prunable)}")
            if not kept or sorted(set(kept)) != list(kept) or kept[0] < 0 \
                    or kept[-1] >= group.width:
                raise PruneError(f"group {name!r}: kept channels {kept} must be sorted, unique, "
                                 f"non-empty and within 0..{group.width - 1}")
            gone = sorted(set(range(group.width)) - set(kept))
            if not gone:
                continue
            layer, out_fn = self._tp_roots[name]
            root = group.writers[name]
            with torch.no_grad():
                self.dg.get_pruning_group(layer, out_fn, idxs=[root[j] for j in gone]).prune()
