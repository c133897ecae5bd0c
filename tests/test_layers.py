"""The house's one-way flow (shared/DESIGN.md): core <- data/models/training/defenses <- engine <- cli, and
no import circle among the engine's modules. Read from the source (every import, also those inside
functions), so a lazy import cannot hide an edge."""

from __future__ import annotations

import ast
import pathlib

import ctray

ROOT = pathlib.Path(ctray.__file__).parent

# layer of each package / top-level module; a module may import only from its own layer or below
LAYERS = {
    "_version": 0, "errors": 0, "io": 0, "progress": 0, "presets": 0, "memory": 0,
    "core": 1,
    # config validates against the model registry and the byte budgets, so it sits beside the packages
    # that read it (none of core does)
    "config": 2, "data": 2, "models": 2, "training": 2, "defenses": 2,
    "engine": 3, "report": 3,
    "cli": 4, "api": 4, "benchmarks": 4, "__init__": 4,
}


def _module(path: pathlib.Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__" and len(parts) > 2:
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: pathlib.Path) -> set[str]:
    """Every ``ctray.*`` module this file imports (module level or inside functions)."""
    out: set[str] = set()
    tree = ast.parse(path.read_text(), str(path))
    pkg = _module(path).rsplit(".", 1)[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("ctray"))
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level:
                base = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                mod = ".".join(base + ([mod] if mod else []))
            if mod.startswith("ctray"):
                out.add(mod)
                out.update(f"{mod}.{a.name}" for a in node.names
                           if (ROOT.parent / f"{mod}.{a.name}".replace(".", "/")).with_suffix(".py").exists())
    return out


def _layer(mod: str) -> int:
    parts = mod.split(".")
    key = parts[1] if len(parts) > 1 else "__init__"
    return LAYERS[key]


def _graph() -> dict[str, set[str]]:
    return {_module(p): _imports(p) for p in ROOT.rglob("*.py")}


def test_every_module_is_in_a_layer_and_imports_only_downwards():
    graph = _graph()
    bad = [f"{m} (layer {_layer(m)}) imports {d} (layer {_layer(d)})"
           for m, deps in graph.items() for d in deps if d != "ctray" and _layer(d) > _layer(m)]
    assert not bad, "\n".join(sorted(bad))


def test_no_import_circle_among_engine_modules():
    graph = {m: {d for d in deps if d.startswith("ctray.engine.")} for m, deps in _graph().items()
             if m.startswith("ctray.engine.")}
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                raise AssertionError("import circle: " + " -> ".join(path[path.index(d):] + [d]))
            if d not in state:
                visit(d)
        path.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert len(graph) >= 10  # the walk saw the engine


def test_no_private_name_crosses_an_engine_module():
    """``from ctray.engine.x import _y`` elsewhere would tie two drivers by a helper nobody owns."""
    crossings = []
    for p in (ROOT / "engine").glob("*.py"):
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("ctray.engine."):
                crossings += [f"{p.name}: {node.module}.{a.name}" for a in node.names if a.name.startswith("_")]
    assert not crossings, crossings
