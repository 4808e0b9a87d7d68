"""The study's summary: per method and budget, test accuracy before and after recovery (mean and
95% t-interval over seeds), paired differences between methods (same seed: same recovery data
and order), the hypothesis tables, plain-language findings and the Pareto plot.

Differences are in accuracy points (100 * (a - b)). A comparison names a winner only when the
95% CI of its paired difference excludes zero; when every seed gives the same difference
(deterministic surgery, before recovery) there is no spread to test against and no winner.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from bnnprune.core.files import load_json
from bnnprune.study.stats import mean_ci, paired_difference

PHASES = {"before": "test_acc_before_recovery", "after": "test_acc"}
# (a, b, what the difference isolates); a comparison is made when both methods ran
COMPARISONS = [
    ("flip", "flip_random", "selection: flip vs random channels, same flip allocation"),
    ("flip", "uniform_random", "the whole flip method vs uniform widths, random channels"),
    ("flip", "uniform_flip", "allocation: flip rule vs uniform widths, same flip selection"),
    ("uniform_flip", "uniform_random", "selection: flip vs random channels, uniform widths"),
    ("flip", "latent", "the flip method vs the latent-weight method"),
    ("flip_tail", "flip", "flip counts near convergence (tail) vs the default window"),
    ("flip_tail", "flip_random", "flip method (tail counts) vs random channels"),
    ("flip_tail", "latent", "flip method (tail counts) vs the latent-weight method"),
    ("global_flip", "flip", "global ranking vs the per-layer flip rule"),
    ("flip", "scratch", "fine-tuning the pruned weights vs training the architecture anew"),
]
FLIP_METHODS = ("flip", "flip_tail", "global_flip", "uniform_flip")
CONTROLS = ("flip_random", "uniform_random", "latent")


class StudyError(ValueError):
    """A missing or inconsistent study cell."""


def load_cells(root: str | Path, methods: list[str], budgets: list[float], seeds: list[int]
               ) -> list[dict[str, Any]]:
    from bnnprune.study.cells import cell_path

    cells = []
    for m in methods:
        for b in budgets:
            for s in seeds:
                path = Path(root) / cell_path(m, b, s)
                if not path.is_file():
                    raise StudyError(f"{path}: study cell not found; it is written by the "
                                     f"stage study@{m}-{b:g}-{s} (run `dvc repro study`)")
                cells.append(load_json(path))
    return cells


def _by(cells: list[dict[str, Any]], method: str, budget: float, key: str) -> dict[int, float]:
    return {c["seed"]: c[key] for c in cells if c["method"] == method and c["budget"] == budget}


def summarize(cells: list[dict[str, Any]], methods: list[str], budgets: list[float],
              baseline_test_acc: float) -> dict[str, Any]:
    table: dict[str, Any] = {}
    for m in methods:
        for b in budgets:
            rows = [c for c in cells if c["method"] == m and c["budget"] == b]
            if not rows:  # a method run at some budgets only (study.scratch_budgets)
                continue
            table.setdefault(m, {})[f"{b:g}"] = {
                "bops_reduction_pct": mean_ci([c["bops_reduction_pct"] for c in rows])["mean"],
                **{phase: mean_ci([c[key] for c in rows]) for phase, key in PHASES.items()},
                "channels": rows[0]["channels"] if len({str(c["channels"]) for c in rows}) == 1
                else None}
    diffs = []
    for a, b, what in COMPARISONS:
        if a not in methods or b not in methods:
            continue
        for budget in budgets:
            for phase, key in PHASES.items():
                x, y = _by(cells, a, budget, key), _by(cells, b, budget, key)
                if not x or not y:
                    continue
                d = paired_difference({s: 100 * v for s, v in x.items()},
                                      {s: 100 * v for s, v in y.items()})
                deterministic = d["n"] > 1 and d["sd"] == 0
                diffs.append({"a": a, "b": b, "isolates": what, "budget": budget,
                              "phase": phase, "mean_pt": d["mean"], "lo_pt": d["lo"],
                              "hi_pt": d["hi"], "n": d["n"], "deterministic": deterministic,
                              "verdict": "none" if deterministic else d["verdict"]})
    return {"baseline_test_acc": baseline_test_acc, "methods": table, "differences": diffs,
            "verdict": overall_verdict(diffs, methods, budgets)}


def overall_verdict(diffs: list[dict[str, Any]], methods: list[str], budgets: list[float]
                    ) -> dict[str, Any]:
    """Where a flip-derived method beats every control that ran (after recovery, CI clear)."""
    controls = [c for c in CONTROLS if c in methods]
    wins, losses = [], []
    for m in (m for m in FLIP_METHODS if m in methods):
        for budget in budgets:
            rows = {d["b"]: d for d in diffs if d["a"] == m and d["budget"] == budget
                    and d["phase"] == "after" and d["b"] in controls}
            if controls and all(rows.get(c, {}).get("verdict") == "a" for c in controls):
                wins.append({"method": m, "budget": budget})
            losses += [{"method": m, "budget": budget, "control": c} for c, d in rows.items()
                       if d["verdict"] == "b"]
    return {"controls": controls, "wins_over_all_controls": wins, "losses": losses}


def _ci(ci: dict[str, Any], scale: float = 100.0) -> str:
    if ci["lo"] is None:
        return f"{scale * ci['mean']:.2f}"
    return f"{scale * ci['mean']:.2f} ± {scale * (ci['hi'] - ci['mean']):.2f}"


def _diff_text(d: dict[str, Any]) -> str:
    interval = (f"95% CI {d['lo_pt']:+.2f} to {d['hi_pt']:+.2f}" if d["lo_pt"] is not None
                else "no CI")
    if d["deterministic"]:
        return (f"{d['mean_pt']:+.2f} pt, the same at every seed (deterministic surgery): no "
                f"spread over seeds to test against")
    if d["verdict"] == "a":
        return f"**{d['a']} higher** by {d['mean_pt']:+.2f} pt ({interval})"
    if d["verdict"] == "b":  # b - a: the difference and its CI with the sign turned
        return (f"**{d['b']} higher** by {-d['mean_pt']:+.2f} pt (95% CI {-d['hi_pt']:+.2f} to "
                f"{-d['lo_pt']:+.2f} for {d['b']} - {d['a']})")
    return f"no difference measured ({d['mean_pt']:+.2f} pt, {interval})"


def tables_md(summary: dict[str, Any], hypothesis: dict[str, Any] | None) -> list[str]:
    budgets = sorted({b for rows in summary["methods"].values() for b in rows}, key=float)
    lines = ["Test accuracy in % (mean ± 95% CI half-width over seeds), before → after "
             "recovery; BOP reduction achieved after rounding.", "",
             "| method | " + " | ".join(f"budget -{100 * float(b):g}% BOPs" for b in budgets)
             + " |", "|---|" + "---|" * len(budgets)]
    for m, by_budget in summary["methods"].items():
        cells = [f"-{r['bops_reduction_pct']:.1f}%: {_ci(r['before'])} → {_ci(r['after'])}"
                 if (r := by_budget.get(b)) else "not run" for b in budgets]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines += ["", "Paired differences a - b in accuracy points (same seed), 95% t-interval:", "",
              "| a - b | budget | before recovery | after recovery |", "|---|---|---|---|"]
    seen = {}
    for d in summary["differences"]:
        seen.setdefault((d["a"], d["b"], d["budget"]), {})[d["phase"]] = d
    for (a, b, budget), phases in seen.items():
        lines.append(f"| {a} - {b} | -{100 * budget:g}% | {_diff_text(phases['before'])} | "
                     f"{_diff_text(phases['after'])} |")
    if hypothesis:
        lines += ["", "Spearman rank correlation between each criterion's prunability score and "
                  "the measured insensitivity of a channel (minus the validation loss rise "
                  "when it alone is removed); rho > 0 supports the criterion; [95% bootstrap "
                  "CI]:", ""]
        criteria = list(hypothesis["channels"])
        layers = list(next(iter(hypothesis["channels"].values())))
        lines += ["| layer | " + " | ".join(criteria) + " |",
                  "|---|" + "---|" * len(criteria)]
        for name in layers:
            lines.append(f"| {name} | " + " | ".join(
                _rho(hypothesis["channels"][c][name]) for c in criteria) + " |")
        if hypothesis["layers"]:
            lines += ["", "Layer level: Spearman rho between p_l and minus the layer's "
                      "sensitivity drop: " + "; ".join(
                          f"{c}: {_rho(r)}" for c, r in hypothesis["layers"].items()) + "."]
    return lines


def _rho(r: dict[str, Any]) -> str:
    if r["rho"] != r["rho"]:
        return "n/a (constant)"
    if r["lo"] is None:
        return f"{r['rho']:+.2f}"
    return f"{r['rho']:+.2f} [{r['lo']:+.2f}, {r['hi']:+.2f}]"


def findings_md(summary: dict[str, Any], hypothesis: dict[str, Any] | None,
                setting: str) -> list[str]:
    """Plain-language findings, generated from the numbers; no win without a CI-clear one."""
    v = summary["verdict"]
    lines = [f"Setting: {setting}.", ""]
    if not v["controls"]:
        lines.append("No control (" + ", ".join(CONTROLS) + ") ran in this study: it gives no "
                     "verdict on flip guidance against controls.")
    elif v["wins_over_all_controls"]:
        lines.append("A flip-derived method beat every control (" + ", ".join(v["controls"])
                     + ") after recovery, with a 95% CI of the paired difference excluding "
                     "zero, at: " + "; ".join(f"{w['method']} at -{100 * w['budget']:g}% BOPs"
                                               for w in v["wins_over_all_controls"]) + ".")
    else:
        lines.append("No flip-derived method beat every control (" + ", ".join(v["controls"])
                     + ") after recovery with a CI-clear margin, at any budget measured.")
    if v["losses"]:
        lines.append("A control was better than a flip-derived method (CI-clear) at: "
                     + "; ".join(f"{x['control']} over {x['method']} at "
                                 f"-{100 * x['budget']:g}% BOPs" for x in v["losses"]) + ".")
    for d in summary["differences"]:
        if d["phase"] == "after":
            lines.append(f"- {d['a']} - {d['b']} at -{100 * d['budget']:g}% BOPs, after "
                         f"recovery ({d['isolates']}): {_diff_text(d)}.")
    if hypothesis:
        for c, rows in hypothesis["channels"].items():
            r = rows["all layers"]
            if r["lo"] is None:
                text = "no CI (too few distinct values)"
            elif r["lo"] > 0:
                text = "supports the criterion: channels it ranks prunable hurt less when removed"
            elif r["hi"] < 0:
                text = ("contradicts the criterion: channels it ranks prunable hurt more when "
                        "removed")
            else:
                text = "no correlation measured (the CI includes zero)"
            lines.append(f"- Hypothesis test, {c} score vs channel insensitivity over all "
                         f"sampled channels: rho {_rho(r)}: {text}.")
    return lines


def plot_rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """reports/plots/study.csv: one row per method and budget (dvc plots)."""
    return [{"method": m, "budget": float(b), "bops_pct": r["bops_reduction_pct"],
             "test_acc_before_recovery": r["before"]["mean"], "test_acc": r["after"]["mean"]}
            for m, by_budget in summary["methods"].items() for b, r in by_budget.items()]


def study_from_mlflow(max_results: int = 5000) -> str:
    """The newest study's table, rebuilt from its cell runs in MLflow (`bnnprune study`)."""
    from mlflow.tracking import MlflowClient

    from bnnprune.pipeline.tracking import ensure_experiment, tracking_uri

    experiment = ensure_experiment()
    client = MlflowClient(tracking_uri())
    parents = client.search_runs([experiment], "tags.stage = 'study'",
                                 order_by=["attributes.start_time DESC"], max_results=1)
    if not parents:
        return "no study runs yet: run the study (dvc repro study_summary) with MLflow on"
    parent = parents[0].info.run_id
    runs = client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{parent}' and "
                              f"attributes.status = 'FINISHED'", max_results=max_results)
    cells = [{"method": r.data.tags["study.method"], "budget": float(r.data.tags["study.budget"]),
              "seed": int(r.data.tags["study.seed"]), "channels": {},
              **{k: r.data.metrics[k] for k in ("bops_reduction_pct", *PHASES.values())}}
             for r in runs if "study.method" in r.data.tags]
    if not cells:
        return f"study run {parent}: no finished cells yet"
    methods = sorted({c["method"] for c in cells})
    complete = [c for c in cells if all(  # cells whose budget and seed every method has
        any(o["method"] == m and o["budget"] == c["budget"] and o["seed"] == c["seed"]
            for o in cells) for m in methods)]
    budgets = sorted({c["budget"] for c in complete})
    if not budgets:
        return f"study run {parent}: {len(cells)} cells, no budget and seed every method has"
    summary = summarize(complete, methods, budgets, baseline_test_acc=math.nan)
    return "\n".join([f"study run {parent}: {len(cells)} cells", "",
                      *tables_md(summary, None)])
