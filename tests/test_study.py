"""The study's pieces: rounding of kept counts, budget allocations, the tail interval, the
statistics, the packed-engine evaluation, the methods and the findings' honesty."""

import math

import pytest
import torch

from bnnprune.core.flips import FlipsError, interval_counts
from bnnprune.core.ops import count_ops
from bnnprune.core.plan import round_keep
from bnnprune.models import build_model, model_config
from bnnprune.pipeline.config import (
    ConfigError,
    DataConfig,
    PruneConfig,
    StudyConfig,
    Subset,
    TrainConfig,
    parse_params,
)
from bnnprune.pipeline.data import prepare
from bnnprune.pipeline.pruning import (
    PruneError,
    binary_blocks,
    budget_allocation,
    channel_scores,
    check_round_to,
    global_keep_counts,
)
from bnnprune.pipeline.train import evaluate, fit, lr_at
from bnnprune.study.cells import METHODS, evaluate_packed, prune_with, recovery_config, run_cell
from bnnprune.study.report import findings_md, summarize, tables_md
from bnnprune.study.stats import mean_ci, paired_difference, spearman_ci

CNN = model_config("cnn", 1.0, [1, 28, 28], 10)  # binary layers 32/64/64/128/128


def bops(model, keep):
    channels = [keep.get(i, s.out) for i, s in enumerate(model.specs)]
    return count_ops(build_model({**model.config, "channels": channels})).bops


def test_round_keep_rounds_to_multiples_within_floor_and_width():
    assert round_keep(64, 37.0, 8, 8) == 40  # nearest multiple
    assert round_keep(64, 36.0, 8, 8) == 40  # halves up
    assert round_keep(64, 2.0, 8, 8) == 8  # never below min_channels
    assert round_keep(64, 2.0, 9, 8) == 16  # the smallest multiple >= min_channels
    assert round_keep(30, 29.0, 8, 8) == 30  # never above C_out
    assert round_keep(8, 1.0, 8, 16) == 8  # narrower than the floor: keeps all
    assert round_keep(25, 12.6, 1, 1) == 13  # round_to 1: the patent's round()
    with pytest.raises(PruneError, match=r"round_to: 16 cannot be met.*allowed: 1\.\.8"):
        check_round_to({"blocks.1.layer": 8, "blocks.2.layer": 32}, 16)


@pytest.mark.parametrize("budget", [0.3, 0.5, 0.7])
def test_budget_allocation_reaches_the_budget_with_aligned_counts(budget):
    model = build_model(CNN, seed=0)
    blocks = binary_blocks(model)
    fractions = {i: 0.1 * k for k, i in enumerate(blocks, start=1)}
    keep = budget_allocation(model, fractions, budget, 8, 8)
    assert all(n % 8 == 0 and 8 <= n <= model.specs[i].out for i, n in keep.items())
    reached = 1 - bops(model, keep) / bops(model, {})
    assert reached >= budget
    assert reached < budget + 0.03  # blocks given back after rounding
    # layers with larger fractions lose a larger share
    shares = [keep[i] / model.specs[i].out for i in blocks]
    assert shares[0] >= shares[-1]
    with pytest.raises(PruneError, match="BOP budget 0.99 cannot be reached"):
        budget_allocation(model, fractions, 0.99, 8, 8)


def test_global_ranking_removes_whole_blocks_of_round_to():
    model = build_model(CNN, seed=0)
    g = torch.Generator().manual_seed(0)
    scores = {i: channel_scores("random", model.blocks[i].layer.weight, None, 0, g)
              for i in binary_blocks(model)}
    keep = global_keep_counts(model, scores, 0.4, 8, 8)
    assert all(n % 8 == 0 for n in keep.values())
    assert 1 - bops(model, keep) / bops(model, {}) >= 0.4


def tiny_data(tmp_path):
    card = prepare(DataConfig(dataset="synthetic", subset=Subset(train=128, val=64, test=64)),
                   tmp_path / "prepared")
    from bnnprune.pipeline.data import load_prepared

    return load_prepared(tmp_path / "prepared")[0], card


