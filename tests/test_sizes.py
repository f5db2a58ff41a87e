"""Small classes and functions: the classes that kept growing stay under 250 lines (each concern in its
own module), and no function in the package runs over 80 lines. Sizes are counted with ``ast``
(``end_lineno - lineno + 1``: docstring, comments and blank lines included)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import mmretrieve

PKG = Path(mmretrieve.__file__).resolve().parent
MAX_CLASS = 250
MAX_FUNCTION = 80


def _size(node: ast.AST) -> int:
    return node.end_lineno - node.lineno + 1


def _class(path: Path, name: str) -> ast.ClassDef:
    found = [n for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.ClassDef) and n.name == name]
    assert len(found) == 1, f"{path}: expected one class {name}, found {len(found)}"
    return found[0]


@pytest.mark.parametrize(("module", "name"), [("store/writer.py", "IndexWriter"), ("serve/service.py", "Service")])
def test_big_classes_stay_under_250_lines(module, name):
    lines = _size(_class(PKG / module, name))
    assert lines < MAX_CLASS, f"{module}: {name} is {lines} lines (split a concern into its own module)"


def test_no_function_in_the_package_is_over_80_lines():
    long = [f"{f.relative_to(PKG.parent)}:{n.lineno} {n.name} ({_size(n)} lines)"
            for f in sorted(PKG.rglob("*.py")) for n in ast.walk(ast.parse(f.read_text()))
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and _size(n) > MAX_FUNCTION]
    assert not long, long
