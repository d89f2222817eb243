"""The house rules a reader relies on (STYLE.md): no function in the packages over 80 lines, no
file over 450, so that each can be read in one sitting."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.test_layers import PACKAGES
from tests.test_layers import ROOT as REPO_ROOT

MAX_FUNCTION_LINES = 80
MAX_FILE_LINES = 450


def package_files() -> list[Path]:
    return sorted(p for package in PACKAGES for p in (REPO_ROOT / package).rglob("*.py"))


def test_no_function_is_over_80_lines_and_no_file_over_450() -> None:
    too_long = []
    for path in package_files():
        source = path.read_text()
        name = path.relative_to(REPO_ROOT).as_posix()
        if (lines := source.count("\n")) > MAX_FILE_LINES:
            too_long.append(f"{name}: {lines} lines")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                if length >= MAX_FUNCTION_LINES:
                    too_long.append(f"{name}: {node.name} is {length} lines")
    assert len(package_files()) > 100  # the walk found the packages
    assert too_long == []
