"""`bnnprune.prune` and its planning on the hand-counted Chain of test_groups (2x4x4 inputs;
groups conv1: 6 channels, conv2: 5; BOPs 576 a + 36 a b + 3 b at widths a, b: 4551 in full).

Crafted counts (tau 0: a weight that flipped at all is insensitive):
    conv1: channels 0 and 1 flipped everywhere: p = 2/6, keep round(6 * 2/3) = 4
    conv2: channel 4 flipped everywhere, channel 2 in half its 54 weights:
           p = (54 + 27) / 270 = 0.3, keep round(5 * 0.7) = round(3.5) = 4 (halves up)
"""

from types import SimpleNamespace

import pytest
import torch
from test_groups import Chain, X, chain_bops, chain_graph
from torch import nn

from bnnprune.core.flips import FlipCounter
from bnnprune.core.plan import METHODS, Method, PruneError, method_of
from bnnprune.core.prune import (
    FlipImportance,
    PruneReport,
    check_flips,
    flip_counts,
    group_p,
    group_scores,
    plan,
    prune,
)


def crafted(model: Chain) -> dict[str, torch.Tensor]:
    counts = {n: torch.zeros_like(m.weight, dtype=torch.int32)
              for n, m in (("conv1", model.conv1), ("conv2", model.conv2), ("fc", model.fc))}
    counts["conv1"][:2] = 1
    counts["conv2"][4] = 3
    counts["conv2"][2].view(-1)[:27] = 1
    return counts


def test_flip_counts_of_a_counter_a_dict_and_anything_else():
    model = Chain()
    counter = FlipCounter(model)
    assert flip_counts(counter) is counter.counts
    assert flip_counts(counter, "window") is counter.counts
    with pytest.raises(PruneError, match=r"^flips: the FlipCounter has no tail observations"):
        flip_counts(counter, "tail")
    counter.tail_observations = 1
    assert flip_counts(counter, "tail") is counter.tail_counts
    counts = crafted(model)
    assert flip_counts(counts, "tail") is counts  # a dict is the interval's counts
    with pytest.raises(PruneError, match=r"^flips: list is not allowed; allowed: a FlipCounter "
                                         r"or its .counts dict$"):
        flip_counts([counts])


def test_check_flips_wants_every_binary_layer_with_its_shape():
    graph = chain_graph()
    counts = crafted(graph.model)
    check_flips(counts, graph, needed=True)
    partial = {"conv1": counts["conv1"], "other": torch.zeros(1)}
    check_flips(partial, graph, needed=False)  # only the shapes of the layers it names
    with pytest.raises(PruneError, match=r"^flips: counts for layers \['conv1', 'other'\] do not "
                                         r"match the model's binary layers "
                                         r"\['conv1', 'conv2', 'fc'\]$"):
        check_flips(partial, graph, needed=True)
    with pytest.raises(PruneError, match=r"^flips: layer 'conv2' has counts of shape \(5, 6\), "
                                         r"its weight is \(5, 6, 3, 3\)$"):
        check_flips({**counts, "conv2": torch.zeros(5, 6)}, graph, needed=False)
    # group_p and group_scores of these counts, per prunable group
    assert group_p(graph, counts, 0) == pytest.approx({"conv1": 1 / 3, "conv2": 0.3})
    assert group_p(graph, counts, 2) == pytest.approx({"conv1": 0.0, "conv2": 0.2})
    assert group_p(graph, {}, 0) == {}
    scores = group_scores(graph, "flip", counts, 0, torch.Generator())
    assert scores["conv2"] == [(0.0, 0.0)] * 2 + [(0.5, 0.5), (0.0, 0.0), (1.0, 3.0)]
    assert scores["conv1"] == [(1.0, 1.0)] * 2 + [(0.0, 0.0)] * 4
    latent = group_scores(graph, "latent", {}, 0, torch.Generator())
    assert set(latent) == {"conv1", "conv2"} and len(latent["conv2"]) == 5


