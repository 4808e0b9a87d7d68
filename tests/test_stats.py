"""The study's statistics (bnnprune.study.stats) on values small enough to check by hand.

The t quantiles below are the textbook table values: t(0.975, 3) = 3.18245, t(0.95, 3) =
2.35336, t(0.975, 1) = 12.7062."""

import math

import pytest

from bnnprune.study.stats import (
    accuracy_difference,
    mean_ci,
    paired_difference,
    spearman,
    spearman_ci,
    verdict,
)

T975_3, T95_3, T975_1 = 3.1824463, 2.3533634, 12.7062047


def test_mean_ci_is_the_t_interval_of_the_mean():
    # 1, 2, 3, 4: mean 2.5, sample variance (2.25 + 0.25 + 0.25 + 2.25) / 3 = 5/3
    ci = mean_ci([1.0, 2.0, 3.0, 4.0])
    sd = math.sqrt(5 / 3)
    half = T975_3 * sd / 2  # sqrt(n) = 2
    assert ci == pytest.approx({"mean": 2.5, "sd": sd, "lo": 2.5 - half, "hi": 2.5 + half,
                                "n": 4})
    assert ci["lo"] == pytest.approx(0.44574, abs=1e-5)
    narrower = mean_ci([1.0, 2.0, 3.0, 4.0], level=0.90)
    assert narrower["hi"] - narrower["mean"] == pytest.approx(T95_3 * sd / 2)


def test_mean_ci_of_two_values_and_of_one():
    ci = mean_ci([3, 5])  # sd sqrt(2), half = 12.7062 * sqrt(2) / sqrt(2)
    assert (ci["lo"], ci["hi"]) == pytest.approx((4 - T975_1, 4 + T975_1))
    assert mean_ci([7.5]) == {"mean": 7.5, "sd": None, "lo": None, "hi": None, "n": 1}
    with pytest.raises(ValueError, match="^mean_ci of no values$"):
        mean_ci([])


def test_verdict_names_a_winner_only_when_the_interval_excludes_zero():
    assert verdict(0.1, 2.0) == "a"
    assert verdict(-2.0, -0.1) == "b"
    assert verdict(-1.0, 1.0) == "none"
    # an interval that touches zero does not exclude it
    assert verdict(0.0, 1.0) == "none"
    assert verdict(-1.0, 0.0) == "none"
    assert verdict(None, None) == "none"


def test_paired_difference_pairs_by_seed_and_ignores_unpaired_seeds():
    a = {0: 0.90, 1: 0.80, 2: 0.70, 9: 5.0}  # seed 9 has no partner in b
    b = {2: 0.60, 1: 0.75, 0: 0.88, 7: -5.0}
    d = paired_difference(a, b)
    diffs = [0.02, 0.05, 0.10]  # seeds 0, 1, 2
    assert d["seeds"] == [0, 1, 2]
    assert d["n"] == 3
    assert d["mean"] == pytest.approx(sum(diffs) / 3)
    expected = mean_ci(diffs)
    assert (d["lo"], d["hi"]) == pytest.approx((expected["lo"], expected["hi"]))
    # mean 0.0567, sd 0.0404, t(0.975, 2) = 4.303: 0.0567 +- 0.1004 contains zero
    assert d["lo"] == pytest.approx(0.0567 - 0.1004, abs=1e-4)
    assert d["verdict"] == "none"


def test_paired_difference_verdicts():
    a = {0: 1.0, 1: 2.0, 2: 3.0}
    assert paired_difference(a, {0: 0.0, 1: 1.1, 2: 1.9})["verdict"] == "a"  # diffs ~1, sd 0.1
    assert paired_difference({0: 0.0, 1: 1.1, 2: 1.9}, a)["verdict"] == "b"
    assert paired_difference(a, {0: 2.0, 1: 2.0, 2: 2.0})["verdict"] == "none"  # -1, 0, 1
    # the level reaches the interval: diffs -1, 0, 1 (sd 1): at 50%, 0 +- 0.8165 / sqrt(3)
    half = paired_difference(a, {0: 2.0, 1: 2.0, 2: 2.0}, level=0.5)
    assert half["hi"] == pytest.approx(0.816497 / math.sqrt(3), abs=1e-5)
    one = paired_difference({3: 1.0}, {3: 0.0, 4: 1.0})
    assert (one["n"], one["lo"], one["verdict"], one["seeds"]) == (1, None, "none", [3])
    with pytest.raises(ValueError, match="^paired_difference: no seed in common$"):
        paired_difference({0: 1.0}, {1: 1.0})


def test_spearman_on_ties_and_constant_sides():
    # ranks of y: 1, 2, 3.5, 5, 3.5; Pearson on ranks: 8 / sqrt(10 * 9.5)
    assert spearman([1, 2, 3, 4, 5], [5, 6, 7, 8, 7]) == pytest.approx(8 / math.sqrt(95))
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))
    assert math.isnan(spearman([1, 2, 3], [4, 4, 4]))
    assert math.isnan(spearman([1], [2]))
    assert spearman([1, 2], [1, 2]) == pytest.approx(1.0)


