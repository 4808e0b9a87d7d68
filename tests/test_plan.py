"""Pruning planning (bnnprune.core.plan): the flip rule, rounding, selection and the three
allocations, on small hand-made inputs whose answers are worked out in the comments.

Most allocation tests use a two-group model whose cost is linear in the widths:
BOPs = 10 * width(a) + 30 * width(b), both groups 16 wide (640 BOPs in full)."""

import pytest
import torch

from bnnprune.core.plan import (
    METHODS,
    Method,
    PruneError,
    budget_allocation,
    channel_scores,
    check_round_to,
    flip_allocation,
    flip_keep,
    global_keep_counts,
    insensitive_fraction,
    method_of,
    prune_order,
    round_keep,
    select,
    sensitivity_fractions,
)

WIDTHS = {"a": 16, "b": 16}


def linear_bops(widths: dict) -> int:
    return 10 * widths.get("a", 16) + 30 * widths.get("b", 16)


def test_method_of_names_and_instances():
    assert method_of("latent") == Method("sensitivity", "latent", "window", False)
    assert method_of("flip_tail") == Method("flip", "flip", "tail")
    assert method_of("scratch").scratch
    custom = Method("uniform", "latent")
    assert method_of(custom) is custom
    with pytest.raises(PruneError, match=r"^method 'magnitude' is not allowed; allowed: "
                                         r"flip, flip_tail, latent, random, uniform"):
        method_of("magnitude")
    assert set(METHODS) >= {"flip", "global_flip", "uniform_random", "flip_random"}


def test_insensitive_fraction_counts_strictly_above_tau():
    counts = torch.tensor([[0, 1, 2], [3, 3, 2]], dtype=torch.int32)
    assert insensitive_fraction(counts, 2) == pytest.approx(2 / 6)  # 2 is not > 2
    assert insensitive_fraction(counts, 1.5) == pytest.approx(4 / 6)
    # over a list of tensors: exact, pooled over all weights
    assert insensitive_fraction([torch.tensor([3, 0]), torch.tensor([5, 5, 1])], 2) == 3 / 5
    assert insensitive_fraction([torch.tensor([5])], 2) == 1.0
    assert insensitive_fraction([torch.tensor([2])], 2) == 0.0
    assert insensitive_fraction([], 2) == 0.0


@pytest.mark.parametrize("c_out,desired,min_channels,round_to,kept", [
    (32, 12.0, 8, 8, 16),   # 1.5 blocks of 8: halves round up
    (32, 11.9, 8, 8, 8),    # 1.49 blocks: down
    (32, 3.0, 8, 8, 8),     # never below the floor
    (32, 40.0, 8, 8, 32),   # never above the width
    (32, 0.0, 9, 8, 16),    # floor: the smallest multiple of 8 >= 9
    (16, 0.0, 9, 8, 16),    # a group no wider than the floor keeps everything
    (6, 0.0, 8, 8, 6),
    (10, 2.5, 1, 1, 3),
    (10, 2.49, 1, 1, 2),
    (10, 0.2, 1, 1, 1),
    (10, 0.2, 3, 1, 3),
    (24, 13.0, 4, 4, 12),   # 3.25 blocks of 4
    (24, 14.0, 4, 4, 16),   # 3.5 blocks: up
])
def test_round_keep(c_out, desired, min_channels, round_to, kept):
    assert round_keep(c_out, desired, min_channels, round_to) == kept


def test_flip_keep_is_round_c_times_one_minus_p():
    assert flip_keep(10, 0.25, 1) == 8  # 7.5 -> 8
    assert flip_keep(10, 0.35, 1) == 7  # 6.5 -> 7
    assert flip_keep(10, 0.0, 1) == 10
    assert flip_keep(10, 1.0, 2) == 2
    assert flip_keep(64, 0.3, 8, 8) == 48  # 44.8 = 5.6 blocks -> 6
    assert flip_allocation({"a": 10, "b": 64}, {"a": 0.35, "b": 0.3}, 1, 1) == {"a": 7, "b": 45}
    # round(32 * 0.7) = 22.4 goes to the nearest multiple of round_to 8
    assert flip_allocation({"a": 32}, {"a": 0.3}, 1, 8) == {"a": 24}


