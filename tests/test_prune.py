import json
import runpy
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from bnnprune.core.binary import BINARY_LAYERS, binarize
from bnnprune.core.flips import FlipCounter
from bnnprune.core.ops import count_ops
from bnnprune.core.plan import flip_keep
from bnnprune.models import build_model, load_checkpoint, model_config, save_checkpoint
from bnnprune.pipeline.config import DataConfig, PruneConfig, Subset
from bnnprune.pipeline.data import prepare
from bnnprune.pipeline.pruning import (
    PruneError,
    insensitive_fraction,
    plan_pruning,
    prune_channels,
    prune_report,
    run_pruning,
)

from conftest import REPO

GEN = torch.Generator().manual_seed(0)


def small_cnn(seed: int = 0):
    """cnn on 8x8 inputs, channels [2 float, 4, 4, 4, 4, 4]; blocks.1 weight (4, 2, 3, 3)."""
    return build_model({**model_config("cnn", 1.0, [1, 8, 8], 10), "channels": [2, 4, 4, 4, 4, 4]},
                       seed=seed)


def zero_counts(model):
    return {n: torch.zeros_like(m.weight, dtype=torch.int32) for n, m in model.named_modules()
            if isinstance(m, BINARY_LAYERS)}


def hand_counts(model):
    """blocks.1: 18 weights per channel.
    ch0: no flips; ch1: 9 weights flipped 5x (total 45); ch2: 9 weights flipped 4x (total 36);
    ch3: all 18 weights flipped 3x (total 54)."""
    counts = zero_counts(model)
    c = counts["blocks.1.layer"].view(4, 18)
    c[1, :9] = 5
    c[2, 9:] = 4
    c[3, :] = 3
    return counts


def test_p_and_kept_channels_on_hand_made_flip_counts():
    model = small_cnn()
    counts = hand_counts(model)
    # tau 3: ch1, ch2 have 9 insensitive weights each; ch3's count 3 is not > 3
    assert insensitive_fraction(counts["blocks.1.layer"], 3) == 18 / 72
    plan = plan_pruning(model, counts, PruneConfig(round_to=1, tau=3, min_channels=1), "flip", GEN)
    assert plan.p["blocks.1.layer"] == 0.25 and plan.p["blocks.2.layer"] == 0.0
    # keep round(4 * 0.75) = 3; ch1 and ch2 tie on insensitive weights, ch1 flipped more
    assert plan.keep[1] == [0, 2, 3]
    assert all(plan.keep[i] == [0, 1, 2, 3] for i in (2, 3, 4, 5))
    assert 0 not in plan.keep  # the float first layer is never pruned
    # tau 2: ch3 is all insensitive (18), p = 36/72 -> keep 2: drop ch3, then ch1
    plan = plan_pruning(model, counts, PruneConfig(round_to=1, tau=2, min_channels=1), "flip", GEN)
    assert plan.p["blocks.1.layer"] == 0.5 and plan.keep[1] == [0, 2]
    # the floor
    plan = plan_pruning(model, counts, PruneConfig(round_to=1, tau=2, min_channels=3), "flip", GEN)
    assert plan.keep[1] == [0, 1, 2]  # only the most insensitive channel goes
    plan = plan_pruning(model, counts, PruneConfig(round_to=1, tau=2, min_channels=8), "flip", GEN)
    assert plan.keep[1] == [0, 1, 2, 3]  # a layer narrower than the floor keeps everything


def test_keep_count_rounds_halves_up_and_respects_the_floor():
    assert flip_keep(4, 0.375, 1) == 3  # 2.5 -> 3 (Python's round would give 2)
    assert flip_keep(4, 0.125, 1) == 4  # 3.5 -> 4
    assert flip_keep(10, 0.26, 1) == 7
    assert flip_keep(10, 1.0, 2) == 2
    assert flip_keep(3, 0.0, 8) == 3


