"""The packages of src/tiproxy import one another in layers, never in a circle (issue 9's "no
import cycle between packages"): a circle would let a change anywhere in it reach everywhere in
it, and would make the planes impossible to tell apart. Imports made for the type checker only
count too: they say what a package's code refers to."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import tiproxy

ROOT = Path(tiproxy.__file__).parent


def unit_of(path: Path) -> str:
    """The package a module belongs to, or a top-level module's own name."""
    rel = path.relative_to(ROOT)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def imported_units(tree: ast.AST, units: set[str]) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            parts = node.module.split(".")
            if parts[0] != "tiproxy":
                continue
            names = [parts[1]] if len(parts) > 1 else [alias.name for alias in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name.split(".")[1] for a in node.names
                     if a.name.startswith("tiproxy.") and a.name.count(".") >= 1]
        else:
            continue
        found.update(name for name in names if name in units)
    return found


def dependencies() -> dict[str, set[str]]:
    files = [p for p in ROOT.rglob("*.py") if "egg-info" not in p.parts]
    units = {unit_of(p) for p in files}
    deps: dict[str, set[str]] = defaultdict(set)
    for path in files:
        me = unit_of(path)
        deps[me] |= imported_units(ast.parse(path.read_text()), units) - {me}
    return deps


def find_cycle(deps: dict[str, set[str]]) -> list[str] | None:
    """One circle of imports, as the units along it, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(unit: str) -> list[str] | None:
        state[unit] = 1
        path.append(unit)
        for other in sorted(deps.get(unit, ())):
            if state.get(other) == 1:
                return [*path[path.index(other):], other]
            if other not in state and (cycle := visit(other)) is not None:
                return cycle
        path.pop()
        state[unit] = 2
        return None

    for unit in sorted(deps):
        if unit not in state and (cycle := visit(unit)) is not None:
            return cycle
    return None


def test_no_package_imports_another_in_a_circle() -> None:
    deps = dependencies()
    assert {"net", "control", "api", "views"} <= deps.keys()  # it read the real tree
    assert find_cycle(deps) is None, " -> ".join(find_cycle(deps) or [])


def test_the_check_finds_a_circle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a"}}) is None