def test_check_round_to():
    check_round_to({"a": 8, "b": 16}, 8)  # as wide as round_to is fine
    check_round_to({"a": 1}, 1)
    with pytest.raises(PruneError, match=r"^round_to: 0; allowed: an integer >= 1$"):
        check_round_to({"a": 8}, 0)
    with pytest.raises(PruneError, match=r"^round_to: 8 cannot be met: groups \{'b': 4\} have "
                                         r"fewer channels; allowed: 1\.\.4$"):
        check_round_to({"a": 16, "b": 4, "c": 8}, 8)


def test_flip_scores_are_the_insensitive_share_then_the_mean_count():
    weight = torch.zeros(3, 2, 1, 1)
    counts = torch.tensor([[0, 3], [3, 3], [1, 2]]).reshape(3, 2, 1, 1)
    scores = channel_scores("flip", weight, counts, 2, torch.Generator())
    assert scores == [(0.5, 1.5), (1.0, 3.0), (0.0, 1.5)]
    with pytest.raises(PruneError, match="^criterion 'flip' needs flip counts$"):
        channel_scores("flip", weight, None, 2, torch.Generator())


def test_latent_scores_are_minus_the_magnitude_relative_to_the_group_mean():
    # mean |w| per channel 0.1, 0.05, 0.2; the group's mean 0.35 / 3
    weight = torch.tensor([[0.1, -0.1], [0.05, 0.05], [0.2, -0.2]])
    scores = channel_scores("latent", weight, None, 2, torch.Generator())
    assert [s for s, _ in scores] == pytest.approx([-6 / 7, -3 / 7, -12 / 7])
    assert [t for _, t in scores] == [0.0, 0.0, 0.0]
    zero = channel_scores("latent", torch.zeros(2, 3), None, 2, torch.Generator())
    assert zero == [(0.0, 0.0), (0.0, 0.0)]  # no division by zero


def test_random_scores_come_from_the_generator():
    expected = torch.rand(4, generator=torch.Generator().manual_seed(5)).tolist()
    scores = channel_scores("random", torch.zeros(4, 2), None, 2,
                            torch.Generator().manual_seed(5))
    assert scores == list(zip(expected, [0.0] * 4, strict=True))
    with pytest.raises(PruneError, match=r"^criterion: 'l1' is not allowed; allowed: "
                                         r"flip, latent, random$"):
        channel_scores("l1", torch.zeros(4, 2), None, 2, torch.Generator())


def test_prune_order_and_select_break_ties_by_the_lower_index():
    scores = [(0.5, 1.0), (0.5, 2.0), (1.0, 0.0), (0.5, 2.0)]
    assert prune_order(scores) == [2, 1, 3, 0]
    assert prune_order([(0.0, 0.0)] * 3) == [0, 1, 2]
    assert prune_order([(-1.0, 0.0), (-2.0, 5.0)]) == [0, 1]
    picked = select({"g": scores, "h": [(0.0, 0.0), (1.0, 0.0)]}, {"g": 2, "h": 2})
    assert picked == {"g": [0, 3], "h": [0, 1]}
    assert select({"g": scores}, {"g": 1}) == {"g": [0]}
    assert select({"g": scores}, {"g": 3}) == {"g": [0, 1, 3]}


def test_sensitivity_fractions():
    fractions = sensitivity_fractions({"a": 1.5, "b": -3.0, "c": 0.0, "d": 0.2})
    assert fractions == pytest.approx({"a": 1 / 2.0, "b": 1 / 0.5, "c": 1 / 0.5, "d": 1 / 0.7})


def test_budget_allocation_meets_the_budget_exactly_when_it_can():
    # uniform: both groups keep round(16 * (1 - s)); at 8 + 8: 320 BOPs, exactly 50% fewer;
    # giving a channel back to either group breaks the budget (330 or 350)
    kept = budget_allocation(WIDTHS, {"a": 1.0, "b": 1.0}, 0.5, linear_bops, 1, 1)
    assert kept == {"a": 8, "b": 8}
    # a budget of 0 keeps everything
    assert budget_allocation(WIDTHS, {"a": 1.0, "b": 1.0}, 0.0, linear_bops, 1, 1) == WIDTHS


