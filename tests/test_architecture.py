"""The import graph of the package, read from the source (``ast``, function-local imports included):
no cycles among ``rtrl_jax`` modules, and the library (``rtrl_jax/__init__.py``, ``rtrl_jax/_src``)
never imports the layers above it (``rtrl_jax.experiment``, ``rtrl_jax.cli``)."""

import ast
from pathlib import Path

import pytest

import rtrl_jax

PACKAGE = Path(rtrl_jax.__file__).resolve().parent
ABOVE_THE_LIBRARY = ("rtrl_jax.experiment", "rtrl_jax.cli")


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _resolve(module: str, name: str | None) -> str | None:
    """The ``rtrl_jax`` module that ``from module import name`` (``import module`` for ``name=None``)
    loads: ``module.name`` when that is a module, else ``module``; ``None`` outside the package."""
    if not (module == "rtrl_jax" or module.startswith("rtrl_jax.")):
        return None
    if name is not None and f"{module}.{name}" in MODULES:
        return f"{module}.{name}"
    return module


def imports_of(name: str) -> dict[str, int]:
    """``{imported rtrl_jax module: first line}`` for every import statement of module ``name``,
    at any depth (functions, classes, ``if`` blocks)."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = {}
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets = []
        if isinstance(node, ast.Import):
            targets = [_resolve(alias.name, None) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:  # relative: from .x import y, from .. import z
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([module] if module else []))
            targets = [_resolve(module, alias.name) for alias in node.names]
        for target in targets:
            if target is not None and target != name:
                found.setdefault(target, node.lineno)
    return found


GRAPH = {name: imports_of(name) for name in MODULES}


def _cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, components = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in graph.get(node, {}):
            if succ not in graph:
                continue
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
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

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def test_the_graph_sees_the_package():
    assert {"rtrl_jax", "rtrl_jax._src.registry", "rtrl_jax.cli"} <= set(GRAPH)
    assert "rtrl_jax._src.registry" in GRAPH["rtrl_jax._src.rtrl"]
    assert "rtrl_jax._src.rtrl" in GRAPH["rtrl_jax"]


def test_no_import_cycles():
    cycles = _cycles(GRAPH)
    described = [
        " <-> ".join(component)
        + ": "
        + "; ".join(
            f"{a} imports {b} (line {GRAPH[a][b]})" for a in component for b in component if b in GRAPH[a]
        )
        for component in cycles
    ]
    assert not cycles, "import cycles:\n" + "\n".join(described)


def _is_library(name: str) -> bool:
    return name == "rtrl_jax" or name.startswith("rtrl_jax._src")


@pytest.mark.parametrize("name", [name for name in MODULES if _is_library(name)])
def test_the_library_does_not_import_the_layers_above_it(name):
    upward = {
        target: line
        for target, line in GRAPH[name].items()
        if any(target == top or target.startswith(top + ".") for top in ABOVE_THE_LIBRARY)
    }
    assert not upward, f"{MODULES[name]} imports {upward} (module: line)"


def test_the_checks_catch_a_cycle_and_an_upward_import():
    graph = {"rtrl_jax._src.a": {"rtrl_jax._src.b": 1}, "rtrl_jax._src.b": {"rtrl_jax._src.a": 3}, "x": {}}
    assert _cycles(graph) == [["rtrl_jax._src.a", "rtrl_jax._src.b"]]
    assert _resolve("rtrl_jax", "experiment") == "rtrl_jax.experiment"
    assert _resolve("rtrl_jax._src.registry", "register") == "rtrl_jax._src.registry"
    assert _resolve("jax", "numpy") is None
