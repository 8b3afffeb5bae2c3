"""Modules inside ``streams`` import each other without a cycle.

Every import counts, including those inside functions and ``TYPE_CHECKING`` blocks: a
lazy import that closes a circle still ties the two modules into one unit (that is how
``kafka_client`` and ``offsets`` once depended on each other).
"""

from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[2]
PACKAGE = "streams"


def _imported_modules(path: pathlib.Path, known: set[str]) -> set[str]:
    """The ``streams.*`` modules that ``path`` imports (``from streams import x`` counts as x)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
    return found & known


def _module_graph(package_dir: pathlib.Path, package: str) -> dict[str, set[str]]:
    paths = {f"{package}.{p.stem}": p for p in sorted(package_dir.glob("*.py")) if p.stem != "__init__"}
    known = set(paths)
    return {name: _imported_modules(path, known) - {name} for name, path in paths.items()}


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(node: str, trail: list[str]) -> list[str] | None:
        state[node] = 1
        path = trail + [node]
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                return path[path.index(dep):] + [dep]
            if dep not in state:
                cycle = visit(dep, path)
                if cycle:
                    return cycle
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node, [])
            if cycle:
                return cycle
    return None


def test_streams_modules_have_no_import_cycle():
    cycle = _find_cycle(_module_graph(ROOT / PACKAGE, PACKAGE))
    assert cycle is None, f"import cycle inside streams: {' -> '.join(cycle)}"


def test_the_checker_sees_a_lazy_cycle(tmp_path):
    # The check must be able to fail: a circle closed by an import inside a function.
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "a.py").write_text("from pkg.b import g\n")
    (pkg / "b.py").write_text("def g():\n    from pkg import a\n")
    (pkg / "c.py").write_text("import pkg.a\n")
    graph = _module_graph(pkg, "pkg")
    assert graph == {"pkg.a": {"pkg.b"}, "pkg.b": {"pkg.a"}, "pkg.c": {"pkg.a"}}
    assert _find_cycle(graph) == ["pkg.a", "pkg.b", "pkg.a"]
