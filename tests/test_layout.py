"""The package's shape: the library never imports the KFP layer built on it (components/,
pipelines/), and no module imports, even lazily inside a function, a module that imports
it back. Read from the source with `ast`, so a lazy import counts as much as a top one."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("crossaudit", "components", "pipelines")


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Each of our modules (tests aside) and ours it imports anywhere in its source."""
    files = {_module(p): p for package in PACKAGES for p in (ROOT / package).rglob("*.py") if "tests" not in p.parts}
    graph: dict[str, set[str]] = {name: set() for name in files}
    for name, path in files.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
            else:
                continue
            for target in targets:
                # `from package import module` names a module; `from module import name` does not.
                while target and target not in files:
                    target = target.rpartition(".")[0]
                if target and target != name and not name.startswith(f"{target}."):
                    graph[name].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for successor in graph[node]:
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def test_the_library_does_not_import_the_kfp_layer():
    graph = import_graph()
    upward = sorted(
        f"{name} -> {target}"
        for name, targets in graph.items()
        if name.split(".")[0] == "crossaudit"
        for target in targets
        if target.split(".")[0] in ("components", "pipelines")
    )
    assert upward == []


def test_no_module_imports_one_that_imports_it_back():
    assert cycles(import_graph()) == []


def test_every_component_says_what_it_does():
    """KFP shows a component's docstring as its description."""
    import importlib

    for path in sorted((ROOT / "components").glob("*/component.py")):
        module = importlib.import_module(_module(path))
        components = [v for v in vars(module).values() if hasattr(v, "component_spec")]
        assert components and all(c.component_spec.description for c in components), path.parent.name
