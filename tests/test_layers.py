"""The package's import graph, imports inside functions included: no cycle, every import points
down the layers, and no private name is imported from another tvm_dcn module (helpers shared
across modules have public names, in a private module where they are not API).

Layers, lowest first (``LAYERS``): ops (TE definitions, Workload) -> schedules -> build and cache
(kernel, tuning_records, target) -> bridge to PyTorch (functional, roi, modules) -> tools (tune,
remote_tune, bench, cli). The graph is read from the sources with ``ast`` (nothing is imported).
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
            modules[".".join([package, *parts])] = path
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


# The layers, lowest first; a module may import from its own layer and those below.
# "package.*" stands for the package's submodules.
LAYERS = (
    ("ops", ("tvm_dcn.ops", "tvm_dcn.ops.*", "tvm_dcn._utils", "tvm_dcn.version", "tvm_dcn.cpu_isa")),
    ("schedules", ("tvm_dcn.schedules", "tvm_dcn.schedules.*")),
    ("build and cache", ("tvm_dcn.kernel", "tvm_dcn.tuning_records", "tvm_dcn.target", "tvm_dcn.cuda",
                         "tvm_dcn.recording", "tvm_dcn.workloads", "tvm_dcn.schedule_checks", "tvm_dcn._meta_schedule")),
    ("bridge", ("tvm_dcn.functional", "tvm_dcn.roi", "tvm_dcn.modules", "tvm_dcn._torch_utils", "tvm_dcn")),
    ("tools", ("tvm_dcn.tune", "tvm_dcn.remote_tune", "tvm_dcn.bench", "tvm_dcn.cli", "tvm_dcn.onnx")),
)


def layer_of(module: str) -> Optional[int]:
    """Index in LAYERS of ``module``, or None."""
    for index, (_, names) in enumerate(LAYERS):
        for name in names:
            if module == name or (name.endswith(".*") and module.startswith(name[:-1])):
                return index
    return None


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """The imports of ``graph`` that go from a layer to a higher one."""
    return [f"{name} ({LAYERS[layer_of(name)][0]}) imports {target} ({LAYERS[layer_of(target)][0]})"
            for name, targets in sorted(graph.items()) for target in sorted(targets)
            if layer_of(target) > layer_of(name)]


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


def test_every_module_has_a_layer_and_imports_only_downwards():
    graph = import_graph()
    unplaced = sorted(name for name in graph if layer_of(name) is None)
    assert not unplaced, f"modules without a layer (add them to LAYERS): {unplaced}"
    upwards = upward_imports(graph)
    assert not upwards, "\n".join(upwards)


def test_layer_check_sees_an_upward_import():
    assert layer_of("tvm_dcn.ops.deform_conv") == layer_of("tvm_dcn.ops") == 0
    assert layer_of("tvm_dcn.schedules.cpu_common") == 1
    assert layer_of("tvm_dcn.kernel") < layer_of("tvm_dcn.functional") < layer_of("tvm_dcn.cli")
    assert layer_of("tvm_dcn.somewhere_new") is None
    assert upward_imports({"tvm_dcn.ops.deform_conv": {"tvm_dcn.kernel", "tvm_dcn.ops"},
                           "tvm_dcn.kernel": {"tvm_dcn.ops.deform_conv"}}) == [
        "tvm_dcn.ops.deform_conv (ops) imports tvm_dcn.kernel (build and cache)"]


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
