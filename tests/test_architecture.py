"""The package's import graph: no cycles, and imports point down the layers
(kernels -> ops -> routers/losses -> layers -> convert/distributed), as docs/architecture.md
describes. Function-level (lazy) imports count: a lazy import is still a dependency."""

from __future__ import annotations

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(ROOT, "moe_kernels")


def _modules() -> dict[str, str]:
    out = {}
    for dirpath, _, files in os.walk(PKG):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(dirpath, f), ROOT)[:-3].replace(os.sep, ".")
                out[rel[: -len(".__init__")] if rel.endswith(".__init__") else rel] = os.path.join(dirpath, f)
    return out


def _imports(path: str, name: str, modules: dict[str, str]) -> set[str]:
    """The moe_kernels modules ``name`` imports (``from pkg import sub`` resolves to ``pkg.sub``)."""
    with open(path) as f:
        tree = ast.parse(f.read())
    pkg = name if path.endswith("__init__.py") else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = pkg.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            for a in node.names:
                found.add(f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base)
    return {m for m in found if m in modules and m != name}


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(path, name, modules) for name, path in modules.items()}


def test_no_import_cycle(graph):
    # The package's __init__ is the facade that imports everything; it is not a dependency.
    g = {m: {d for d in deps if d != "moe_kernels"} for m, deps in graph.items() if m != "moe_kernels"}
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for d in sorted(g.get(m, ())):
            if state.get(d) == 1:
                cycle = path[path.index(d) :] + [d]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if d not in state:
                visit(d)
        path.pop()
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m)


# Each module's layer; a module may import only modules of its own layer or below.
LAYERS = [
    ("validation", "_ext", "kernels"),
    ("backends", "reference", "ops"),
    ("losses", "routers", "expert_parallel", "experts", "soft_moe"),
    ("layers", "stats"),
    ("convert", "distributed", "info"),
]


def _layer(module: str) -> int | None:
    parts = module.split(".")
    if len(parts) < 2:
        return None
    for i, names in enumerate(LAYERS):
        if parts[1] in names:
            return i
    return None


def test_imports_point_down(graph):
    for m, deps in graph.items():
        lm = _layer(m)
        if lm is None:
            continue
        for d in deps:
            ld = _layer(d)
            assert ld is None or ld <= lm, f"{m} (layer {lm}) imports {d} (layer {ld}): imports must point down"


def test_kernels_have_no_torch_glue():
    for name, path in _modules().items():
        if name.startswith("moe_kernels.kernels"):
            with open(path) as f:
                tree = ast.parse(f.read())
            imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
            imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
            assert not any(i == "torch" or i.startswith("torch.") for i in imported), f"{name} imports torch"
