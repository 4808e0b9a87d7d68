"""The package's shape: no import cycles, and a lower part never imports a higher one."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "bnnprune"
# each part may import only the parts listed (and itself)
ALLOWED = {
    "core": set(),
    "models": {"core"},
    "engines": {"core", "models"},
    "pipeline": {"core", "models", "engines"},
    "tracking": {"core", "models", "engines", "pipeline", "reports"},
    "reports": {"core", "models", "engines", "pipeline", "tracking"},
    "study": {"core", "models", "engines", "pipeline", "tracking", "reports"},
}


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> dict[str, set[str]]:
    """Every project module and the project modules it imports (at the top or in a function)."""
    graph: dict[str, set[str]] = {}
    modules = {module_name(p) for p in SRC.rglob("*.py")}
    for path in SRC.rglob("*.py"):
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            found |= {n for n in names if n in modules and n.startswith("bnnprune.")}
        graph[module_name(path)] = found - {module_name(path)}
    return graph


def test_no_import_cycles():
    graph = imports()
    state: dict[str, int] = {}

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph.get(m, ())):
            if n.startswith(m + "."):
                continue  # a package's __init__ re-exporting its own modules
            if state.get(n) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(n):] + [n]))
            if n not in state:
                visit(n, stack + [n])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])


def test_lower_parts_never_import_higher_ones():
    bad = []
    for m, deps in imports().items():
        part = m.split(".")[1] if m.count(".") else None
        if part not in ALLOWED:
            continue
        for d in deps:
            other = d.split(".")[1] if d.count(".") else None
            if other and other != part and other in ALLOWED and other not in ALLOWED[part]:
                bad.append(f"{m} imports {d}")
    assert not bad, "\n".join(sorted(bad))
