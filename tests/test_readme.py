"""README's "Use it on your own BNN" snippet runs as written."""

from __future__ import annotations

import re
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_the_readme_snippet_trains_prunes_finetunes_and_exports(tmp_path, monkeypatch, capsys):
    section = README.read_text().split("## Use it on your own BNN", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    report, pruned = namespace["report"], namespace["pruned"]
    assert report.reduction >= 0.5
    assert all(w % 8 == 0 for w in report.widths.values())
    assert (tmp_path / "pruned.onnx").stat().st_size > 0
    printed = capsys.readouterr().out.splitlines()
    assert int(printed[-1]) == report.bops_after
    assert sum(p.numel() for p in pruned.parameters()) < sum(
        p.numel() for p in namespace["model"].parameters())
    sys.modules.pop("usermodels.tiny_bireal", None)
