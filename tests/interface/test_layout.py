"""The package's import graph, read from the sources with ``ast``: no import cycle among fastdd's modules, and the
ops layer importing nothing of fastdd above it.

The graph: a node per module of the package as shipped, ``fastdd/`` and ``kernels/`` (``fastdd.kernels``); an
edge for every import of a fastdd module, at module level or inside a function, except those under
``if TYPE_CHECKING:``. ``from package import name`` is an edge to the submodule ``package.name`` where there is one,
else to ``package``; the parent packages an import runs on the way are not edges (every module would otherwise
import its package's ``__init__``, which imports it back).

The layers, lowest first:

- helpers: ``fastdd.checks``, ``fastdd.errors``, ``fastdd.io``, ``fastdd.version`` (argument checks, the errors
  raised on purpose, crash-safe file writes, the version), importing one another only;
- ops: ``fastdd.ops`` and the Triton kernels it launches, ``fastdd.kernels``, importing the helpers and one another
  only (the models, methods and run loop build on the ops, never the other way);
- everything else.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FOLDERS = {"fastdd": ROOT / "fastdd", "fastdd.kernels": ROOT / "kernels"}  # package -> its source folder
HELPERS = frozenset({"fastdd.checks", "fastdd.errors", "fastdd.io", "fastdd.version"})
OPS = ("fastdd.ops", "fastdd.kernels")


def modules() -> dict[str, Path]:
    """Every module of the package: its dotted name -> its source file."""
    found = {}
    for package, folder in FOLDERS.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join((package, *parts))] = path
    return found


def _type_checking(node: ast.If) -> bool:
    """True for ``if TYPE_CHECKING:`` and ``if typing.TYPE_CHECKING:``."""
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imported(statement: ast.Import | ast.ImportFrom, module: str, is_package: bool, known: set[str]) -> set[str]:
    """The fastdd modules one import statement of ``module`` names (module docstring)."""
    if isinstance(statement, ast.Import):
        return {alias.name for alias in statement.names}
    base = statement.module or ""
    if statement.level:  # relative: from the module's package, up level - 1 packages
        package = module.split(".") if is_package else module.split(".")[:-1]
        base = ".".join(package[:len(package) - statement.level + 1] + ([base] if base else []))
    return {f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in statement.names}


@functools.cache
def graph() -> dict[str, frozenset[str]]:
    """Each module -> the fastdd modules it imports."""
    found = modules()
    edges = {}
    for module, path in found.items():
        imported: set[str] = set()
        pending: list[ast.AST] = [ast.parse(path.read_text(), str(path))]
        while pending:
            for child in ast.iter_child_nodes(pending.pop()):
                if isinstance(child, ast.If) and _type_checking(child):
                    pending.extend(child.orelse)
                    continue
                if isinstance(child, (ast.Import, ast.ImportFrom)):
                    imported |= _imported(child, module, path.name == "__init__.py", set(found))
                pending.append(child)
        edges[module] = frozenset(name for name in imported if name in found and name != module)
    return edges


def cycles(edges: dict[str, frozenset[str]]) -> list[frozenset[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm): each holds a cycle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[frozenset[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in sorted(edges[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = {stack.pop()}
            while node not in component:
                component.add(stack.pop())
            if len(component) > 1:
                found.append(frozenset(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def _shown(component: frozenset[str], edges: dict[str, frozenset[str]]) -> str:
    return "; ".join(f"{m} -> {', '.join(sorted(edges[m] & component))}" for m in sorted(component))


def test_the_graph_sees_every_kind_of_import():
    """A module-level import, one inside a function, a relative one, ``from package import submodule``; none under
    TYPE_CHECKING (fastdd.ops.grad_norm's fused tails once imported fastdd.models there and in a function)."""
    edges = graph()
    assert "fastdd.ops.calibration" in edges["fastdd.ops"]  # from fastdd.ops import _backend, calibration
    assert "fastdd.kernels.norm_relu_pool" in edges["fastdd.ops.norm_relu_pool"]  # inside a function
    assert "fastdd.kernels.resources" in edges["fastdd.kernels.grad_match"]  # from .resources import ...
    assert {"fastdd.api", "fastdd.config", "fastdd.version"} <= edges["fastdd"]


def test_no_import_cycle():
    edges = graph()
    found = cycles(edges)
    assert not found, "import cycles: " + " | ".join(_shown(c, edges) for c in found)


def test_the_ops_import_nothing_above_them():
    edges = graph()
    ops = {m for m in edges if m.startswith(tuple(f"{layer}." for layer in OPS)) or m in OPS}
    above = {m: sorted(edges[m] - ops - HELPERS) for m in sorted(ops)}
    assert not {m: names for m, names in above.items() if names}, above
    assert HELPERS <= set(edges)
    helpers_above = {m: sorted(edges[m] - HELPERS) for m in sorted(HELPERS)}
    assert not {m: names for m, names in helpers_above.items() if names}, helpers_above