def test_prune_by_the_flip_rule_on_crafted_counts():
    model = Chain().train()
    counts = crafted(model)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    pruned, report = prune(model, X, counts, tau=0, round_to=1, min_channels=1)
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    assert model.conv1.weight.shape == (6, 4, 3, 3)  # the original is untouched
    assert pruned.training  # the copy is in the original's mode
    assert torch.equal(pruned.conv1.weight, model.conv1.weight[2:])
    assert torch.equal(pruned.conv2.weight, model.conv2.weight[:4, 2:])
    assert report.method == "flip"
    assert (report.bops_before, report.bops_after) == (4551, chain_bops(4, 4))
    assert (report.flops_before, report.flops_after) == (128, 128)  # the stem: 16 * 4 * 2
    assert report.groups == {
        "conv1": {"channels_before": 6, "channels_after": 4, "p": pytest.approx(1 / 3),
                  "writers": ["conv1"], "members": ["bn1", "conv1", "conv2"],
                  "bops_before": 3456, "bops_after": 2304, "kept": [2, 3, 4, 5]},
        "conv2": {"channels_before": 5, "channels_after": 4, "p": pytest.approx(0.3),
                  "writers": ["conv2"], "members": ["bn2", "conv2", "fc"],
                  "bops_before": 1080, "bops_after": 576, "kept": [0, 1, 2, 3]}}
    assert report.widths == {"conv1": 4, "conv2": 4}
    assert report.to_dict() == {"method": "flip", "groups": report.groups, "bops_before": 4551,
                                "bops_after": 2892, "flops_before": 128, "flops_after": 128,
                                "reduction": pytest.approx(1 - 2892 / 4551)}
    # eval mode stays eval mode; a counter's window counts prune like its dict
    counter = FlipCounter(model.eval())
    counter.counts = counts
    again, report2 = prune(model, X, counter, tau=0, round_to=1, min_channels=1)
    assert not again.training and report2.groups == report.groups


def test_the_floor_and_round_to_shape_the_flip_rule():
    model = Chain().eval()
    # min_channels 5: conv1 keeps 5 (the floor), conv2 (5 wide, no wider than the floor) all
    _, report = prune(model, X, crafted(model), tau=0, round_to=1, min_channels=5)
    assert report.widths == {"conv1": 5, "conv2": 5}
    assert report.groups["conv1"]["kept"] == [1, 2, 3, 4, 5]  # ties: the lower index goes
    # round_to 2: conv1 keeps 4 (2 blocks), conv2 4 (round(3.5 / 2) = 2 blocks)
    _, report = prune(model, X, crafted(model), tau=0, round_to=2, min_channels=1)
    assert report.widths == {"conv1": 4, "conv2": 4}


def kept_widths(keep: dict[str, list[int]]) -> dict[str, int]:
    return {g: len(k) for g, k in keep.items()}


def test_budgets_fixed_widths_and_the_methods_that_need_no_counts():
    graph = chain_graph()  # plan() only reads the graph
    counts = crafted(graph.model)
    # uniform to 50%: widths with 576 a + 36 a b + 3 b <= 2275
    keep, p = plan(graph, {}, METHODS["uniform"], 0.5, 0, 1, 1, 0)
    assert chain_bops(*kept_widths(keep).values()) <= 4551 / 2
    assert p == {}  # no counts: no p
    # fixed widths: selection by the method (flip: the most flipped channels go)
    keep, _ = plan(graph, counts, METHODS["flip"], None, 0, 1, 1, 0, widths={"conv1": 3})
    assert keep == {"conv1": [3, 4, 5], "conv2": [0, 1, 2, 3, 4]}
    # random scores, seeded: conv1's 6 are drawn first, then conv2's 5
    keep, _ = plan(graph, {}, METHODS["random"], None, 0, 1, 1, 3, widths={"conv2": 2})
    g = torch.Generator().manual_seed(3)
    torch.rand(6, generator=g)
    assert keep["conv2"] == sorted(torch.rand(5, generator=g).argsort()[:2].tolist())
    assert keep["conv1"] == list(range(6))
    # the flip allocation to a budget, global ranking, sensitivity
    for method, extra in (("flip", {}), ("global", {}),
                          ("latent", {"sensitivity": {"conv1": 0.1, "conv2": 3.0}})):
        keep, _ = plan(graph, counts, METHODS[method], 0.3, 0, 1, 1, 0, **extra)
        assert chain_bops(*kept_widths(keep).values()) <= 0.7 * 4551, method
    # latent: conv2 (a 3 pt drop) is pruned 7x less than conv1 (0.1 pt)
    assert len(keep["conv1"]) < 6 and len(keep["conv2"]) >= 4
    # the flip allocation to a budget: by p (conv1 1/3, conv2 0.3), scaled
    keep, _ = plan(graph, counts, METHODS["flip"], 0.3, 0, 1, 1, 0)
    assert keep == {"conv1": [2, 3, 4, 5], "conv2": [0, 1, 2, 3, 4]}  # 2304 + 720 + 15: 33.2%