def test_budget_allocation_gives_back_blocks_the_budget_does_not_need():
    # round_to 4, budget 30% (<= 448 BOPs): 12 + 12 costs 480 (25%), so the bisection ends at
    # 8 + 8 (320, wish ~10 each). Blocks go back while the budget holds: a -> 12 (360),
    # then b -> 12 fails (480), a -> 16 holds (400, 37.5%); b -> 12 still fails (520)
    kept = budget_allocation(WIDTHS, {"a": 1.0, "b": 1.0}, 0.3, linear_bops, 4, 4)
    assert kept == {"a": 16, "b": 8}
    assert 1 - linear_bops(kept) / 640 >= 0.3


def test_budget_allocation_follows_the_fractions():
    # b prunes 4x faster than a; 60% fewer is <= 256 BOPs. b must fall to 4 (16 (1 - s) <
    # 4.5: s > 23/32), where a keeps round(16 (1 - s/4)) = round(13.125) = 13: 130 + 120 =
    # 250; giving a channel back to b (280) or to a (260) breaks the budget
    kept = budget_allocation(WIDTHS, {"a": 0.25, "b": 1.0}, 0.6, linear_bops, 1, 1)
    assert kept == {"a": 13, "b": 4}


def test_budget_allocation_that_cannot_be_reached_says_how_far_it_gets():
    # only a prunes; at most down to its floor of 4 channels: 40 + 480 = 520, 18.75% fewer
    with pytest.raises(PruneError, match=r"^BOP budget 0.3 cannot be reached with min_channels "
                                         r"1 and round_to 4 \(at most 0.1875\)"):
        budget_allocation(WIDTHS, {"a": 0.5, "b": 0.0}, 0.3, linear_bops, 1, 4)
    # no group prunes at all
    assert budget_allocation(WIDTHS, {"a": 0.0, "b": 0.0}, 0.0, linear_bops, 1, 1) == WIDTHS
    with pytest.raises(PruneError, match=r"\(at most 0.0000\)"):
        budget_allocation(WIDTHS, {"a": 0.0, "b": 0.0}, 0.1, linear_bops, 1, 1)


SCORES = {"a": [(0.9, 0.0), (0.1, 0.0), (0.5, 0.0), (0.0, 0.0)],
          "b": [(0.8, 0.0), (0.2, 0.0), (0.0, 0.0), (0.0, 0.0)]}


def small_bops(widths: dict) -> int:
    return 10 * widths.get("a", 4) + 30 * widths.get("b", 4)  # 160 in full


def test_global_ranking_removes_the_best_ranked_channels_until_the_target():
    widths = {"a": 4, "b": 4}
    # ranked: a0 (0.9) -> a=3, 130; b0 (0.8) -> b=3, 120 (25%); a2 (0.5) -> a=2, 110 (31%)
    assert global_keep_counts(widths, SCORES, 0.3, small_bops, 1) == {"a": 2, "b": 3}
    # 25% is reached exactly after b0: stop there
    assert global_keep_counts(widths, SCORES, 0.25, small_bops, 1) == {"a": 3, "b": 3}
    assert global_keep_counts(widths, SCORES, 0.0, small_bops, 1) == widths


def test_global_ranking_in_blocks_of_round_to():
    widths = {"a": 4, "b": 4}
    # a block of 2 goes once 2 of a group's channels are ranked: a0, b0 (nothing yet),
    # a2 -> a = 2 (140), b1 -> b = 2 (80, 50%)
    assert global_keep_counts(widths, SCORES, 0.3, small_bops, 1, 2) == {"a": 2, "b": 2}


def test_global_ranking_gives_up_a_block_only_once_round_to_channels_are_ranked():
    widths = {"a": 16, "b": 16}
    count = lambda w: w.get("a", 16) + w.get("b", 16)  # noqa: E731
    # ranked: b0-b4, then a0-a7. Five of b's channels are not a block of 8: b keeps 16; the
    # eighth of a's takes a to 8 (24, 25% fewer)
    scores = {"a": [(0.8, 0.0)] * 8 + [(0.0, 0.0)] * 8,
              "b": [(0.9, 0.0)] * 5 + [(0.0, 0.0)] * 11}
    assert global_keep_counts(widths, scores, 0.25, count, 1, 8) == {"a": 8, "b": 16}
    # the floor is min_channels 3 rounded up to a block: a stops at 8, then b gives 8 (50%)
    first_a = {"a": [(1.0, 0.0)] * 16, "b": [(0.0, 0.0)] * 16}
    assert global_keep_counts(widths, first_a, 0.5, count, 3, 8) == {"a": 8, "b": 8}