def test_tail_epochs_count_flips_apart_at_the_tail_lr(tmp_path):
    splits, card = tiny_data(tmp_path)
    cfg = TrainConfig(epochs=2, batch_size=32, lr=0.01, flip_window=1, tail_epochs=1,
                      tail_lr=0.003, threads=1)
    assert lr_at(cfg, 2, 0, 4) == 0.003 and lr_at(cfg, 1, 0, 4) != 0.003
    model = build_model(model_config("cnn", 0.25, card["shape"], card["num_classes"]), seed=0)
    result = fit(model, splits["train"], splits["val"], card, cfg)
    assert len(result.history) == 3 and result.history[-1]["lr"] == 0.003
    flips = result.flips.export(model.config, 1, 1)
    assert flips["observations"] == flips["tail_observations"] == 4  # one epoch of 4 steps each
    assert not all(torch.equal(flips["counts"][n], flips["tail_counts"][n])
                   for n in flips["counts"])
    assert interval_counts(flips, "tail") is flips["tail_counts"]
    with pytest.raises(FlipsError, match="train.tail_epochs: 0"):
        interval_counts({**flips, "tail_observations": 0}, "tail")


def test_mean_ci_is_the_t_interval_and_paired_difference_names_no_winner_inside_the_ci():
    ci = mean_ci([1.0, 2.0, 3.0])
    assert ci["mean"] == 2.0 and ci["hi"] - ci["mean"] == pytest.approx(4.302653 / math.sqrt(3))
    assert mean_ci([5.0])["lo"] is None
    clear = paired_difference({0: 3.0, 1: 3.1, 2: 2.9}, {0: 1.0, 1: 1.0, 2: 1.0})
    assert clear["verdict"] == "a" and clear["lo"] > 0
    noisy = paired_difference({0: 3.0, 1: 0.0, 2: 1.5}, {0: 1.0, 1: 1.0, 2: 1.0})
    assert noisy["verdict"] == "none" and noisy["lo"] < 0 < noisy["hi"]
    assert paired_difference({0: 0.0, 1: 0.1}, {0: 1.0, 1: 1.2})["verdict"] == "b"


def test_spearman_bootstrap():
    x = list(range(20))
    r = spearman_ci(x, [v * v for v in x], resamples=300)
    assert r["rho"] == pytest.approx(1.0) and r["lo"] == pytest.approx(1.0)
    r = spearman_ci(x, [(v * 7) % 20 for v in x], resamples=300)
    assert r["lo"] < r["rho"] < r["hi"]


def test_packed_evaluation_matches_torch(tmp_path):
    splits, card = tiny_data(tmp_path)
    model = build_model(model_config("cnn", 0.25, card["shape"], card["num_classes"]),
                        seed=0).eval()
    ours, ref = evaluate_packed(model, splits["test"], card), evaluate(model, splits["test"], card)
    assert torch.equal(ours["pred"], ref["pred"])
    assert ours["loss"] == pytest.approx(ref["loss"], rel=1e-4)


@pytest.mark.parametrize("name", [m for m in METHODS if m != "scratch"])
def test_every_method_prunes_to_the_budget(name):
    model = build_model(CNN, seed=0)
    flips = {"counts": {f"blocks.{i}.layer": torch.randint(
        0, 6, model.blocks[i].layer.weight.shape, generator=torch.Generator().manual_seed(i))
        for i in binary_blocks(model)}, "tail_observations": 1}
    flips["tail_counts"] = {n: c.flip(0) for n, c in flips["counts"].items()}
    drops = {f"blocks.{i}.layer": float(i) for i in binary_blocks(model)}
    pruned, keep = prune_with(METHODS[name], model, flips, 0.5, 0, PruneConfig(tau=2), drops)
    assert [s.out for s in pruned.specs[1:]] == [keep[f"blocks.{i}.layer"]
                                                 for i in binary_blocks(model)]
    assert all(n % 8 == 0 for n in keep.values())
    assert 1 - count_ops(pruned).total["bops"] / count_ops(model).total["bops"] >= 0.5


def test_recovery_is_sized_in_steps():
    ft = TrainConfig(epochs=2, lr=0.001)
    cfg, per_epoch = recovery_config(ft, StudyConfig(recovery_steps=100, batch_size=128), 3,
                                     54000)
    assert (cfg.epochs, per_epoch, cfg.seed, cfg.lr) == (1, 12800, 3, 0.001)
    cfg, per_epoch = recovery_config(ft, StudyConfig(recovery_steps=10, batch_size=32), 0, 100)
    assert cfg.epochs * math.ceil(per_epoch / 32) == 12  # 4 epochs x 3 steps: >= 10 steps


def cells(acc: dict[str, list[float]], before: dict[str, list[float]] | None = None):
    return [{"method": m, "budget": 0.5, "seed": s, "bops_reduction_pct": 50.0,
             "test_acc": a, "test_acc_before_recovery": (before or acc)[m][s], "channels": {}}
            for m, accs in acc.items() for s, a in enumerate(accs)]


