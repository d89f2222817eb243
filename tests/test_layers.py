"""The project's layers run one way: a walk over every import in the packages.

- The floor (``core``: errors, settings, the data readers) imports nothing of the project.
- The roof (``hymirec``: the CLI and the demo's orchestration) is imported by no package.
- No two top-level packages import each other, directly or round a longer cycle.
- The pure cores import nothing outside themselves but the floor's errors: the statistics engine
  (``abtest/stats``, not even those: it has its own error type), the codebook, the models and
  the splitter.

Every import counts, a function-level (lazy) one included: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
import itertools
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = [
    "core",
    "features",
    "model",
    "streaming",
    "abtest",
    "serving",
    "simulator",
    "dashboard",
    "hymirec",
]
FLOOR, ROOF = "core", "hymirec"

# pure core -> the project modules it may import (prefixes)
PURE_CORES: dict[str, tuple[str, ...]] = {
    "abtest/stats": ("abtest.stats",),
    "features/codebook.py": ("core.errors",),
    "abtest/splitter.py": ("core.errors", "abtest.experiments"),
    **{
        f"model/{name}.py": ("core.errors", "model.")
        for name in (
            "base",
            "layers",
            "objectives",
            "matching",
            "moe",
            "sasrec",
            "hstu",
            "hymirec_model",
            "persrec",
            "fuxi_mme",
            "popularity",
        )
    },
}


def project_imports(path: Path) -> list[str]:
    """Absolute module names of the project that ``path`` imports, lazily or not."""
    names: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names += [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
    return [n for n in names if n.split(".")[0] in PACKAGES]


def _files(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def _package_graph() -> dict[str, dict[str, list[str]]]:
    """package -> imported package -> the files (and modules) that make the edge."""
    graph: dict[str, dict[str, list[str]]] = {p: defaultdict(list) for p in PACKAGES}
    for package in PACKAGES:
        for path in _files(package):
            for name in project_imports(path):
                target = name.split(".")[0]
                if target != package:
                    graph[package][target].append(f"{path.relative_to(ROOT)} -> {name}")
    return graph


def test_the_floor_imports_nothing_of_the_project() -> None:
    graph = _package_graph()
    assert dict(graph[FLOOR]) == {}


def test_no_package_imports_the_roof() -> None:
    graph = _package_graph()
    offenders = {p: edges[ROOF] for p, edges in graph.items() if p != ROOF and ROOF in edges}
    assert offenders == {}


def test_no_cycle_between_packages() -> None:
    graph = _package_graph()
    order: list[str] = []
    state: dict[str, str] = {}

    def visit(package: str, path: list[str]) -> None:
        if state.get(package) == "done":
            return
        if state.get(package) == "open":
            cycle = [*path[path.index(package) :], package]
            edges = [graph[a][b][0] for a, b in itertools.pairwise(cycle)]
            pytest.fail(f"import cycle {' -> '.join(cycle)}: {edges}")
        state[package] = "open"
        for target in sorted(graph[package]):
            visit(target, [*path, package])
        state[package] = "done"
        order.append(package)

    for package in PACKAGES:
        visit(package, [])
    assert order.index(FLOOR) < order.index(ROOF)


@pytest.mark.parametrize("core", sorted(PURE_CORES))
def test_pure_cores_import_only_themselves_and_the_floors_errors(core: str) -> None:
    allowed = PURE_CORES[core]
    target = ROOT / core
    paths = sorted(target.rglob("*.py")) if target.is_dir() else [target]
    assert paths, f"{core} is gone: update PURE_CORES"
    stray = [
        f"{path.relative_to(ROOT)} -> {name}"
        for path in paths
        for name in project_imports(path)
        if not any(name == a or name.startswith(a if a.endswith(".") else a + ".") for a in allowed)
    ]
    assert stray == []
