"""The package's import graph, read statically with ``ast``: every import, module-level or inside a function.

A function-level import is still a dependency (it runs the first time the function does), so a cycle
hidden behind one is still a cycle: the two modules cannot be understood, tested or moved apart. The
rules asserted here are the layering the package's docstring promises (search -> trainables ->
datasets, search -> spaces, everything -> errors), checked on the source rather than on what one
particular run happened to import.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "medsweep"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _at_import_time(tree: ast.Module) -> list[ast.AST]:
    """The nodes a module runs when it is imported: its statements, class bodies included, but neither
    function bodies (they run when called) nor ``if TYPE_CHECKING:`` blocks (never run)."""
    nodes: list[ast.AST] = []
    todo: list[ast.AST] = list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            todo.extend(node.orelse)
            continue
        nodes.append(node)
        todo.extend(ast.iter_child_nodes(node))
    return nodes


def _imported(tree: ast.Module, module: str, is_package: bool, import_time_only: bool = False) -> set[str]:
    """Every name an ``import`` / ``from ... import`` in ``tree`` brings in, relative imports resolved
    (with ``import_time_only``, only those that importing the module runs: :func:`_at_import_time`).

    ``from a.b import c`` yields ``a.b`` and ``a.b.c`` (``c`` may be a submodule; the caller keeps
    only names that are modules)."""
    names: set[str] = set()
    for node in _at_import_time(tree) if import_time_only else ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base if is_package else base[:-1]
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            names.add(source)
            names.update(f"{source}.{alias.name}" for alias in node.names)
    return names


def import_graph(import_time_only: bool = False) -> dict[str, set[str]]:
    """{medsweep module: the medsweep modules it imports} (external imports kept under their top-level name);
    with ``import_time_only``, only the imports that importing it runs."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        found = _imported(ast.parse(path.read_text(), str(path)), name, path.name == "__init__.py", import_time_only)
        graph[name] = {
            target if target in modules else target.split(".")[0]
            for target in found
            if target in modules or not target.startswith("medsweep")
        } - {name}
    return graph


def _internal(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    return {name: {t for t in targets if t in graph} for name, targets in graph.items()}


def import_circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The graph's strongly connected components of more than one module: each is a set of modules
    that all import one another, directly or through the others (sorted, for a stable message)."""

    def reachable(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for target in graph[todo.pop()] - seen:
                seen.add(target)
                todo.append(target)
        return seen

    reach = {name: reachable(name) for name in graph}
    circles = {frozenset(m for m in reach[name] if name in reach[m]) for name in graph if name in reach[name]}
    return sorted(sorted(circle) for circle in circles)


def test_the_graph_sees_function_level_imports() -> None:
    """The reader itself: the lazy imports of the CLI are edges (otherwise the other tests prove nothing)."""
    graph = import_graph()
    assert "medsweep.search.console" in graph["medsweep.cli"]  # imported inside cmd_sweep
    assert "ray" in graph["medsweep.search.tuning"]
    at_import = import_graph(import_time_only=True)
    assert "medsweep.search.console" not in at_import["medsweep.cli"]
    assert "medsweep.search.trial" in graph["medsweep.search.members"] - at_import["medsweep.search.members"]
    assert "medsweep.trainables.preload" in graph["medsweep.search.data"] - at_import["medsweep.search.data"]  # TYPE_CHECKING


def test_no_import_cycle_in_the_package() -> None:
    circles = import_circles(_internal(import_graph()))
    assert not circles, "modules that import one another: " + "; ".join(" <-> ".join(c) for c in circles)


@pytest.mark.parametrize("package", ["medsweep.datasets", "medsweep.trainables", "medsweep.spaces"])
def test_lower_packages_never_import_ray(package: str) -> None:
    graph = import_graph()
    offenders = sorted(name for name, targets in graph.items() if name.startswith(package) and "ray" in targets)
    assert not offenders, f"{offenders} import ray; only medsweep.search may"


@pytest.mark.parametrize("package", ["medsweep.datasets", "medsweep.spaces"])
def test_data_packages_import_only_errors_and_themselves(package: str) -> None:
    graph = _internal(import_graph())
    allowed = {"medsweep", "medsweep.errors"}
    wrong = {
        name: sorted(t for t in targets if t not in allowed and not t.startswith(package))
        for name, targets in graph.items()
        if name == package or name.startswith(package + ".")
    }
    assert not {name: targets for name, targets in wrong.items() if targets}


def test_dependencies_point_one_way() -> None:
    """search -> trainables -> datasets, search -> spaces: nothing below imports search or the CLI."""
    graph = _internal(import_graph())
    for name, targets in graph.items():
        if name.startswith(("medsweep.trainables", "medsweep.datasets", "medsweep.spaces")):
            assert not [t for t in targets if t.startswith(("medsweep.search", "medsweep.cli"))], name
        if name.startswith("medsweep.search"):
            assert "medsweep.cli" not in targets, name


@pytest.mark.parametrize(
    ("module", "allowed"),
    [
        ("medsweep.search.frozen_decode", set()),
        ("medsweep.search.members", {"ray"}),
        ("medsweep.search.router", {"ray"}),
        ("medsweep.search.data", {"ray"}),
        ("medsweep.search.cohorts", {"ray"}),
    ],
)
def test_modules_that_many_ray_workers_import_leave_torch_out(module: str, allowed: set[str]) -> None:
    """Ray imports a task's (or Tune function's) module tree in each worker that runs it, and the module of an
    actor's class in each process handed a handle to it. So the frozen pass's decode tasks, a fused sweep's member
    clients (which unpickle the stores' ``StoreData``) and its router (both hold cohort-server handles) must start
    without torch and the model code: seconds of CPU and hundreds of MB per worker, and a sweep runs many of them.
    What importing the module runs counts; the Tune function of a sweep whose methods are not all fused imports
    the trial code inside, only for a trial that trains in its own process."""
    graph = import_graph(import_time_only=True)
    seen, todo = set(), [module]
    while todo:
        for target in graph.get(todo.pop(), set()) - seen:
            seen.add(target)
            todo.append(target)
    assert not seen & ({"torch", "transformers", "peft", "ray"} - allowed), sorted(seen)


def test_the_package_imports_no_scikit_learn() -> None:
    """Every trial process computes metrics: scikit-learn's (with ``scipy.stats``) cost each most of a second of
    CPU at start-up, so the metrics are numpy (tested equal to scikit-learn's in ``test_metrics.py``)."""
    graph = import_graph()
    assert not sorted(name for name, targets in graph.items() if {"sklearn", "scipy"} & targets)
