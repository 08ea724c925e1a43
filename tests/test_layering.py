"""kvbm's import layering: no module imports a higher layer, and no two modules import each other.

The layers, lowest first, are :data:`LAYERS`; a module may import modules of its own layer or of
a lower one. Every import counts, the ones inside functions and ``TYPE_CHECKING`` blocks too: a
lazy import is still a dependency. Importing a package's submodule runs the package's
``__init__`` first; that implicit step is not an edge (an ``__init__`` that imports its own
submodules would otherwise close a circle with each of them).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "kvbm"

# Lowest first. A module belongs to the layer of the longest entry that names it or a package
# above it; "kvbm" names the package's own __init__ only, so a new top-level module must be placed.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("kvbm", "kvbm.config", "kvbm.hashing"),
    ("kvbm.ipc",),
    ("kvbm.leader", "kvbm.worker"),
    ("kvbm.connector",),
    ("kvbm.vllm_integration", "kvbm.trtllm_integration", "kvbm.sglang_integration"),
    ("kvbm.testing",),
    ("kvbm.bench", "kvbm.demo"),
    ("kvbm.cli", "kvbm.__main__"),
)


def _modules() -> dict[str, Path]:
    """Every module of the package, by dotted name (a package by its ``__init__``)."""
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """The kvbm modules ``name`` imports, anywhere in its body."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            # `from pkg import sub` imports the submodule; `from pkg import name` the package.
            subs = {f"{target}.{alias.name}" for alias in node.names} & MODULES.keys()
            out.update(subs)
            if len(subs) < len(node.names):
                out.add(target)
    return {m for m in out if m in MODULES and m != name}


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def layer(module: str) -> int:
    """The index of ``module``'s layer in :data:`LAYERS`."""
    best, found = -1, None
    for i, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            inside = module.startswith(prefix + ".") and prefix != "kvbm"
            if (module == prefix or inside) and len(prefix) > best:
                best, found = len(prefix), i
    assert found is not None, f"{module} is in no layer of LAYERS"
    return found


def test_every_kvbm_import_names_a_module_that_exists() -> None:
    """A lazy import of a moved or deleted module fails only when its function runs: catch it here."""
    missing = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                       [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            missing += [f"{name} imports {t}" for t in targets
                        if (t == "kvbm" or t.startswith("kvbm.")) and t not in MODULES]
    assert missing == []


def test_every_module_has_a_layer() -> None:
    for module in MODULES:
        layer(module)


def test_no_import_runs_up_a_layer() -> None:
    upward = sorted(f"{a} (layer {layer(a)}) imports {b} (layer {layer(b)})"
                    for a, targets in GRAPH.items() for b in targets if layer(b) > layer(a))
    assert upward == []


def _cycle() -> list[str] | None:
    """One circle of imports between kvbm's modules, or None (depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        path.append(module)
        for target in sorted(GRAPH[module]):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state and (found := visit(target)) is not None:
                return found
        path.pop()
        state[module] = 2
        return None

    for module in sorted(GRAPH):
        if module not in state and (found := visit(module)) is not None:
            return found
    return None


def test_no_two_modules_import_each_other() -> None:
    circle = _cycle()
    assert circle is None, "import circle: " + " -> ".join(circle or [])


@pytest.mark.parametrize("source, expected", [
    ("import kvbm.testing.sim.engine", {"kvbm.testing.sim.engine"}),
    ("from kvbm.testing import cpu_env", {"kvbm.testing.cpu_env"}),
    ("from kvbm.ipc.stats import LeaderStats", {"kvbm.ipc.stats"}),
    ("def f():\n    from kvbm.demo import report", {"kvbm.demo.report"}),
    ("from . import ops", {"kvbm.connector.ops"}),
    ("from .. import config", {"kvbm.config"}),
])
def test_the_parser_sees_every_form_of_import(tmp_path: Path, source: str, expected: set[str]) -> None:
    """The checks above are only as good as this: absolute, relative and lazy imports all count."""
    path = tmp_path / "planner.py"
    path.write_text(source)
    assert _imports("kvbm.connector.planner", path) == expected
