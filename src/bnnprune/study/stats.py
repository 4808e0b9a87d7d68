"""Statistics for comparisons over seeds: mean with a t-interval, paired differences, and
Spearman rank correlation with a bootstrap interval. A winner is named only when the CI of the
paired difference excludes zero."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import stats


def mean_ci(values: Sequence[float], level: float = 0.95) -> dict[str, float | int | None]:
    """Mean, sample SD and the two-sided t-interval of the mean (None when n < 2)."""
    x = np.asarray(values, dtype=float)
    n = len(x)
    if n == 0:
        raise ValueError("mean_ci of no values")
    mean = float(x.mean())
    if n < 2:
        return {"mean": mean, "sd": None, "lo": None, "hi": None, "n": n}
    sd = float(x.std(ddof=1))
    half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n)
    return {"mean": mean, "sd": sd, "lo": mean - half, "hi": mean + half, "n": n}


def paired_difference(a: dict[int, float], b: dict[int, float], level: float = 0.95
                      ) -> dict[str, float | int | None | str]:
    """a - b over the seeds both have (paired: same seed, same data order), with its t-interval
    and a verdict: 'a', 'b' (CI excludes zero) or 'none' (no difference measured)."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        raise ValueError("paired_difference: no seed in common")
    ci = mean_ci([a[s] - b[s] for s in seeds], level)
    return {**ci, "seeds": seeds, "verdict": verdict(ci["lo"], ci["hi"])}


def verdict(lo: float | None, hi: float | None) -> str:
    if lo is not None and lo > 0:
        return "a"
    if hi is not None and hi < 0:
        return "b"
    return "none"


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rho (NaN when either side is constant)."""
    if len(x) < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return math.nan
    return float(stats.spearmanr(x, y).statistic)


def spearman_ci(x: Sequence[float], y: Sequence[float], resamples: int = 2000, seed: int = 0,
                level: float = 0.95) -> dict[str, float | int | None]:
    """rho and a percentile bootstrap interval over (x, y) pairs resampled with replacement
    (resamples where a side is constant are dropped; None when too few remain)."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    rho = spearman(x, y)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(x), (resamples, len(x)))  # (resamples, n)
    boot = np.array([spearman(x[i], y[i]) for i in idx])
    boot = boot[~np.isnan(boot)]
    if len(boot) < resamples / 2:
        return {"rho": rho, "lo": None, "hi": None, "n": len(x)}
    lo, hi = np.quantile(boot, [0.5 - level / 2, 0.5 + level / 2])
    return {"rho": rho, "lo": float(lo), "hi": float(hi), "n": len(x)}


def accuracy_difference(a: Sequence[bool], b: Sequence[bool], resamples: int = 2000,
                        seed: int = 0, level: float = 0.95) -> dict[str, float | int]:
    """Accuracy of a minus that of b on the same test images (per-image correctness), with a
    percentile bootstrap interval over the images resampled with replacement. It covers the
    test set's sampling only, not training noise (one model each). Also the discordant
    counts: images only a gets right, only b gets right."""
    x, y = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    if x.shape != y.shape or x.ndim != 1 or len(x) == 0:
        raise ValueError(f"accuracy_difference: per-image results of shapes {x.shape} and "
                         f"{y.shape}; allowed: two equal, non-empty 1-D sequences")
    d = x.astype(float) - y.astype(float)  # (n,) in {-1, 0, +1}
    rng = np.random.default_rng(seed)
    boot = d[rng.integers(0, len(d), (resamples, len(d)))].mean(axis=1)  # (resamples,)
    lo, hi = np.quantile(boot, [0.5 - level / 2, 0.5 + level / 2])
    return {"diff": float(d.mean()), "lo": float(lo), "hi": float(hi), "n": len(d),
            "only_a": int((x & ~y).sum()), "only_b": int((~x & y).sum())}