def test_latent_removes_smallest_mean_magnitude_and_random_is_seeded():
    model = small_cnn()
    with torch.no_grad():
        w = model.blocks[1].layer.weight  # (4, 2, 3, 3)
        for c, scale in enumerate([0.5, 0.1, 0.9, 0.2]):
            w[c] = scale * torch.sign(torch.randn(2, 3, 3))
    counts = hand_counts(model)
    cfg = PruneConfig(round_to=1, tau=2, min_channels=1)  # flip rule: keep 2 in blocks.1
    plan = plan_pruning(model, counts, cfg, "latent", GEN)
    assert plan.keep[1] == [0, 2]
    runs = [plan_pruning(model, counts, cfg, "random", torch.Generator().manual_seed(s)).keep
            for s in (1, 1, 2, 3, 4)]
    assert runs[0] == runs[1]
    assert all(len(k[1]) == 2 for k in runs)  # same per-layer counts as the flip rule
    assert len({tuple(k[1]) for k in runs}) > 1


def masked_forward(model, keep, x):
    """The original network, with each removed channel's contribution to the next layer
    removed: the next layer's input-channel weights are zeroed in a float computation (a zero
    weight, unlike a zero activation, which sign() would turn into +1). Returns the
    classifier's input (before flattening) and the logits."""
    mask = None  # (C,) 1 for kept input channels of the current layer
    for i, block in enumerate(model.blocks):
        layer = block.layer
        if isinstance(layer, nn.Linear) and x.dim() == 4:
            x = x.flatten(1)
        binary = isinstance(layer, BINARY_LAYERS)
        w = binarize(layer.weight) if binary else layer.weight
        xin = binarize(x) if binary else x
        if mask is not None:
            if w.dim() == 4:
                w = w * mask.view(1, -1, 1, 1)
            else:
                w = w * mask.repeat_interleave(w.shape[1] // len(mask)).view(1, -1)  # (C, H*W)
        if w.dim() == 4:
            if binary:
                y = F.conv2d(F.pad(xin, (layer.pad,) * 4, value=1.0), w, None, layer.stride)
            else:
                y = F.conv2d(xin, w, None, layer.stride, layer.padding)
        else:
            y = F.linear(xin, w)
        x = block.bn(block.pool(y))
        mask = torch.zeros(x.shape[1])
        mask[keep.get(i, list(range(x.shape[1])))] = 1.0
    features = x.mean(dim=(2, 3)) if (model.head == "gap" and x.dim() == 4) else x
    w = model.classifier.weight * mask.repeat_interleave(
        model.classifier.weight.shape[1] // len(mask)).view(1, -1)
    return features, F.linear(features.flatten(1), w, model.classifier.bias)


def randomize_bn(model):
    """BN statistics that put thresholds inside the range of the integer pre-activations."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for block in model.blocks:
            bn, fan_in = block.bn, block.layer.weight[0].numel()
            n = bn.num_features
            bn.running_mean.copy_(torch.randn(n, generator=g) * fan_in ** 0.5)
            bn.running_var.copy_(torch.rand(n, generator=g) * fan_in + 0.5)
            bn.weight.copy_(torch.randn(n, generator=g))
            bn.bias.copy_(torch.randn(n, generator=g))


@pytest.mark.parametrize("arch,shape", [("cnn", (1, 28, 28)), ("alexnet", (3, 32, 32)),
                                        ("nin", (3, 16, 16))])
def test_pruned_network_equals_original_with_removed_channels_masked(arch, shape, tmp_path):
    model = build_model(model_config(arch, 0.1, list(shape), 10), seed=0)
    randomize_bn(model)
    model.eval()
    g = torch.Generator().manual_seed(2)
    keep = {}
    for i, spec in enumerate(model.specs):
        if spec.binary:
            n = max(1, spec.out - 1 - i % 3)
            keep[i] = sorted(torch.randperm(spec.out, generator=g)[:n].tolist())
    pruned = prune_channels(model, keep)
    assert [s.out for s in pruned.specs] == [len(keep[i]) if i in keep else s.out
                                            for i, s in enumerate(model.specs)]
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())
    x = torch.randn(6, *shape, generator=g)
    with torch.no_grad():
        ref_features, ref_logits = masked_forward(model, keep, x)
        h = x
        for block in pruned.blocks:
            h = block(h)
        features = h.mean(dim=(2, 3)) if (pruned.head == "gap" and h.dim() == 4) else h
        logits = pruned(x)
        last = keep[len(model.specs) - 1]
        # binary layers sum +-1 products: exact, whatever the summation order
        assert torch.equal(features, ref_features[:, last])
        # the float classifier sums fewer terms in another order: equal up to rounding
        torch.testing.assert_close(logits, ref_logits, rtol=0, atol=1e-5)
        assert not torch.allclose(logits, model(x), atol=1e-3)  # the masking mattered
    # the saved pruned model rebuilds from its checkpoint alone
    path = save_checkpoint(tmp_path / "pruned.pt", pruned)
    loaded, _ = load_checkpoint(path, arch=arch)
    loaded.eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), logits)


def test_surgery_rejects_float_layers_and_bad_indices():
    model = small_cnn()
    with pytest.raises(PruneError, match="layer 0 is not a binary layer"):
        prune_channels(model, {0: [0]})
    with pytest.raises(PruneError, match=r"within 0\.\.3"):
        prune_channels(model, {1: [0, 4]})
    with pytest.raises(PruneError, match="sorted, unique, non-empty"):
        prune_channels(model, {1: []})


def test_global_target_reaches_the_bop_reduction_for_every_criterion():
    model = build_model(model_config("cnn", 0.5, [1, 28, 28], 10), seed=0)
    counts = {n: torch.randint(0, 40, c.shape, generator=torch.Generator().manual_seed(3),
                               dtype=torch.int32) for n, c in zero_counts(model).items()}
    before = count_ops(model).bops
    for criterion in ("flip", "latent", "random"):
        cfg = PruneConfig(round_to=1, tau=20, min_channels=4, target_bop_reduction=0.3)
        pruned, _ = run_pruning(model, counts, cfg, criterion)
        after = count_ops(pruned).bops
        assert 0.3 <= 1 - after / before < 0.33  # reached, and within a few channels of it
        assert min(s.out for s in pruned.specs[1:]) >= 4
    with pytest.raises(PruneError, match=r"target_bop_reduction: 0\.99 cannot be reached with "
                                         r"min_channels 4"):
        run_pruning(model, counts,
                    PruneConfig(round_to=1, min_channels=4, target_bop_reduction=0.99))


def test_iterative_pruning_stops_when_max_p_stops_falling():
    model = small_cnn()
    seen = []

    def retrain(m, round_done):
        seen.append([s.out for s in m.specs])
        counts = zero_counts(m)
        if round_done == 1:  # fewer insensitive weights than before: prune again
            counts["blocks.2.layer"][0] = 9  # weight now (4, 2, 3, 3): 18 of 72 -> p 0.25
        else:  # max p went up: stop
            counts["blocks.2.layer"][:] = 9
        return m, counts

    cfg = PruneConfig(round_to=1, tau=2, min_channels=1, iterations=5)
    pruned, rounds = run_pruning(model, hand_counts(model), cfg, retrain=retrain)
    assert [r["pruned"] for r in rounds] == [True, True, False]
    assert [r["max_p"] for r in rounds] == [0.5, 0.25, 1.0]
    assert seen == [[2, 2, 4, 4, 4, 4], [2, 2, 3, 4, 4, 4]]
    assert rounds[1]["channels_after"] == [2, 2, 3, 4, 4, 4]
    assert [s.out for s in pruned.specs] == [2, 2, 3, 4, 4, 4]
    with pytest.raises(PruneError, match="prune.iterations: 2"):
        run_pruning(model, hand_counts(model), replace(cfg, iterations=2, target_bop_reduction=.2),
                    retrain=retrain)


def test_prune_report():
    model = small_cnn()
    pruned, rounds = run_pruning(model, hand_counts(model),
                                 PruneConfig(round_to=1, tau=2, min_channels=1))
    report = prune_report(model, pruned, rounds[0]["p"])
    layer = report["layers"]["blocks.1.layer"]
    assert (layer["p"], layer["channels_before"], layer["channels_after"]) == (0.5, 4, 2)
    assert layer["bops_before"] == 8 * 8 * 4 * 2 * 9 and layer["bops_after"] == 8 * 8 * 2 * 2 * 9
    assert report["total"]["bops_reduction_pct"] > 0


# ---- the stage scripts: bad input fails clearly and overwrites nothing ---------------------

TINY = {"data": {"dataset": "synthetic", "subset": {"train": 96, "val": 32, "test": 32}},
        "model": {"arch": "cnn", "width": 0.25},
        "train": {"epochs": 1, "batch_size": 32, "threads": 1},
        "finetune": {"epochs": 1, "batch_size": 32, "threads": 1},
        "prune": {"tau": 1, "min_channels": 2}}
SENTINEL = b"existing output"
OUTPUTS = ("models/pruned.pt", "reports/metrics/prune.json", "reports/plots/prune_channels.csv")


@pytest.fixture
def project(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("BNNPRUNE_MLFLOW", "off")
    Path("params.yaml").write_text(yaml.safe_dump(TINY))
    card = prepare(DataConfig(dataset="synthetic", subset=Subset(train=96, val=32, test=32)),
                   "data/prepared")
    model = build_model(model_config("cnn", 0.25, card["shape"], card["num_classes"]), seed=0)
    save_checkpoint("models/baseline.pt", model, metrics={"test_acc": 0.5})
    counter = FlipCounter(model)
    counter.counts = {n: torch.randint(0, 4, c.shape, generator=torch.Generator().manual_seed(0),
                                       dtype=torch.int32) for n, c in counter.counts.items()}
    torch.save(counter.export(model.config, 1), "models/flips.pt")
    return tmp_path


def run_script(name, *args):
    import sys

    argv = sys.argv
    sys.argv = [name, *args]
    try:
        runpy.run_path(str(REPO / "stages" / name), run_name="__main__")
        return 0
    except SystemExit as e:
        return e.code
    finally:
        sys.argv = argv


def set_params(**groups):
    params = yaml.safe_load(Path("params.yaml").read_text())
    for group, values in groups.items():
        params.setdefault(group, {}).update(values)
    Path("params.yaml").write_text(yaml.safe_dump(params))


def test_stages_prune_finetune_write_their_outputs(project):
    assert run_script("prune.py") == 0
    prune = json.loads(Path("reports/metrics/prune.json").read_text())
    model, ckpt = load_checkpoint("models/pruned.pt", arch="cnn")
    assert [s.out for s in model.specs] == ckpt["config"]["channels"]
    assert [prune["layers"][f"blocks.{i}.layer"]["channels_after"] for i in range(1, 6)] == \
        ckpt["config"]["channels"][1:]
    assert prune["total"]["bops_reduction_pct"] > 0  # tau 1 on counts in 0..3 prunes
    assert run_script("finetune.py") == 0
    finetune = json.loads(Path("reports/metrics/finetune.json").read_text())
    assert finetune["acc_drop_pt"] == pytest.approx(100 * (0.5 - finetune["test_acc"]))


@pytest.mark.parametrize("bad,message", [
    ({"prune": {"tau": -1}}, "prune.tau: -1 is out of range; allowed: [0.0, inf]"),
    ({"prune": {"target_bop_reduction": 1.0}},
     "prune.target_bop_reduction: 1.0 is out of range; allowed: [0.0, 1.0)"),
    ({"prune": {"target_bop_reduction": -0.1}},
     "prune.target_bop_reduction: -0.1 is out of range; allowed: [0.0, 1.0)"),
    ({"model": {"arch": "nin"}}, "checkpoint of architecture 'cnn', but model.arch is 'nin'"),
    ("flips", "layer blocks.1.layer has flip counts of shape (4, 8, 3, 3), but its weight is "
              "(8, 8, 3, 3)"),
])
def test_bad_input_fails_clearly_and_overwrites_nothing(project, capsys, bad, message):
    for out in OUTPUTS:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_bytes(SENTINEL)
    if bad == "flips":
        other = build_model({**model_config("cnn", 0.25, [1, 28, 28], 10),
                             "channels": [8, 4, 16, 16, 32, 32]})
        torch.save(FlipCounter(other).export(other.config, 1), "models/flips.pt")
    else:
        set_params(**bad)
    assert run_script("prune.py") == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert all(Path(out).read_bytes() == SENTINEL for out in OUTPUTS)


def test_iterative_prune_stage_retrains_with_flip_logging(project):
    set_params(prune={"iterations": 2, "retrain_epochs": 1, "tau": 0})
    assert run_script("prune.py") == 0
    prune = json.loads(Path("reports/metrics/prune.json").read_text())
    assert prune["retrain_epochs_total"] == 1  # one retrain between the two rounds
    assert set(prune["max_p"]) == {"1", "2"}
    assert not list(Path(".bnnprune/resume").glob("*.pt"))  # resume state cleaned up
