"""The floor plan of DESIGN.md's role table, checked by parsing every import.

``engine`` is the top floor: no other package imports it. Each lower package avoids the
packages the table forbids, and the package graph has no cycle. Imports inside functions and
``TYPE_CHECKING`` blocks count too: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("streams", "transforms", "storage", "trainer", "engine")
FORBIDDEN = {
    "streams": {"transforms", "storage", "trainer", "engine"},
    "transforms": {"storage", "trainer", "engine"},
    "storage": {"streams", "trainer", "engine"},
    "trainer": {"streams", "engine"},
    "engine": set(),
}


def _imported_packages(path: pathlib.Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found.update(n.split(".")[0] for n in names if n.split(".")[0] in PACKAGES)
    return found


def _package_graph() -> dict[str, dict[str, list[str]]]:
    """package -> imported package -> the modules that import it."""
    graph: dict[str, dict[str, list[str]]] = {p: {} for p in PACKAGES}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            for dep in _imported_packages(path) - {pkg}:
                graph[pkg].setdefault(dep, []).append(str(path.relative_to(ROOT)))
    return graph


@pytest.mark.parametrize("pkg", PACKAGES)
def test_package_imports_follow_the_role_table(pkg):
    graph = _package_graph()
    bad = {dep: mods for dep, mods in graph[pkg].items() if dep in FORBIDDEN[pkg]}
    assert not bad, f"{pkg} must not import {sorted(bad)}; offending modules: {bad}"


def test_no_package_imports_engine():
    graph = _package_graph()
    assert [p for p in PACKAGES if "engine" in graph[p]] == []


def test_package_graph_has_no_cycle():
    graph = {p: set(deps) for p, deps in _package_graph().items()}
    state: dict[str, int] = {}

    def visit(p: str, trail: list[str]) -> None:
        state[p] = 1
        for q in sorted(graph[p]):
            if state.get(q) == 1:
                raise AssertionError(f"import cycle: {' -> '.join(trail + [p, q])}")
            if q not in state:
                visit(q, trail + [p])
        state[p] = 2

    for p in PACKAGES:
        if p not in state:
            visit(p, [])


def test_the_checker_sees_a_forbidden_import(tmp_path):
    # The check must be able to fail: a module importing engine is seen as such.
    mod = tmp_path / "m.py"
    mod.write_text("def f():\n    from engine.config import load_config\n    import trainer.loop\n")
    assert _imported_packages(mod) == {"engine", "trainer"}
