"""Coupled groups and their cost (bnnprune.core.groups) on two tiny models (2x4x4 inputs)
whose groups, members and BOPs are worked out by hand below, and the slicing of binary
layers that are not nn.Conv2d / nn.Linear (BinaryWeightPruner)."""

import copy
import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bnnprune.core.binary import BinaryConv2d, BinaryLinear, binarize
from bnnprune.core.groups import BinaryWeightPruner, CouplingGraph, Group
from bnnprune.core.plan import PruneError

X = torch.zeros(1, 2, 4, 4)


class Chain(nn.Module):
    """stem (float 1x1, 2 -> 4), conv1 (binary 3x3, 4 -> 6, 4x4), conv2 (binary 3x3 stride 2,
    6 -> 5, 2x2), a binary linear classifier (5 -> 3) on the channel means.

    BOPs: conv1 16 px * 6 * 4*9 = 3456, conv2 4 px * 5 * 6*9 = 1080, fc 3 * 5 = 15 (4551).
    Groups: conv1 (6: conv1, bn1, conv2's inputs), conv2 (5: conv2, bn2, fc's inputs) and fc
    (3, the output layer's: not prunable). At widths a (conv1), b (conv2):
    BOPs = 3456 a/6 + 1080 (a/6)(b/5) + 15 b/5 = 576 a + 36 a b + 3 b."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(2, 4, 1, bias=False)
        self.conv1 = BinaryConv2d(4, 6, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(6)
        self.conv2 = BinaryConv2d(6, 5, 3, stride=2, padding=1)
        self.bn2 = nn.BatchNorm2d(5)
        self.fc = BinaryLinear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn2(self.conv2(self.bn1(self.conv1(self.stem(x)))))
        return self.fc(x.mean((2, 3)))


class DWBinary(nn.Conv2d):
    """A binary depthwise 3x3 conv: 9 weights per output."""

    def __init__(self, c: int):
        super().__init__(c, c, 3, padding=1, groups=c, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(binarize(x), binarize(self.weight), None, 1, 1, 1, self.groups)


class Depthwise(nn.Module):
    """conv1 (binary 1x1, 4 -> 6: 16 px * 6 * 4 = 384 BOPs), dw (binary depthwise on the same
    6 channels: 16 * 6 * 9 = 864 BOPs), a float classifier. One group, conv1, written by both
    binary layers: at width a, BOPs = 384 a/6 + 864 a/6 = 208 a (a depthwise conv's weights
    per output do not shrink with its inputs)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(2, 4, 1, bias=False)
        self.conv1 = BinaryConv2d(4, 6, 1)
        self.dw = DWBinary(6)
        self.bn = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.bn(self.dw(self.conv1(self.stem(x)))).mean((2, 3)))


def chain_bops(a: int, b: int) -> int:
    return 576 * a + 36 * a * b + 3 * b


@functools.cache
def chain_graph() -> CouplingGraph:
    """One graph of a Chain in eval mode, for the tests that only read it (tracing is slow)."""
    return CouplingGraph(Chain().eval(), X)


def test_chain_groups_members_and_the_output_layers_group():
    model = Chain()
    model.train()
    graph = CouplingGraph(model, X)
    assert model.training  # the traced forward pass ran in eval mode and left it as it was
    assert graph.groups == {
        "conv1": Group("conv1", 6, {"conv1": list(range(6))}, ["bn1", "conv1", "conv2"], True),
        "conv2": Group("conv2", 5, {"conv2": list(range(5))}, ["bn2", "conv2", "fc"], True),
        "fc": Group("fc", 3, {"fc": [0, 1, 2]}, ["fc"], False)}
    assert graph.widths() == {"conv1": 6, "conv2": 5}
    assert list(graph.prunable) == ["conv1", "conv2"]
    costs = {c.name: (c.bops, c.out_channels, c.in_channels, c.out_from, c.in_from, c.dense)
             for c in graph.costs}
    assert costs == {"conv1": (3456, 6, 4, {"conv1": 6}, {}, True),
                     "conv2": (1080, 5, 6, {"conv2": 5}, {"conv1": 6}, True),
                     "fc": (15, 3, 5, {"fc": 3}, {"conv2": 5}, True)}
    assert graph.ops.bops == 4551


def test_chain_bops_follow_the_group_widths_exactly():
    graph = chain_graph()
    for a, b in [(6, 5), (3, 2), (1, 5), (6, 1), (5, 3)]:
        assert graph.bops({"conv1": a, "conv2": b}) == chain_bops(a, b)
        assert graph.bops({"conv1": a}) == chain_bops(a, 5)  # a group not named keeps its width
    assert graph.bops({"conv2": 2}) == chain_bops(6, 2)
    assert graph.bops({}) == 4551


def test_chain_bops_truncate_to_an_integer():
    # the shares are exact fractions; the total is rounded down once, at the end
    graph = copy.copy(chain_graph())
    graph.costs = [copy.copy(c) for c in graph.costs if c.name == "conv2"]  # 1080 (a/6)(b/5)
    assert graph.bops({"conv1": 1, "conv2": 1}) == 36  # 1080 / 30
    graph.costs[0].bops = 1081
    assert graph.bops({"conv1": 1, "conv2": 1}) == 36  # 36.03 -> 36
    assert graph.bops({"conv1": 5, "conv2": 5}) == 900  # 1081 * 5/6 = 900.8 -> 900


def test_an_ignored_layers_group_is_not_prunable():
    model = Chain().eval()
    graph = CouplingGraph(model, X, ignored_layers=[model.conv2])
    assert not graph.groups["conv2"].prunable
    assert graph.widths() == {"conv1": 6}
    with pytest.raises(PruneError, match=r"^group 'conv2' feeds the model's output layer and is "
                                         r"not pruned; prunable groups: \['conv1'\]$"):
        graph.apply({"conv2": [0, 1]})


