"""Layout rules of issue #13, checked on the source with ast.

- No function or method is longer than MAX_LINES lines, counted from its ``def`` line to its last line
  (docstring and comments included, decorators not). A longer one is split into named parts.
- No ``nonlocal``: state shared between steps lives in an object's fields or is passed and returned.

Checked: every module under llm/ and the scripts at the repository root (inspect_data.py).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MAX_LINES = 80
SOURCES = sorted([*(ROOT / "llm").rglob("*.py"), *ROOT.glob("*.py")])


def violations(source: str, where: str) -> list[str]:
    """One line per function over MAX_LINES lines and per ``nonlocal`` in ``source``."""
    found = []
    for node in ast.walk(ast.parse(source, filename=where)):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            lines = node.end_lineno - node.lineno + 1
            if lines > MAX_LINES:
                found.append(f"{where}:{node.lineno} {node.name} is {lines} lines (over {MAX_LINES}: split it into named parts)")
        elif isinstance(node, ast.Nonlocal):
            found.append(f"{where}:{node.lineno} nonlocal {', '.join(node.names)} (keep the state in an object's fields or pass it)")
    return found


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_functions_are_short_and_without_nonlocal(path: Path) -> None:
    assert violations(path.read_text(encoding="utf-8"), str(path.relative_to(ROOT))) == []


def test_the_check_finds_a_long_method_and_a_nonlocal() -> None:
    body = "\n".join(f"        x{i} = {i}" for i in range(MAX_LINES - 1))
    assert violations(f"class C:\n    def fits(self):\n{body}\n", "m.py") == []
    assert violations(f"class C:\n    def over(self):\n{body}\n        x = 0\n", "m.py") == [
        f"m.py:2 over is {MAX_LINES + 1} lines (over {MAX_LINES}: split it into named parts)"
    ]
    closure = "def f():\n    n = 0\n\n    def g():\n        nonlocal n\n        n += 1\n"
    assert violations(closure, "m.py") == ["m.py:5 nonlocal n (keep the state in an object's fields or pass it)"]
