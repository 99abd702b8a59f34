"""Imports flow one way: no cycle among the modules of benchmark/ and methods/.

Every module is parsed (not imported) and every import statement counts, also one inside a
function (a lazy import still closes a cycle when it runs). An import names the most specific
module it loads: ``from benchmark.report import plots`` is an edge to benchmark.report.plots,
``from benchmark.report.tables import Report`` to benchmark.report.tables, ``from . import x``
is resolved against the importing module's package. Importing a submodule runs its package's
``__init__`` first, but that is not an edge: a package's ``__init__`` may import its own
submodules. Imports under ``if TYPE_CHECKING:`` never run and do not count.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("benchmark", "methods")


def module_files() -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join(parts)] = path
    return modules


def is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def import_nodes(tree: ast.AST):
    """Every Import / ImportFrom in the tree, at any depth, except under ``if TYPE_CHECKING:``."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        children = list(ast.iter_child_nodes(node))
        if isinstance(node, ast.If) and is_type_checking(node):
            children = list(node.orelse)
        stack.extend(children)


def known(name: str, modules: dict[str, Path]) -> str | None:
    """``name`` or its closest enclosing module among ours; None for a module outside them."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def imported(node: ast.Import | ast.ImportFrom, module: str, path: Path, modules: dict[str, Path]):
    """(target module, line) for each module of ours that ``node`` loads."""
    if isinstance(node, ast.Import):
        for alias in node.names:
            if target := known(alias.name, modules):
                yield target, node.lineno
        return
    base = node.module or ""
    if node.level:  # relative: against the package of the importing module
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        parts = package.split(".")[: len(package.split(".")) - node.level + 1]
        base = ".".join(parts + ([base] if base else []))
    for alias in node.names:
        candidate = f"{base}.{alias.name}"
        if target := known(candidate if candidate in modules else base, modules):
            yield target, node.lineno


def import_graph() -> dict[str, dict[str, int]]:
    """module -> {imported module: line of the first import of it}."""
    modules = module_files()
    graph: dict[str, dict[str, int]] = {name: {} for name in modules}
    for module, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in import_nodes(tree):
            for target, line in imported(node, module, path, modules):
                if target != module:
                    graph[module].setdefault(target, line)
    return graph


def strongly_connected(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Tarjan's strongly connected components with more than one module (iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(graph[root]))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, targets = work[-1]
            target = next(targets, None)
            if target is not None:
                if target not in index:
                    index[target] = low[target] = len(index)
                    stack.append(target)
                    on_stack.add(target)
                    work.append((target, iter(graph[target])))
                elif target in on_stack:
                    low[node] = min(low[node], index[target])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(sorted(component))
    return components


def one_cycle(graph: dict[str, dict[str, int]], component: list[str]) -> list[str]:
    """A shortest cycle through the component's first module, as a path that ends where it starts."""
    start, members = component[0], set(component)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for target in graph[node]:
                if target == start:
                    return paths[node] + [start]
                if target in members and target not in paths:
                    paths[target] = paths[node] + [target]
                    following.append(target)
        frontier = following
    return component


def describe(graph: dict[str, dict[str, int]], cycle: list[str]) -> str:
    return " -> ".join(f"{a} (line {graph[a][b]})" for a, b in zip(cycle, cycle[1:])) + f" -> {cycle[-1]}"


def test_the_graph_sees_lazy_and_submodule_imports():
    graph = import_graph()
    assert "benchmark.recovery.run" in graph["benchmark.run"]  # inside a function
    assert "benchmark.report.plots" in graph["benchmark.report.cli"]  # from a package import a module
    assert "benchmark.report.tables" in graph["benchmark.report.cli"]  # from a module import a name
    assert "benchmark.models.families" in graph["benchmark.models"]  # a package's __init__, its submodule


def test_no_import_cycle():
    graph = import_graph()
    cycles = []
    for component in strongly_connected(graph):
        cycle = one_cycle(graph, component)
        also = sorted(set(component) - set(cycle))
        cycles.append(describe(graph, cycle) + (f"  (entangled with it: {', '.join(also)})" if also else ""))
    assert not cycles, "import cycles (break each by moving the shared piece where both can import it):\n" + (
        "\n".join(cycles)
    )
