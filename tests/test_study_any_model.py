"""The criteria study on models that are not chain BNNs (birealnet's study stages run in
test_any_model_outputs' `dvc repro`): a user's module through the study's pieces (units are
coupled channel groups, pruned by `core.prune.prune`; evaluation with torch, the packed
engine's check skipped; no scratch for a user's model)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bnnprune.core.binary import binary_layers
from bnnprune.core.ops import count_ops, example_input
from bnnprune.core.plan import Method, round_keep, select
from bnnprune.core.prune import prune
from bnnprune.models import build_model, model_config
from bnnprune.pipeline.config import (
    ConfigError,
    DataConfig,
    PruneConfig,
    StudyConfig,
    Subset,
    TrainConfig,
)
from bnnprune.pipeline.data import load_prepared, prepare
from bnnprune.study.cells import (
    ENGINE_SKIPPED,
    METHODS,
    GroupUnits,
    channel_sensitivity,
    hypothesis_tables,
    layer_sensitivity,
    prune_with,
    run_cell,
)

TESTS = Path(__file__).resolve().parent
STUDY = {"methods": ["flip", "uniform_flip"], "budgets": [0.3], "seeds": [0],
         "recovery_steps": 2, "batch_size": 32, "channel_samples": 3, "sensitivity_images": 50,
         "bootstrap": 200}
GROUPS = ["blocks.0.conv", "blocks.2.conv", "blocks.4.conv"]  # birealnet: one per stage


@pytest.fixture
def user_model(monkeypatch):
    monkeypatch.syspath_prepend(str(TESTS))
    config = model_config("usermodels.tiny_bireal:build", 1.0, [1, 28, 28], 10, {"width": 8},
                          ["usermodels.tiny_bireal:MyBinaryConv"])
    model = build_model(config, seed=0).eval()
    counts = {n: torch.randint(0, 6, m.weight.shape, generator=torch.Generator().manual_seed(k))
              for k, (n, m) in enumerate(binary_layers(model).items())}
    flips = {"counts": counts, "tail_counts": {n: c.flip(0) for n, c in counts.items()},
             "tail_observations": 1}
    return model, flips


@pytest.fixture
def tiny_splits(tmp_path):
    prepare(DataConfig(dataset="synthetic", subset=Subset(train=64, val=32, test=32)),
            tmp_path / "prepared")
    return load_prepared(tmp_path / "prepared")


CFG = PruneConfig(tau=2, min_channels=4, round_to=4)


@pytest.mark.parametrize("name", [m for m in METHODS if m != "scratch"])
def test_every_method_prunes_a_user_model_to_the_budget(user_model, name):
    model, flips = user_model
    drops = {"body.0.conv": 0.0, "body.1.conv": 3.0}  # the groups' sensitivities
    pruned, channels = prune_with(METHODS[name], model, flips, 0.3, 0, CFG, drops)
    assert list(channels) == ["body.0.conv", "body.1.conv"]
    assert [m.weight.shape[0] for m in binary_layers(pruned).values()] == [
        channels["body.0.conv"], channels["body.1.conv"]]
    assert 1 - count_ops(pruned).bops / count_ops(model).bops >= 0.3
    # the cell's pruning is the public API's (the method, the budget, the seed)
    again, report = prune(model, example_input(model),
                          flips["tail_counts" if name == "flip_tail" else "counts"],
                          method=name, target_bop_reduction=0.3, tau=2, round_to=4,
                          min_channels=4, sensitivity=drops)
    assert report.widths == channels
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(),
                                                 pruned.state_dict().values(), strict=True))


def test_sensitivities_and_hypothesis_of_a_user_model_are_per_group(user_model, tiny_splits):
    model, flips = user_model
    splits, card = tiny_splits
    layers = layer_sensitivity(model, splits["val"], card, 0.5, CFG)
    assert {n: (r["channels"], r["kept"]) for n, r in layers.items()} == {
        "body.0.conv": (8, 4), "body.1.conv": (16, 8)}
    # a group's latent cut is `prune`'s with that group's width fixed
    units = GroupUnits(model)
    latent = units.scores("latent", {}, 2, torch.Generator())
    for g, c in units.widths().items():
        keep = round_keep(c, c / 2, 4, 4)
        ours = units.keep(select({g: latent[g]}, {g: keep}))
        ref, _ = prune(model, example_input(model), None, method=Method("flip", "latent"),
                       widths={g: keep}, round_to=4, min_channels=4)
        assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(),
                                                     ref.state_dict().values(), strict=True))
    channels = channel_sensitivity(model, splits["val"], card, 2)
    assert {n: len(s) for n, s in channels.items()} == {"body.0.conv": 2, "body.1.conv": 2}
    tables = hypothesis_tables(model, flips, layers, channels, CFG, 100)
    assert set(tables["channels"]) == {"flip_window", "flip_tail", "latent"}
    assert list(tables["channels"]["latent"]) == ["body.0.conv", "body.1.conv", "all layers"]
    assert set(tables["layers"]) == {"flip_window", "flip_tail"}


def test_a_user_model_cell_runs_on_torch_and_has_no_scratch(user_model, tiny_splits):
    model, flips = user_model
    splits, card = tiny_splits
    args = (0.3, 0, model, flips, splits, card, CFG, StudyConfig(recovery_steps=1,
            batch_size=32), TrainConfig(epochs=1, batch_size=32, threads=1),
            TrainConfig(epochs=1, lr=0.001, threads=1), None)
    cell = run_cell("uniform_flip", *args)
    assert cell["engine_mismatches"] is None and cell["engine"] == ENGINE_SKIPPED
    assert cell["bops_reduction_pct"] >= 30 and cell["final_train_loss"] is not None
    with pytest.raises(ConfigError, match=r"'scratch' on model.arch "
                                          r"'usermodels.tiny_bireal:build'.*allowed: scratch on "
                                          r"the built-in archs \(cnn, nin, alexnet, birealnet\)"):
        run_cell("scratch", *args)
