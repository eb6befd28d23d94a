"""Layering: data flows one way (``consumers``, ``buffers``, ``monitoring`` never import ``stream_cl``), and the
project's modules import each other without cycles.

Every import statement counts, wherever it is: at module level, inside functions, under ``if TYPE_CHECKING:``.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("stream_cl", "consumers", "buffers", "monitoring")
LOWER_LAYERS = ("consumers", "buffers", "monitoring")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))}


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules that ``name`` imports anywhere in its file."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:  # ``from pkg import module`` depends on the module, a name on ``pkg``
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
    return {_owner(target, modules) for target in found if target.split(".")[0] in PACKAGES} - {None, name}


def _owner(target: str, modules: dict[str, Path]) -> str | None:
    """The project module that defines ``target`` (a module, or a name inside one)."""
    while target and target not in modules:
        target = target.rpartition(".")[0]
    return target or None


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def test_the_scan_finds_the_project_and_every_kind_of_import(tmp_path: Path) -> None:
    assert {"stream_cl.run", "consumers.open", "buffers.open", "monitoring.metrics"} <= set(_graph())
    source = tmp_path / "mod.py"
    source.write_text(
        "from typing import TYPE_CHECKING\n"
        "import numpy\n"
        "from buffers import store\n"
        "from stream_cl.run import RunOptions\n"
        "if TYPE_CHECKING:\n"
        "    from monitoring.metrics import Metrics\n"
        "def f():\n"
        "    import consumers.kafka\n"
        "    from . import wire\n"
    )
    modules = dict.fromkeys(
        ["buffers.store", "stream_cl.run", "monitoring.metrics", "consumers.kafka", "consumers.wire"]
    )
    assert _imports("consumers.mod", source, modules) == set(modules)


def test_lower_layers_never_import_stream_cl() -> None:
    offending = {
        f"{name} -> {target}"
        for name, targets in _graph().items()
        if name.split(".")[0] in LOWER_LAYERS
        for target in targets
        if target.split(".")[0] == "stream_cl"
    }
    assert not offending, "consumers/, buffers/ and monitoring/ must not import stream_cl: " + ", ".join(
        sorted(offending)
    )


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
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
                    work.append((target, iter(sorted(graph[target]))))
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
                    components.append(_cycle_in(set(component), graph))
    return components


def _cycle_in(component: set[str], graph: dict[str, set[str]]) -> list[str]:
    """A shortest cycle through the component's first module (breadth-first search back to it)."""
    start = min(component)
    previous: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for target in sorted(graph[node] & component):
                if target == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(previous[path[-1]])
                    return [start, *reversed(path[:-1]), start]
                if target not in previous:
                    previous[target] = node
                    following.append(target)
        frontier = following
    raise AssertionError(f"no cycle in strongly connected component {sorted(component)}")


def test_cycle_finder_reports_a_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set()}
    assert _cycles(graph) == [["a", "b", "c", "a"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles() -> None:
    cycles = _cycles(_graph())
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(cycle) for cycle in cycles)
