"""The package's import structure: no cycles, and no import from a lower layer into a higher one.

The data flow is spec -> engine -> explainer -> runner -> store -> render/debug/evaluate; a module may import
modules of its own layer or below. Imports inside functions and under ``TYPE_CHECKING`` count too: a cycle hidden
there is still a cycle to a reader.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "lrpcli"

# Layer of each top-level module or folder of lrpcli (lowest first): the folders are the layers.
LAYERS: dict[str, int] = {}
for rank, names in enumerate([
    ("errors", "catalogue"),   # torch-free declarations every layer may use
    ("spec",),                 # the config schema, no torch
    ("engine",),               # rules, hooks, canonizers, composites: pure, imports only the two above
    ("explainer",),            # model, data, Explainer, library API
    ("store",),                # the HDF5 file format
    ("runner",),               # one process, torchrun shards
    ("commands",),             # explain, render, debug, merge, evaluate, analysis, export
    ("cli", "__main__", "__init__"),
]):
    for name in names:
        LAYERS[name] = rank
ENGINE = {"engine"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(path: Path) -> set[str]:
    """lrpcli modules imported anywhere in the file (module level, functions, TYPE_CHECKING)."""
    name = module_name(path)
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            target = ".".join(base + (node.module.split(".") if node.module else []))
            for alias in node.names:
                full = f"{target}.{alias.name}"
                found.add(full if _exists(full) else target)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {f for f in found if f == "lrpcli" or f.startswith("lrpcli.")} - {name}


def _exists(name: str) -> bool:
    rel = Path(*name.split(".")[1:])
    return (PACKAGE / rel).with_suffix(".py").exists() or (PACKAGE / rel / "__init__.py").exists()


def top(name: str) -> str:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports(p) for p in PACKAGE.rglob("*.py")}


def test_every_module_has_a_layer():
    assert {top(m) for m in graph()} <= set(LAYERS)


def test_no_upward_imports():
    wrong = sorted((m, t) for m, targets in graph().items() for t in targets
                   if top(t) != top(m) and LAYERS[top(t)] > LAYERS[top(m)] and top(t) != "__init__")
    assert wrong == []


def test_engine_imports_no_higher_layer():
    wrong = sorted((m, t) for m, targets in graph().items() if top(m) in ENGINE for t in targets
                   if top(t) not in ENGINE and LAYERS[top(t)] != 0)
    assert wrong == []


def test_no_import_cycles():
    g = graph()
    cycles, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(g.get(node, ())):
            if nxt not in g:
                continue
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = 2

    for node in sorted(g):
        if node not in state:
            visit(node, [])
    assert cycles == []