def test_prune_and_plan_refuse_what_they_cannot_do():
    model = Chain().eval()
    counts = crafted(model)
    kwargs = {"tau": 0, "round_to": 1, "min_channels": 1}
    for method in ("flip", "random", "uniform_flip"):  # the flip selection or allocation
        with pytest.raises(PruneError, match=rf"^method '{method}' needs flip counts"):
            prune(model, X, None, method=method, **kwargs)
    for bad in (1.0, -0.1, 1.5):
        with pytest.raises(PruneError, match=rf"^target_bop_reduction: {bad}; allowed: a "
                                             rf"fraction in \[0, 1\)$"):
            prune(model, X, counts, target_bop_reduction=bad, **kwargs)
    _, report = prune(model, X, counts, target_bop_reduction=0.0, **kwargs)
    assert report.widths == {"conv1": 6, "conv2": 5}
    graph = chain_graph()

    def refused(match: str, method: str | Method = "flip", target: float | None = None,
                round_to: int = 1, **extra) -> None:
        with pytest.raises(PruneError, match=match):
            plan(graph, counts, method_of(method), target, 0, round_to, 1, 0, **extra)

    refused(r"^widths: unknown groups \['fc'\]; allowed: \['conv1', 'conv2'\]$",
            widths={"fc": 2})
    for n in (0, 7):
        refused(rf"^widths: group 'conv1' cannot keep {n} of 6 channels; allowed: multiples "
                rf"of round_to 1", widths={"conv1": n})
    refused(r"cannot keep 3 of 6 channels; allowed: multiples of round_to 2 or all 6$",
            round_to=2, widths={"conv1": 3})
    keep, _ = plan(graph, counts, METHODS["flip"], None, 0, 2, 1, 0,
                   widths={"conv1": 6, "conv2": 5})
    assert kept_widths(keep) == {"conv1": 6, "conv2": 5}  # all, though not multiples of 2
    refused(r"^method with a global allocation needs target_bop_reduction$", "global")
    refused(r"^allocation 'uniform' needs target_bop_reduction; only the flip allocation has a "
            r"budget of its own", "uniform_flip")
    refused(r"^allocation 'sensitivity' \(method 'latent'\) needs sensitivity=", "latent", 0.3)
    refused(r"^allocation 'magic' is not allowed$", Method("magic", "flip"), 0.3)
    refused(r"^round_to: 8 cannot be met", round_to=8)
    with pytest.raises(PruneError, match=r"^no prunable group: every binary layer's channels "
                                         r"reach the model's output layer$"):
        prune(model, X, counts, ignored_layers=[model.conv1, model.conv2], **kwargs)


def test_ignored_layers_and_a_method_given_as_a_method():
    model = Chain().eval()
    method = Method("flip", "flip")
    _, report = prune(model, X, crafted(model), method=method, ignored_layers=[model.conv2],
                      tau=0, round_to=1, min_channels=1)
    assert report.method == repr(method)
    assert list(report.groups) == ["conv1"] and report.widths == {"conv1": 4}
    assert report.bops_after == chain_bops(4, 5)


