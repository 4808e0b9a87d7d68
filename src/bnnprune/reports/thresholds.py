"""The gate's checks: which summary.json value is held against which `gate` threshold (read by
the gate and by the model registry)."""

from __future__ import annotations

from dataclasses import dataclass

CPU_BACKEND = "cpu"  # summary.json speedup key of the packed CPU engine


@dataclass(frozen=True)
class Check:
    name: str
    key: tuple[str, ...]  # path in summary.json
    op: str  # ">=" | "<="
    threshold: str  # field of GateConfig


CHECKS = (
    Check("pruned test accuracy", ("pruned", "test_acc"), ">=", "min_test_acc"),
    Check("accuracy drop (pt)", ("acc_drop_pt",), "<=", "max_acc_drop_pt"),
    Check("BOP reduction (%)", ("reduction", "bops_pct"), ">=", "min_bops_reduction_pct"),
    # the ratio of minimum latencies: medians on a shared machine swing with other jobs (a CI run
    # at load 5 measured a 0.19x median ratio where the minimums gave 1.09x)
    Check("speedup, packed CPU engine (min times)", ("speedup_of_min_ms", CPU_BACKEND), ">=",
          "min_speedup_cpu"),
)
