"""The package's import graph: no cycle (counting imports inside functions), and no private name
imported from another tvm_dcn module.

Layers point one way: ops (TE definitions, Workload) -> schedules -> build and cache (kernel,
tuning_records, target) -> bridge to PyTorch (functional, roi, modules) -> tools (tune,
remote_tune, bench, cli). A module importing "upwards" closes a cycle, which this test prints.
Read from the sources with ``ast`` (nothing is imported), so it runs in milliseconds.
"""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parent.parent
# Package name -> folder: schedules/ ships as tvm_dcn.schedules (pyproject's package-dir).
PACKAGES = {"tvm_dcn": REPO / "tvm_dcn", "tvm_dcn.schedules": REPO / "schedules"}


def package_modules() -> dict[str, Path]:
    """Every module of tvm_dcn (packages by their ``__init__``), name -> file."""
    modules = {}
    for package, folder in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            name = ".".join([package, *parts])
            if name not in modules:  # tvm_dcn/schedules would shadow nothing: it does not exist
                modules[name] = path
    return modules


def _is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def _resolve(module: str, path: Path, node: ast.ImportFrom) -> str:
    """The absolute module name an ``ImportFrom`` names (relative imports resolved)."""
    if not node.level:
        return node.module or ""
    package = module if _is_package(path) else module.rpartition(".")[0]
    for _ in range(node.level - 1):
        package = package.rpartition(".")[0]
    return f"{package}.{node.module}" if node.module else package


def imports_of(module: str, path: Path, known: set[str]) -> list[tuple[str, Optional[str]]]:
    """(imported tvm_dcn module, name imported from it or None) for every import statement in the
    module, at any depth (functions included). ``from package import submodule`` counts as an
    import of the submodule."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in known:
                    found.append((alias.name, None))
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(module, path, node)
            if base not in known:
                continue
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                if submodule in known:
                    found.append((submodule, None))
                else:
                    found.append((base, alias.name))
    return found


def import_graph() -> dict[str, set[str]]:
    """module -> the tvm_dcn modules it imports. A package's own ``__init__`` importing its
    submodules (to register them) is an edge like any other; a submodule does not depend on its
    parent package's ``__init__`` unless it imports it."""
    modules = package_modules()
    known = set(modules)
    graph = {name: set() for name in modules}
    for name, path in modules.items():
        for target, _ in imports_of(name, path, known):
            if target != name:
                graph[name].add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> Optional[list[str]]:
    """A cycle of ``graph`` as a path ``[a, b, ..., a]``, or None (iterative depth-first search)."""
    WHITE, GREY, BLACK = 0, 1, 2
    colour = {node: WHITE for node in graph}
    for start in sorted(graph):
        if colour[start] != WHITE:
            continue
        stack = [(start, iter(sorted(graph[start])))]
        colour[start] = GREY
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                colour[node] = BLACK
                stack.pop()
                continue
            if colour.get(child, WHITE) == GREY:
                path = [n for n, _ in stack]
                return path[path.index(child):] + [child]
            if colour.get(child, WHITE) == WHITE:
                colour[child] = GREY
                stack.append((child, iter(sorted(graph.get(child, ())))))
    return None


def test_cycle_finder_finds_a_cycle_and_accepts_a_dag():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) in (
        ["a", "b", "c", "a"], ["b", "c", "a", "b"], ["c", "a", "b", "c"])
    assert find_cycle({"a": {"a"}}) == ["a", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set(), "d": {"a", "c"}}) is None


def test_graph_sees_imports_inside_functions_and_relative_imports(tmp_path):
    source = tmp_path / "kernel.py"
    source.write_text("from .ops import build\n\ndef f():\n    from . import roi\n    from .schedules import find\n")
    known = {"tvm_dcn", "tvm_dcn.ops", "tvm_dcn.roi", "tvm_dcn.schedules"}
    assert sorted(imports_of("tvm_dcn.kernel", source, known), key=str) == [
        ("tvm_dcn.ops", "build"), ("tvm_dcn.roi", None), ("tvm_dcn.schedules", "find")]


def test_the_graph_covers_the_package():
    graph = import_graph()
    for name in ("tvm_dcn", "tvm_dcn.kernel", "tvm_dcn.ops", "tvm_dcn.ops.deform_conv", "tvm_dcn.schedules",
                 "tvm_dcn.schedules.cpu_deform_conv2d", "tvm_dcn.functional", "tvm_dcn.cli"):
        assert name in graph
    assert "tvm_dcn.ops" in graph["tvm_dcn.kernel"]


def test_tvm_dcn_has_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_private_name_is_imported_from_another_module():
    """Helpers shared across modules have public names (in a private module if they are not API)."""
    modules = package_modules()
    known = set(modules)
    offences = []
    for name, path in modules.items():
        for target, imported in imports_of(name, path, known):
            if imported and imported.startswith("_") and not imported.startswith("__") and target != name:
                offences.append(f"{name} imports {imported} from {target}")
    assert not offences, "\n".join(offences)
