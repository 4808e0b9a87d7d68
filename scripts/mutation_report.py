"""The mutation score per module from mutmut's results (mutants/**/*.py.meta), as a Markdown
table, and the surviving mutants with their diffs (`--diffs`). Run from the repo root after
`mutmut run` (`make mutation` does both).

Score = killed / total, where killed counts mutants a test failed on (or timed out on) and
total counts every mutant generated: survivors, mutants no test reaches and mutants not (yet)
checked included."""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

from mutmut.configuration import config
from mutmut.mutation.diff_apply import get_diff_for_mutant
from mutmut.stats import status_by_exit_code

DETECTED = ("killed", "timeout", "caught by type check")


def module_results() -> dict[str, dict[str, str]]:
    """{module path: {mutant name: status}} for every mutated module."""
    results = {}
    for path in config().only_mutate:
        meta = Path("mutants") / f"{path}.meta"
        if not meta.is_file():
            raise SystemExit(f"{meta} missing: run `mutmut run` first")
        codes = json.loads(meta.read_text())["exit_code_by_key"]
        results[path] = {k: status_by_exit_code[v] for k, v in codes.items()}
    return results


def table(results: dict[str, dict[str, str]]) -> str:
    rows = ["| module | killed | survived | no tests | not checked | total | score |",
            "|---|---:|---:|---:|---:|---:|---:|"]
    sums: Counter[str] = Counter()
    for path, statuses in results.items():
        c = Counter(statuses.values())
        row = {"killed": sum(c[s] for s in DETECTED), "survived": c["survived"],
               "no tests": c["no tests"], "not checked": c["not checked"],
               "total": len(statuses)}
        sums.update(row)
        rows.append(line(f"`{path.removeprefix('src/bnnprune/')}`", row))
    rows.append(line("**all**", sums))
    return "\n".join(rows)


def line(name: str, n: dict[str, int] | Counter[str]) -> str:
    return (f"| {name} | {n['killed']} | {n['survived']} | {n['no tests']} | "
            f"{n['not checked']} | {n['total']} | {100 * n['killed'] / n['total']:.1f}% |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--diffs", action="store_true", help="print every survivor's diff")
    args = parser.parse_args()
    results = module_results()
    print(table(results))
    survivors = [(p, k) for p, s in results.items() for k, v in s.items()
                 if v not in DETECTED and v != "not checked"]
    print(f"\n{len(survivors)} mutants checked and not killed" + (":" if survivors else ""))
    for path, name in survivors:
        print(f"\n## {name} ({results[path][name]})")
        if args.diffs:
            print(get_diff_for_mutant(name, path=path))
    return 0


if __name__ == "__main__":
    sys.exit(main())
