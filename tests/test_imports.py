"""The first-party import graph, read from the source with ``ast`` (nothing is imported).

Every ``import`` / ``from ... import`` statement counts, at module level or inside a function (a function-local
import that dodges a cycle at load time is still a dependency), relative imports included. Imports under
``if TYPE_CHECKING:`` are skipped by default (they never run). Importing ``pkg.mod`` depends on ``pkg.mod`` only,
not on ``pkg/__init__.py``; ``from pkg import name`` depends on ``pkg.name`` when that is a module, else on ``pkg``.

Rules checked (DESIGN.md §1): (a) no cycle among the solvers modules; (b) solvers imports only torch, numpy, scipy,
the standard library and itself; (c) sharding never imports engine, launch or solvers. :func:`import_graph` and
:func:`find_cycle` take any package list, so "no cycle anywhere" is ``find_cycle(import_graph(ROOT, PACKAGES))``.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("engine", "solvers", "sharding", "launch")


def module_files(root: Path, packages: Sequence[str]) -> dict[str, Path]:
    """``{dotted module name: file}`` for every ``.py`` file under the given top-level packages."""
    out = {}
    for pkg in packages:
        for path in sorted((root / pkg).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(tree: ast.AST, include_type_checking: bool) -> Iterable[ast.Import | ast.ImportFrom]:
    """Every import statement in the tree (any depth), optionally skipping ``if TYPE_CHECKING:`` bodies."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        if isinstance(node, ast.If) and not include_type_checking and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))


def imported_names(module: str, path: Path, include_type_checking: bool = False) -> set[tuple[str, str | None]]:
    """What this file imports, as ``(name, fallback)`` pairs of absolute dotted names: ``("a.b", None)`` for
    ``import a.b``; ``("a.b.c", "a.b")`` for ``from a.b import c`` (``c`` is either a module or a name defined in
    ``a.b``); relative imports resolved against ``module``."""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    names: set[tuple[str, str | None]] = set()
    for node in _import_nodes(ast.parse(path.read_text(), str(path)), include_type_checking):
        if isinstance(node, ast.Import):
            names.update((alias.name, None) for alias in node.names)
            continue
        base = node.module or ""
        if node.level:
            anchor = package[: len(package) - (node.level - 1)]
            base = ".".join([*anchor, base] if base else anchor)
        names.update((f"{base}.{alias.name}", base) for alias in node.names)
    return names


def import_graph(root: Path, packages: Sequence[str], include_type_checking: bool = False) -> dict[str, set[str]]:
    """``{module: first-party modules it imports}`` over the given packages (a module of a package that is not
    listed is not a node, so edges into it are dropped)."""
    files = module_files(root, packages)
    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        deps = set()
        for name, fallback in imported_names(module, path, include_type_checking):
            target = name if name in files else fallback
            if target in files and target != module:
                deps.add(target)
        graph[module] = deps
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as ``[m0, m1, ..., m0]``, or ``None`` (iterative depth-first search, sorted order)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for start in sorted(graph):
        if state.get(start):
            continue
        path, iters = [start], [iter(sorted(graph[start]))]
        state[start] = 1
        while path:
            nxt = next(iters[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                iters.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            elif not state.get(nxt) and nxt in graph:
                state[nxt] = 1
                path.append(nxt)
                iters.append(iter(sorted(graph[nxt])))
    return None


def top_level_imports(root: Path, package: str) -> dict[str, set[str]]:
    """``{module: top-level names it imports}`` for every module of ``package`` (``from . import x`` -> package)."""
    out = {}
    for module, path in module_files(root, [package]).items():
        out[module] = {name.split(".")[0] for name, _ in imported_names(module, path, include_type_checking=True)}
    return out


# ---------------------------------------------------------------- the rules


def test_solvers_have_no_import_cycle():
    graph = import_graph(ROOT, ["solvers"])
    assert "solvers.group_prune" in graph and "solvers.groups" in graph["solvers.scores"]
    assert find_cycle(graph) is None, find_cycle(graph)


def test_no_import_cycle_anywhere():
    """engine, solvers, sharding and launch together: imports flow one way (`if TYPE_CHECKING:` imports are not
    run, so they do not count)."""
    cycle = find_cycle(import_graph(ROOT, PACKAGES))
    assert cycle is None, " -> ".join(cycle)


def test_layers_flow_one_way():
    """solvers and sharding never import engine or launch; engine never imports launch."""
    for package, banned in (
        ("solvers", {"engine", "launch"}),
        ("sharding", {"engine", "launch"}),
        ("engine", {"launch"}),
    ):
        bad = {m: sorted(n & banned) for m, n in top_level_imports(ROOT, package).items() if n & banned}
        assert not bad, bad


def test_solvers_import_only_torch_numpy_scipy_and_the_standard_library():
    allowed = {"torch", "numpy", "scipy", "solvers"} | set(sys.stdlib_module_names)
    bad = {m: sorted(names - allowed) for m, names in top_level_imports(ROOT, "solvers").items() if names - allowed}
    assert not bad, bad


def test_sharding_never_imports_engine_launch_or_solvers():
    bad = {
        m: sorted(names & {"engine", "launch", "solvers"})
        for m, names in top_level_imports(ROOT, "sharding").items()
        if names & {"engine", "launch", "solvers"}
    }
    assert not bad, bad


# ---------------------------------------------------------------- the checker itself


def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)


def test_checker_sees_function_local_relative_and_package_imports(tmp_path):
    _write(
        tmp_path,
        {
            "pa/__init__.py": "from pa.a import f\n",
            "pa/a.py": "import os\n\ndef f():\n    from . import b  # dodges the cycle at load time\n",
            "pa/b.py": "from .a import f\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import pb.c\n",
            "pb/__init__.py": "",
            "pb/c.py": "from pa import b\nimport numpy as np\n",
        },
    )
    graph = import_graph(tmp_path, ["pa", "pb"])
    assert graph == {"pa": {"pa.a"}, "pa.a": {"pa.b"}, "pa.b": {"pa.a"}, "pb": set(), "pb.c": {"pa.b"}}
    assert find_cycle(graph) == ["pa.a", "pa.b", "pa.a"]
    assert import_graph(tmp_path, ["pa", "pb"], include_type_checking=True)["pa.b"] == {"pa.a", "pb.c"}
    assert find_cycle(import_graph(tmp_path, ["pb"])) is None  # pa not listed: its modules are not nodes
    assert top_level_imports(tmp_path, "pb")["pb.c"] == {"pa", "numpy"}


@pytest.mark.parametrize("edges", [{"x": {"y"}, "y": {"z"}, "z": {"x"}}, {"x": {"x"}}])
def test_find_cycle_reports_a_closed_path(edges):
    cycle = find_cycle(edges)
    assert cycle is not None and cycle[0] == cycle[-1] and all(b in edges[a] for a, b in zip(cycle, cycle[1:]))
    assert find_cycle({"x": {"y"}, "y": {"z"}, "z": set(), "w": {"x", "z"}}) is None