def test_global_ranking_ties_go_to_the_earlier_group_and_lower_channel():
    widths = {"a": 4, "b": 4}
    flat = {"a": [(0.0, 0.0)] * 4, "b": [(0.0, 0.0)] * 4}
    # all tied: a0, a1, a2 go first (10 BOPs each): 130, 18.75% fewer
    assert global_keep_counts(widths, flat, 0.15, small_bops, 1) == {"a": 1, "b": 4}
    # a floor of 2: a stops at 2 (a2, a3 change nothing), then b0: 20 + 90 = 110 (31%)
    assert global_keep_counts(widths, flat, 0.2, small_bops, 2) == {"a": 2, "b": 3}
    # the secondary score breaks a tie in the primary one: b0 first, its step (130, 18.75%)
    # is the first candidate; a's steps reach the same 18.75% at a=1 later, and a tie keeps the
    # first found. Were b0 ranked after a's channels, a=1 would come first and win.
    second = {"a": [(0.5, 0.0)] * 4, "b": [(0.5, 1.0)] + [(0.0, 0.0)] * 3}
    assert global_keep_counts(widths, second, 0.18, small_bops, 1) == {"a": 4, "b": 3}


def test_global_ranking_that_cannot_be_reached():
    with pytest.raises(PruneError, match=r"^target_bop_reduction: 0.9 cannot be reached with "
                                         r"min_channels 1, round_to 1 and max_pruning_ratio "
                                         r"1.0 \(at most 0.7500\)"):
        global_keep_counts({"a": 4, "b": 4}, SCORES, 0.9, small_bops, 1)


def test_global_ranking_lands_nearest_the_target_when_a_coarse_step_would_overshoot():
    widths = {"a": 4, "b": 4}
    # ranked: b0, b1 (b: 30 BOPs a channel), then a's. b0's step reaches 18.75% (130) and is
    # only a candidate for a 10% target: b stops, a goes on: a=3 (150, 6.25%), a=2 (140,
    # 12.5%), the nearest. Without it, b's coarse step would end the ranking at 18.75%.
    scores = {"a": [(0.5, 0.0)] * 4, "b": [(0.9, 0.0), (0.8, 0.0), (0.0, 0.0), (0.0, 0.0)]}
    kept = global_keep_counts(widths, scores, 0.1, small_bops, 1)
    assert kept == {"a": 2, "b": 4} and small_bops(kept) == 140
    # a cap of 0.25 (one channel a group): only b0's step reaches 15%, the one candidate
    assert global_keep_counts(widths, scores, 0.15, small_bops, 1, max_ratio=0.25) == \
        {"a": 4, "b": 3}


def test_global_ranking_never_takes_more_than_max_pruning_ratio_of_a_group():
    widths = {"a": 16, "b": 16}
    count = lambda w: w.get("a", 16) + w.get("b", 16)  # noqa: E731
    first_a = {"a": [(1.0, 0.0)] * 16, "b": [(0.0, 0.0)] * 16}
    # uncapped, a gives up 12 of 16 first (20 of 32, 37.5%); a cap of 0.5 stops a at 8, and b
    # gives the rest: 8 + 12 = 20
    assert global_keep_counts(widths, first_a, 0.375, count, 1, 4) == {"a": 4, "b": 16}
    assert global_keep_counts(widths, first_a, 0.375, count, 1, 4, 0.5) == {"a": 8, "b": 12}
    # a cap that is not a whole block rounds to fewer channels removed: 0.6 of 16 -> 8 (2 x 4)
    assert global_keep_counts(widths, first_a, 0.375, count, 1, 4, 0.6) == {"a": 8, "b": 12}
    with pytest.raises(PruneError, match=r"at most 0.5000\); allowed: a lower target"):
        global_keep_counts(widths, first_a, 0.6, count, 1, 4, 0.5)
    for bad in (0, -0.1, 1.5):
        with pytest.raises(PruneError, match=rf"^max_pruning_ratio: {bad}; allowed: a "
                                             r"fraction in \(0, 1\]"):
            global_keep_counts(widths, first_a, 0.3, count, 1, 4, bad)