def test_plan_returns_the_kept_channels_and_p():
    graph = chain_graph()
    keep, p = plan(graph, crafted(graph.model), METHODS["flip"], None, 0, 1, 1, 0)
    assert keep == {"conv1": [2, 3, 4, 5], "conv2": [0, 1, 2, 3]}
    assert p == pytest.approx({"conv1": 1 / 3, "conv2": 0.3})


def test_a_model_with_sync_config_is_told_its_new_widths():
    class Synced(Chain):
        def sync_config(self) -> None:
            self.synced = (self.conv1.weight.shape[0], self.conv2.weight.shape[0])

    pruned, _ = prune(Synced().eval(), X, None, method="uniform", target_bop_reduction=0.5,
                      round_to=1, min_channels=1)
    assert pruned.synced == (pruned.conv1.weight.shape[0], pruned.conv2.weight.shape[0]) != (6, 5)


def test_report_reduction():
    assert PruneReport("x", bops_before=200, bops_after=50).reduction == 0.75
    assert PruneReport("x").reduction == 0.0


def test_flip_importance_knows_its_layers():
    model = Chain()
    counter = FlipCounter(model)
    imp = FlipImportance(counter)
    assert imp.counts is counter.counts and imp.tau == 2
    assert imp.by_module == {id(model.conv1): "conv1", id(model.conv2): "conv2",
                             id(model.fc): "fc"}
    counts = crafted(model)
    imp = FlipImportance(counts, tau=0.5, model=model)
    assert imp.counts is counts and imp.tau == 0.5
    assert imp.by_module == {id(model.conv1): "conv1", id(model.conv2): "conv2",
                             id(model.fc): "fc"}
    with pytest.raises(PruneError, match=r"^FlipImportance: pass a FlipCounter, or its .counts "
                                         r"with model=$"):
        FlipImportance(counts)


def fake_group(*items):
    """A Torch-Pruning group as FlipImportance reads it: items of (module, handler, root
    channels, channels), and the graph's test for an output-channel handler."""
    return SimpleNamespace(
        items=[SimpleNamespace(root_idxs=root, idxs=idxs,
                               dep=SimpleNamespace(target=SimpleNamespace(module=module),
                                                   handler=handler))
               for module, handler, root, idxs in items],
        _DG=SimpleNamespace(is_out_channel_pruning_fn=lambda handler: handler == "out"))


def test_flip_importance_sums_every_binary_writer_of_a_group_by_hand():
    model = nn.ModuleDict({"a": nn.Linear(2, 3, bias=False), "b": nn.Linear(2, 3, bias=False),
                           "f": nn.Linear(2, 3)})
    counts = {"a": torch.tensor([[2, 0], [1, 1], [0, 0]]),
              "b": torch.tensor([[0, 0], [0, 0], [5, 5]])}
    imp = FlipImportance(counts, tau=1, model=model)
    group = fake_group((model["a"], "out", [0, 1, 2], [0, 1, 2]),
                       (model["f"], "out", [7, 8, 9], [0, 1, 2]),  # float: not counted
                       (model["b"], "in", [0, 1, 2], [0, 1]),      # reads: not counted
                       (model["b"], "out", [2, 1, 0], [2, 1, 0]))  # writes, in another order
    # a channel's score: -(share of its weights with count > tau + 1e-3 * mean / (1 + mean));
    # a: ch0 -(1/2 + 1e-3 * 1/2), ch1 -(0 + 1e-3 * 1/2) (1 is not > tau 1), ch2 0;
    # b adds -(1 + 1e-3 * 5/6) to ch2
    expected = [-(0.5 + 0.5e-3), -0.5e-3, -(1 + 1e-3 * 5 / 6)]
    assert imp(group).tolist() == pytest.approx(expected, rel=1e-6, abs=1e-9)
    assert imp(fake_group((model["f"], "out", [0, 1, 2], [0, 1, 2]))) is None
