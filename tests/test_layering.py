"""The layers of src/llmpress: every import (top-level and inside functions) read from the source.

No module may take part in an import cycle, and each layer imports only from the layers below it
(README, "Architecture"). A violation names the importing module, the imported one and the line.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "llmpress"
METHOD_PACKAGES = ("quant", "prune", "lowrank", "distill", "rotate")

# (module or package prefix, layer); a module's layer is that of its longest matching prefix. Lower numbers
# are lower layers; a module may import its own layer and the ones below.
LAYERS = [
    ("errors", 0), ("paths", 0), ("progress", 0), ("primitives", 0), ("linalg", 0), ("stats", 0),
    ("compressed", 0), ("settled", 0), ("config", 0), ("allocate", 0), ("resume", 0),
    ("models", 1), ("models.archs", 1), ("data", 1), ("measure", 1),
    ("calib", 2),
    ("registry", 3),
    *[(p, 4) for p in METHOD_PACKAGES],
    ("recipes", 4),  # built-in recipes that chain methods: data over the registry
    ("export", 5), ("save", 5), ("models.loader", 6), ("models.smollm2", 6),
    ("measure.streamed", 6),  # reads folders (formats) and runs blocks (calib): the loader's layer
    ("recipe", 7), ("recipe_names", 7), ("engine", 8), ("stream", 8), ("plan", 8), ("sensitivity", 8),
    ("api", 9), ("sweep", 9), ("auto", 9),
    ("cli", 10), ("", 11),  # "" = the package's __init__
]


def _modules() -> dict[str, tuple[Path, bool]]:
    found = {}
    for path in SRC.rglob("*.py"):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        package = parts[-1] == "__init__"
        if package:
            parts = parts[:-1]
        found[".".join(parts)] = (path, package)
    return found


def _imports() -> dict[str, list[tuple[str, int]]]:
    """module -> [(imported llmpress module, line)], names relative to the package ("" = llmpress itself)."""
    modules = _modules()
    edges: dict[str, list[tuple[str, int]]] = {}
    for name, (path, package) in modules.items():
        found = []
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name.split(".")[0] == "llmpress"]
                targets = [t.removeprefix("llmpress").removeprefix(".") for t in targets]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = name.split(".") if name else []
                    base = base if package else base[:-1]
                    base = base[:len(base) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                elif node.module and node.module.split(".")[0] == "llmpress":
                    target = node.module.removeprefix("llmpress").removeprefix(".")
                else:
                    continue
                targets = [f"{target}.{a.name}".lstrip(".") if f"{target}.{a.name}".lstrip(".") in modules else target
                           for a in node.names]
            else:
                continue
            for target in targets:
                while target not in modules and "." in target:
                    target = target.rsplit(".", 1)[0]
                if target in modules and target != name:
                    found.append((target, node.lineno))
        edges[name] = found
    return edges


def _layer(module: str) -> int:
    best = max((p for p, _ in LAYERS if module == p or module.startswith(p + ".") or p == ""), key=len)
    return dict(LAYERS)[best]


def _cycles(edges: dict[str, list[tuple[str, int]]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w, _ in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in edges:
        if v not in index:
            visit(v)
    return found


def test_reader_sees_imports_inside_functions():
    edges = _imports()
    assert ("calib", 26) in [(t, n) for t, n in edges["engine"]] or any(t == "calib" for t, _ in edges["engine"])
    # a function-level import is an edge like any other (prune/owl imports nothing above it, but the reader
    # must find e.g. the lazy imports of the distill stage)
    assert any(t == "distill.trainer" for t, _ in edges["distill.stage"])


def test_no_import_cycles():
    assert _cycles(_imports()) == []


def test_orchestration_imports_no_method():
    bad = [f"llmpress.{m}:{line} imports llmpress.{t}" for m, found in _imports().items()
           if m in ("engine", "api", "cli", "recipe") for t, line in found if t.split(".")[0] in METHOD_PACKAGES]
    assert bad == []


def test_each_layer_imports_only_below():
    bad = [f"llmpress.{m} (layer {_layer(m)}) :{line} imports llmpress.{t} (layer {_layer(t)})"
           for m, found in _imports().items() for t, line in found if _layer(t) > _layer(m)]
    assert bad == []


@pytest.mark.parametrize("module", ["engine", "calib", "registry"])
def test_known_modules_are_placed(module):
    assert module in _modules() and _layer(module) != _layer("")
