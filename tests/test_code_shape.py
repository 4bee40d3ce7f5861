"""The house rules of docs/architecture.md, checked: no module over 400 lines, no function over 60 lines
(its docstring not counted), so a unit stays readable in one sitting."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "prefalign"
MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 60


def _modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def _function_lengths(path: Path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            doc = (
                body[0]
                if body
                and isinstance(body[0], ast.Expr)
                and isinstance(getattr(body[0], "value", None), ast.Constant)
                and isinstance(body[0].value.value, str)
                else None
            )
            doc_lines = (doc.end_lineno - doc.lineno + 1) if doc else 0
            length = node.end_lineno - node.lineno + 1 - doc_lines
            yield node.name, node.lineno, length


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_module_is_short(path):
    n = len(path.read_text(encoding="utf-8").splitlines())
    assert n <= MAX_FILE_LINES, f"{path.relative_to(PACKAGE)}: {n} lines (> {MAX_FILE_LINES}); split it along a seam"


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_functions_are_short(path):
    long = [f"{name} (line {line}: {n} lines)" for name, line, n in _function_lengths(path) if n > MAX_FUNCTION_LINES]
    assert not long, f"{path.relative_to(PACKAGE)}: functions over {MAX_FUNCTION_LINES} lines: {', '.join(long)}"


def test_the_checks_see_a_long_function(tmp_path):
    """The length count is not vacuous: a 70-line function with a 5-line docstring is 65 lines."""
    src = tmp_path / "m.py"
    src.write_text("def f():\n    '''doc\n\n\n\n    '''\n" + "    x = 1\n" * 64)
    [(name, line, n)] = list(_function_lengths(src))
    assert (name, line, n) == ("f", 1, 65)