def test_depthwise_group_has_both_writers_and_a_depthwise_cost():
    graph = CouplingGraph(Depthwise().eval(), X, binary=[BinaryConv2d, DWBinary])
    group = graph.groups["conv1"]
    assert list(graph.groups) == ["conv1"]  # dw writes conv1's group: not a group of its own
    assert group.writers == {"conv1": list(range(6)), "dw": list(range(6))}
    assert group.members == ["bn", "conv1", "dw", "fc"]
    assert {c.name: c.dense for c in graph.costs} == {"conv1": True, "dw": False}
    for a in (6, 3, 1):
        assert graph.bops({"conv1": a}) == 208 * a


def test_group_tensors_put_every_writers_rows_side_by_side():
    model = Depthwise().eval()
    graph = CouplingGraph(model, X, binary=[BinaryConv2d, DWBinary])
    t = {"conv1": torch.arange(24).reshape(6, 4, 1, 1), "dw": -torch.arange(54).reshape(6, 1, 3, 3)}
    rows = graph.group_tensors("conv1", t)
    assert rows.shape == (6, 4 + 9)
    assert torch.equal(rows, torch.cat([t["conv1"].reshape(6, 4), t["dw"].reshape(6, 9)], 1))
    weights = graph.weights("conv1")
    assert torch.equal(weights[:, :4], model.conv1.weight.detach().reshape(6, 4))
    assert torch.equal(weights[:, 4:], model.dw.weight.detach().reshape(6, 9))
    # a writer's channels in another order than the group's: rows follow the group's order
    graph.groups["conv1"].writers["dw"] = [5, 4, 3, 2, 1, 0]
    assert torch.equal(graph.group_tensors("conv1", t)[:, 4:], t["dw"].reshape(6, 9).flip(0))


def test_apply_removes_the_channels_not_kept():
    model = Chain().eval()
    graph = CouplingGraph(model, X)
    for bad in ([], [1, 1], [2, 1], [-1, 0], [0, 6]):  # refused before anything is removed
        with pytest.raises(PruneError, match=r"^group 'conv1': kept channels .* must be sorted, "
                                             r"unique, non-empty and within 0\.\.5$"):
            graph.apply({"conv1": bad})
    w1, w2 = model.conv1.weight.detach().clone(), model.conv2.weight.detach().clone()
    graph.apply({"conv1": [1, 4], "conv2": [0, 1, 2, 3, 4]})
    assert torch.equal(model.conv1.weight, w1[[1, 4]])
    assert torch.equal(model.conv2.weight, w2[:, [1, 4]])
    assert model.bn1.num_features == 2 and model.fc.weight.shape == (3, 5)


class Gated(nn.Module):
    """A binary layer that is not a Conv2d / Linear: weight (out, in), a per-output scale
    parameter, a frozen per-output parameter, a per-output buffer, scalar and other-length
    parameters and buffers, a submodule with per-output tensors, and the width attributes of
    both kinds."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.arange(12.0).reshape(4, 3))
        self.scale = nn.Parameter(torch.arange(4.0))
        self.frozen = nn.Parameter(torch.arange(4.0) + 10, requires_grad=False)
        self.register_buffer("mask", torch.tensor([1.0, 2.0, 3.0, 4.0]))
        self.temperature = nn.Parameter(torch.tensor(2.0))
        self.pair = nn.Parameter(torch.ones(2))
        self.register_buffer("step", torch.tensor(7))
        self.register_buffer("history", torch.arange(6.0))
        self.child = nn.Module()  # a submodule's tensors are its own business
        self.child.gain = nn.Parameter(torch.ones(4))
        self.child.register_buffer("seen", torch.zeros(4))
        self.out_channels = self.out_features = 4
        self.in_channels = self.in_features = 3


def test_binary_weight_pruner_slices_every_per_output_tensor():
    pruner, layer = BinaryWeightPruner(), Gated()
    assert (pruner.get_out_channels(layer), pruner.get_in_channels(layer)) == (4, 3)
    assert pruner.prune_out_channels(layer, [1, 3]) is layer
    assert layer.weight.tolist() == [[0.0, 1.0, 2.0], [6.0, 7.0, 8.0]]
    assert layer.scale.tolist() == [0.0, 2.0] and layer.scale.requires_grad
    assert layer.frozen.tolist() == [10.0, 12.0] and not layer.frozen.requires_grad
    assert layer.mask.tolist() == [1.0, 3.0] and "mask" in dict(layer.named_buffers())
    assert layer.temperature.item() == 2.0 and layer.pair.shape == (2,)
    assert layer.step.item() == 7 and layer.history.tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    assert layer.child.gain.shape == layer.child.seen.shape == (4,)
    assert not [name for name in vars(layer) if "." in name]  # no stray copies of them
    assert (layer.out_channels, layer.out_features) == (2, 2)
    assert pruner.prune_in_channels(layer, [0]) is layer
    assert layer.weight.tolist() == [[1.0, 2.0], [7.0, 8.0]]
    assert isinstance(layer.weight, nn.Parameter)
    assert (layer.in_channels, layer.in_features) == (2, 2)
    assert (pruner.get_out_channels(layer), pruner.get_in_channels(layer)) == (2, 2)


def test_binary_weight_pruner_on_a_layer_without_width_attributes():
    layer = nn.Module()
    layer.weight = nn.Parameter(torch.ones(3, 2))
    BinaryWeightPruner().prune_out_channels(layer, [0])
    BinaryWeightPruner().prune_in_channels(layer, [1])
    assert layer.weight.shape == (2, 1)
    assert not any(hasattr(layer, a) for a in ("out_channels", "in_channels", "out_features"))
