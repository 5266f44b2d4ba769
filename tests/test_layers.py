"""The package's layers point one way: a module imports only from its own layer or below, and no
two modules import each other, directly or round a loop. Imports inside functions count.

The layer order (low to high) is the one `docs/architecture.md` gives; a module belongs to the
entry that names it or its package (`pipeline` is the package's own `__init__.py` only), so a new
module outside every entry fails `test_every_module_has_a_layer`.
Also: no function in `pipeline/` is longer than `MAX_FUNCTION_LINES`, none in the diagnosis package
(`pipeline/inference/diagnosis/`) longer than `DIAGNOSIS_FUNCTION_LINES`.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "pipeline"

LAYERS: tuple[tuple[str, ...], ...] = (
    ("pipeline", "pipeline.errors", "pipeline.io_utils", "pipeline.paths", "pipeline.quiet",
     "pipeline.workers"),
    ("pipeline.preprocessing", "pipeline.postprocessing", "pipeline.metrics", "pipeline.losses"),
    ("pipeline.data",),
    ("pipeline.volumes",),
    ("pipeline.models",),
    ("pipeline.inference",),
    ("pipeline.training",),
    ("pipeline.evaluation",),
    ("pipeline.quantization", "pipeline.benchmarks"),
    ("pipeline.commands",),
    ("pipeline.cli", "pipeline.__main__"),
)
MAX_FUNCTION_LINES = 80
DIAGNOSIS_FUNCTION_LINES = 60
DIAGNOSIS = "inference/diagnosis/"


def _modules() -> dict[str, Path]:
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path
    return modules


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """The project modules `name` imports anywhere in its file (`from a import b`: `a.b` when that
    is a module, else `a`)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base)
    return {m for m in found if m in MODULES and m != name}


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def layer_of(module: str) -> int:
    best = None
    for level, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            inside = module == prefix or (prefix != "pipeline" and module.startswith(prefix + "."))
            if inside and (
                best is None or len(prefix) > len(best[1])
            ):
                best = (level, prefix)
    assert best is not None, f"{module} is in no layer of LAYERS"
    return best[0]


def test_every_module_has_a_layer():
    for module in MODULES:
        layer_of(module)


def test_no_module_imports_from_a_higher_layer():
    upward = [
        f"{module} (layer {layer_of(module)}) imports {target} (layer {layer_of(target)})"
        for module, targets in GRAPH.items()
        for target in sorted(targets)
        if layer_of(target) > layer_of(module)
    ]
    assert not upward, "\n".join(upward)


def _cycle() -> list[str] | None:
    """One import cycle of GRAPH, or None (depth-first search)."""
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for target in sorted(GRAPH[node]):
            if state.get(target) == 1:
                return [*stack[stack.index(target):], target]
            if target not in state and (found := visit(target)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(GRAPH):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycles():
    cycle = _cycle()
    assert cycle is None, " -> ".join(cycle)


@pytest.mark.parametrize("source, expected", [
    ("from pipeline.data import splits", {"pipeline.data.splits"}),
    ("from .splits import SPLITS_FILE", {"pipeline.data.splits"}),
    ("def f():\n    import pipeline.paths", {"pipeline.paths"}),
])
def test_the_walk_sees_relative_and_function_level_imports(tmp_path, source, expected):
    path = tmp_path / "index.py"
    path.write_text(source, encoding="utf-8")
    assert _imports("pipeline.data.index", path) == expected


def test_the_cycle_check_finds_a_loop(monkeypatch):
    monkeypatch.setitem(GRAPH, "pipeline.errors", {"pipeline.paths"})  # paths imports errors
    assert _cycle() is not None


def test_no_function_is_longer_than_the_limit():
    long = []
    for path in MODULES.values():
        relative = path.relative_to(PACKAGE).as_posix()
        limit = DIAGNOSIS_FUNCTION_LINES if relative.startswith(DIAGNOSIS) else MAX_FUNCTION_LINES
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > limit:
                    long.append(f"{relative}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, "\n".join(long)