def test_spearman_ci_brackets_rho_and_narrows_with_the_level():
    x = [0.1, 0.4, 0.2, 0.9, 0.5, 0.3, 0.8, 0.7, 0.6, 1.0]
    y = [1.0, 2.0, 3.5, 4.0, 2.5, 1.5, 5.0, 3.0, 4.5, 6.0]
    ci = spearman_ci(x, y, resamples=100, seed=1)
    assert ci["rho"] == pytest.approx(spearman(x, y))
    assert ci["n"] == 10
    assert -1 <= ci["lo"] < ci["rho"] < ci["hi"] <= 1
    narrow = spearman_ci(x, y, resamples=100, seed=1, level=0.5)
    assert ci["lo"] < narrow["lo"] < narrow["hi"] < ci["hi"]
    assert spearman_ci(x, y, resamples=100, seed=1) == ci  # seeded
    assert spearman_ci(x, y, resamples=100, seed=2) != ci
    # a monotone relation: every resample that is not constant has rho 1
    perfect = spearman_ci([1, 2, 3, 4, 5, 6], [2, 4, 6, 8, 10, 12], resamples=50)
    assert (perfect["rho"], perfect["lo"], perfect["hi"]) == pytest.approx((1.0, 1.0, 1.0))


def test_spearman_ci_gives_no_interval_when_most_resamples_are_constant():
    # x varies only through its last pair and y only through its first: a resample is usable
    # only when it draws both, P = 1 - 2 * (19/20)^20 + (18/20)^20 = 0.40 < 1/2
    x = [0.0] * 19 + [1.0]
    y = [1.0] + [0.0] * 19
    ci = spearman_ci(x, y, resamples=400, seed=2)  # 166 of 400 usable
    assert (ci["lo"], ci["hi"], ci["n"]) == (None, None, 20)
    assert ci["rho"] == pytest.approx(spearman(x, y))
    # only x's odd one out needs drawing: P = 1 - (19/20)^20 = 0.64 > 1/2
    some = spearman_ci(x, [float(i) for i in range(20)], resamples=200, seed=2)  # 136 usable
    assert some["lo"] is not None and some["lo"] <= some["hi"]
    # exactly half the resamples usable is enough: of 4 resamples of 2 pairs, seed 2 draws
    # both pairs (rho 1) in 2
    half = spearman_ci([0.0, 1.0], [0.0, 1.0], resamples=4, seed=2)
    assert (half["lo"], half["hi"]) == pytest.approx((1.0, 1.0))
    assert spearman_ci([0.0, 1.0], [0.0, 1.0], resamples=4, seed=0)["lo"] is None  # 1 of 4
    # every pair can be drawn, the first one too: only x's first value varies here
    first = spearman_ci(x[::-1], [float(i) for i in range(20)], resamples=200, seed=2)
    assert first["lo"] is not None and first["lo"] <= first["hi"]


def test_accuracy_difference_counts_discordant_images_and_brackets_the_difference():
    a = [True] * 60 + [False] * 40  # 60% right
    b = [True] * 50 + [False] * 10 + [True] * 5 + [False] * 35  # 55% right
    r = accuracy_difference(a, b, resamples=4000)
    assert r["diff"] == pytest.approx(0.05) and r["n"] == 100
    assert (r["only_a"], r["only_b"]) == (10, 5)
    assert r["lo"] < 0.05 < r["hi"] and r["hi"] - r["lo"] < 0.2
    assert r["lo"] < 0  # 10 against 5 discordant images: no difference measured
    same = accuracy_difference(a, a)
    assert (same["diff"], same["lo"], same["hi"]) == (0.0, 0.0, 0.0)
    wide = accuracy_difference(a * 20, b * 20)  # 20x the images: the interval excludes zero
    assert 0 < wide["lo"] < 0.05 < wide["hi"]
    narrow = accuracy_difference(a * 20, b * 20, level=0.5)
    assert wide["lo"] < narrow["lo"] < narrow["hi"] < wide["hi"]
    with pytest.raises(ValueError, match=r"shapes \(3,\) and \(2,\)"):
        accuracy_difference([True] * 3, [True] * 2)


def test_accuracy_difference_is_seeded_symmetric_and_takes_any_truthy_encoding():
    a = [True] * 600 + [False] * 400
    b = [True] * 500 + [False] * 100 + [True] * 50 + [False] * 350
    r = accuracy_difference(a, b)
    assert r == accuracy_difference(a, b, seed=0) != accuracy_difference(a, b, seed=1)
    # the bootstrap of a mean is near symmetric: both tails at level / 2
    assert abs((r["hi"] - r["diff"]) - (r["diff"] - r["lo"])) < 0.2 * (r["hi"] - r["lo"])
    floats = accuracy_difference([float(v) for v in a], [float(v) for v in b])
    assert floats == r  # (pred == labels).float() works as well as booleans
    first = accuracy_difference([True] + [False] * 9, [False] * 10, resamples=500)
    assert first["hi"] > 0  # the first image is resampled like any other
    assert accuracy_difference([True], [False])["diff"] == 1.0  # a single image is allowed
    for bad in ([], [[True], [False]]):
        with pytest.raises(ValueError, match="allowed: two equal, non-empty 1-D sequences"):
            accuracy_difference(bad, bad)
