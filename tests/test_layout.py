"""The package's import graph has no circles, and every import points down the layer order.

Every ``import`` / ``from ... import`` anywhere in a module counts, also the late ones inside functions,
with relative imports resolved. ``from a.b import c`` is an import of the module ``a.b.c`` when that is
a module, else of ``a.b``; a package stands for its ``__init__.py``. Importing ``paramtransfer.x.y``
is counted as an import of ``paramtransfer.x.y`` alone (Python runs the parents' ``__init__`` too, but
they are not where the importer's names come from).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "paramtransfer"

# Lowest first; a module may import modules of its own layer or of a lower one. A module belongs to the
# layer of its longest name listed here (below ``paramtransfer``): ``train.checkpoint`` (atomic writes and
# folder locks, standard library only) is a leaf that every layer writes files with, the rest of
# ``train`` builds on models and methods.
LAYERS: list[set[str]] = [
    {"errors", "registry", "metrics", "runtime", "train.checkpoint"},
    {"data"},
    {"models"},
    {"methods", "optim", "train"},
    {"results"},
    {"report"},
    {"experiments"},
    {"selection"},
    {"bench"},
    {"cli", "__main__", ""},  # "": paramtransfer/__init__.py, the public API
]


def _modules() -> dict[str, tuple[Path, bool]]:
    """Dotted name -> (file, is a package's __init__)."""
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        found[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports (itself left out)."""
    modules = _modules()

    def known(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for name, (path, is_package) in modules.items():
        here = name if is_package else name.rpartition(".")[0]
        targets: set[str | None] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets |= {known(a.name) for a in node.names if a.name.split(".")[0] == PACKAGE.name}
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = here.split(".")[: len(here.split(".")) - (node.level - 1)]
                    module = ".".join(base + ([node.module] if node.module else []))
                else:
                    module = node.module or ""
                if module.split(".")[0] != PACKAGE.name:
                    continue
                for alias in node.names:
                    full = f"{module}.{alias.name}"
                    targets.add(full if full in modules else known(module))
        graph[name] = {t for t in targets if t is not None and t != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle ``[a, b, ..., a]``, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            found = visit(start)
            if found:
                return found
    return None


def layer(module: str) -> int:
    parts = module.split(".")[1:]
    for n in range(len(parts), 0, -1) if parts else [0]:
        for i, names in enumerate(LAYERS):
            if ".".join(parts[:n]) in names:
                return i
    raise AssertionError(f"{module} is in no layer of tests/test_layout.py; add it to LAYERS")


def test_the_graph_sees_late_and_relative_imports() -> None:
    graph = import_graph()
    assert "paramtransfer.bench.speedsuite" in graph["paramtransfer.bench.runner"]  # inside a function
    assert "paramtransfer.methods.baselines" in graph["paramtransfer.methods"]  # from PACKAGE import MODULE
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_imports_follow_the_layer_order() -> None:
    graph = import_graph()
    upward = sorted(
        f"{module} (layer {layer(module)}) imports {target} (layer {layer(target)})"
        for module, targets in graph.items()
        for target in targets
        if layer(target) > layer(module)
    )
    assert not upward, "imports against the layer order:\n" + "\n".join(upward)
