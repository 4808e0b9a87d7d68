"""Regression gate: reports/summary.json against the thresholds of the `gate` params group."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bnnprune.core.errors import UserError
from bnnprune.pipeline.config import GateConfig, load_params
from bnnprune.reports.thresholds import CHECKS, CPU_BACKEND, Check  # noqa: F401


class GateError(UserError, ValueError):
    """A summary file that is missing or malformed (not a regression: it cannot be judged)."""


@dataclass(frozen=True)
class Result:
    """One check's verdict. `skipped`: the summary has no value because the engine the check
    measures cannot run this model (summary.json `speedup_skipped`, e.g. the packed engine on a
    birealnet): neither passed nor failed, shown with its reason."""

    check: Check
    value: float | None
    threshold: float
    passed: bool
    note: str = ""
    skipped: bool = False

    @property
    def failed(self) -> bool:
        return not (self.passed or self.skipped)


def _lookup(summary: dict, key: tuple[str, ...], path: Path) -> Any:
    node: Any = summary
    for i, part in enumerate(key):
        if not isinstance(node, dict) or part not in node:
            raise GateError(f"{path}: key {'.'.join(key[:i + 1])!r} missing; regenerate it "
                            f"with the report stage (dvc repro report)")
        node = node[part]
    return node


def evaluate(summary: dict, gate: GateConfig, path: Path = Path("summary.json")) -> list[Result]:
    results = []
    for check in CHECKS:
        value = _lookup(summary, check.key, path)
        threshold = getattr(gate, check.threshold)
        if value is None:
            backend = check.key[-1] if check.key[0].startswith("speedup") else None
            skipped = summary.get("speedup_skipped", {}).get(backend)
            if skipped:  # the engine cannot run this model: no number to judge, not a failure
                results.append(Result(check, None, threshold, False, skipped, skipped=True))
                continue
            reason = summary.get("speedup_unavailable", {}).get(backend)
            results.append(Result(check, None, threshold, False,
                                  f"not measured{': ' + reason if reason else ''}"))
            continue
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise GateError(f"{path}: {'.'.join(check.key)} is {value!r}; expected a number")
        ok = value >= threshold if check.op == ">=" else value <= threshold
        results.append(Result(check, float(value), threshold, ok))
    return results


def table(results: list[Result]) -> str:
    rows = [("check", "value", "threshold", "params key")]
    rows += [(r.check.name, ("skipped" if r.skipped else "null") if r.value is None
              else f"{r.value:.4g}",
              f"{r.check.op} {r.threshold:g}", f"gate.{r.check.threshold}"
              + (f"  ({r.note})" if r.note else "")) for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row[:3], widths, strict=True)) + "  " + row[3]
             for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def run(summary_path: str | Path = "reports/summary.json",
        params_path: str | Path = "params.yaml") -> int:
    """Print what regressed, what passed and what was skipped (an engine that cannot run this
    model: no number to judge); 0 when no check failed, 1 otherwise."""
    summary_path = Path(summary_path)
    gate = load_params(params_path).gate
    if not summary_path.is_file():
        raise GateError(f"{summary_path}: not found; run the pipeline first (dvc repro)")
    try:
        summary = json.loads(summary_path.read_text())
    except json.JSONDecodeError as e:
        raise GateError(f"{summary_path}: not valid JSON ({e})") from e
    if not isinstance(summary, dict):
        raise GateError(f"{summary_path}: expected a JSON object")
    results = evaluate(summary, gate, summary_path)
    failed = [r for r in results if r.failed]
    passed = [r for r in results if r.passed]
    skipped = [r for r in results if r.skipped]
    sections = []
    if failed:
        sections.append(f"REGRESSED ({len(failed)} of {len(results)} checks, thresholds from "
                        f"{params_path}):\n{table(failed)}")
    if passed:
        sections.append(f"PASSED ({len(passed)} of {len(results)}):\n{table(passed)}")
    if skipped:
        sections.append(f"SKIPPED ({len(skipped)} of {len(results)}: no measurement, not a "
                        f"failure):\n{table(skipped)}")
    sections.append(f"gate: {'FAILED' if failed else 'OK'}"
                    f"{f' ({len(skipped)} skipped)' if skipped else ''} ({summary_path})")
    print("\n\n".join(sections))
    if not failed:
        promote_champion(summary, summary_path)
    return 1 if failed else 0


def promote_champion(summary: dict, summary_path: Path) -> None:
    """The gate passed: move the registry alias `champion` to this summary's model version. The
    verdict stands when that is impossible (tracking off, store down, nothing registered): a
    warning says why the alias did not move."""
    from bnnprune.pipeline import tracking
    from bnnprune.tracking.registry import RegistryError, promote

    if not tracking.enabled():
        print("registry: BNNPRUNE_MLFLOW is off; champion alias not moved")
        return
    try:
        print(promote(summary, summary_path))
    except (RegistryError, tracking.TrackingError) as e:
        print(f"warning: champion alias not moved: {e}", file=sys.stderr)