def test_findings_claim_a_win_only_when_the_ci_excludes_zero():
    methods = ["flip", "flip_random", "latent"]
    noisy = {"flip": [0.90, 0.88, 0.91], "flip_random": [0.89, 0.895, 0.885],
             "latent": [0.88, 0.89, 0.90]}
    s = summarize(cells(noisy), methods, [0.5], 0.9)
    text = "\n".join(findings_md(s, None, "test"))
    assert not s["verdict"]["wins_over_all_controls"]
    assert "No flip-derived method beat every control" in text and "higher" not in text
    clear = {"flip": [0.90, 0.91, 0.92], "flip_random": [0.88, 0.885, 0.90],
             "latent": [0.87, 0.88, 0.885]}
    s = summarize(cells(clear), methods, [0.5], 0.9)
    assert s["verdict"]["wins_over_all_controls"] == [{"method": "flip", "budget": 0.5}]
    worse = summarize(cells({"flip": clear["latent"], "latent": clear["flip"]}), ["flip", "latent"],
                      [0.5], 0.9)
    text = "\n".join(findings_md(worse, None, "test"))
    # latent - flip = 3, 3, 3.5 pt: mean 3.17, t(2) 4.303 * sd 0.289 / sqrt(3) = 0.72
    assert "**latent higher** by +3.17 pt (95% CI +2.45 to +3.88 for latent - flip)" in text
    # identical differences at every seed (deterministic surgery) give no winner
    same = {"flip": [0.5, 0.5, 0.5], "flip_random": [0.4, 0.4, 0.4], "latent": [0.3] * 3}
    s = summarize(cells(clear, same), methods, [0.5], 0.9)
    before = [d for d in s["differences"] if d["phase"] == "before"]
    assert all(d["deterministic"] and d["verdict"] == "none" for d in before)


def test_scratch_trains_the_flip_widths_anew(tmp_path):
    splits, card = tiny_data(tmp_path)
    model = build_model(model_config("cnn", 0.5, card["shape"], card["num_classes"]), seed=0)
    train = TrainConfig(epochs=1, batch_size=32, threads=1, seed=0)
    flips = {"counts": {f"blocks.{i}.layer": torch.randint(
        0, 6, model.blocks[i].layer.weight.shape, generator=torch.Generator().manual_seed(i))
        for i in binary_blocks(model)}}
    args = (0.5, 0, model, flips, splits, card, PruneConfig(tau=2), StudyConfig(recovery_steps=2,
            batch_size=32), train, TrainConfig(epochs=1, lr=0.001, threads=1), None)
    flip, scratch = run_cell("flip", *args), run_cell("scratch", *args)
    assert scratch["scratch"] and scratch["channels"] == flip["channels"]
    assert scratch["test_acc_before_recovery"] == flip["test_acc_before_recovery"]
    # same widths, same recovery data: only new weights trained for train.epochs differ
    assert scratch["final_train_loss"] != flip["final_train_loss"]


def test_a_control_run_at_some_budgets_only_is_summarized_where_it_ran():
    acc = {"flip": [0.90, 0.91, 0.92], "latent": [0.88, 0.885, 0.90]}
    rows = ([{**c, "budget": 0.3} for c in cells(acc)] + cells(acc)
            + cells({"scratch": [0.85, 0.86, 0.86]}))
    s = summarize(rows, ["flip", "latent", "scratch"], [0.3, 0.5], 0.9)
    assert list(s["methods"]["scratch"]) == ["0.5"] and list(s["methods"]["flip"]) == ["0.3", "0.5"]
    scratch = [d for d in s["differences"] if d["b"] == "scratch" and d["phase"] == "after"]
    assert [(d["budget"], d["verdict"]) for d in scratch] == [(0.5, "a")]
    table = "\n".join(tables_md(s, None))
    assert "| scratch | not run | -50.0%:" in table
    alone = summarize(cells({"flip": acc["flip"], "scratch": [0.85, 0.86, 0.86]}),
                      ["flip", "scratch"], [0.5], 0.9)
    assert "No control (flip_random, uniform_random, latent) ran in this study" in "\n".join(
        findings_md(alone, None, "test"))


def test_scratch_in_methods_and_scratch_budgets_is_a_config_error():
    with pytest.raises(ConfigError, match=r"study.scratch_budgets: \[0.5\] while study.methods"):
        parse_params({"study": {"methods": ["flip", "scratch"], "scratch_budgets": [0.5]}})
    assert parse_params({"study": {"scratch_budgets": [0.5]}}).study.scratch_budgets == [0.5]
