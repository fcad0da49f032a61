"""The package's layering (docs/architecture.md) as a test: which layer may import which, no
import cycles, light imports, and no function or module grown past what one reads at once."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).parents[1] / "src" / "compensator"

# What each layer may import (besides itself). Bottom up: leaf value types and helpers;
# quant (specs, grids, packing); runtime modules and model adapters; the maths (pure
# functions handed their statistics); steps (configs wiring maths to statistics); recipes;
# the engine; formats, data and evaluation; the face (api, cli, demo) may import anything.
LEAF = {"errors", "types", "linalg", "parallel", "kernels"}
ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "kernels": set(),
    "parallel": {"errors"},
    "types": {"parallel"},
    "linalg": set(),
    "quant": LEAF,
    "nn": LEAF | {"quant"},
    "models": LEAF,
    "rounders": LEAF | {"quant"},
    "correctors": LEAF | {"quant"},
    "transforms": LEAF | {"quant", "nn"},
    "learn": LEAF | {"quant", "nn"},
    "steps": LEAF | {"quant", "nn", "models", "rounders", "correctors", "transforms", "learn"},
    "recipes": LEAF | {"quant", "steps"},
    "pipeline": LEAF | {"quant", "nn", "models", "steps", "recipes"},
    "io": LEAF | {"quant", "nn", "models"},
    "data": LEAF,
    "evaluate": LEAF,
    "tasks": LEAF,
    "tune": LEAF | {"quant", "nn", "models", "pipeline", "io", "data"},
}
FACE = {
    "__init__",
    "__main__",
    "api",
    "cli",
    "cli_compare",
    "cli_finetune",
    "api_tune",
    "cli_options",
    "demo",
    "plan",
    "compare",
}
MAX_FUNCTION_LINES = 80
MAX_MODULE_LINES = 400


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(SRC.rglob("*.py")):
        parts = path.relative_to(SRC.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


MODULES = _modules()


def _layer(module: str) -> str:
    parts = module.split(".")
    return "__init__" if len(parts) == 1 else parts[1]


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(module: str) -> list[tuple[str, bool]]:
    """(imported compensator module, whether it runs at import time) for every import
    statement, in functions and under TYPE_CHECKING too."""
    tree = ast.parse(MODULES[module].read_text())
    found: list[tuple[str, bool]] = []

    def visit(node: ast.AST, runtime: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for sub in child.body:
                    visit_one(sub, False)
                for sub in child.orelse:
                    visit_one(sub, runtime)
                continue
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
                visit(child, False)
                continue
            visit_one(child, runtime)

    def visit_one(node: ast.AST, runtime: bool) -> None:
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            if name.split(".")[0] == "compensator" and name in MODULES:
                found.append((name, runtime))
        visit(node, runtime)

    visit(tree, True)
    return found


def test_every_layer_imports_only_what_it_may() -> None:
    wrong = []
    for module in MODULES:
        layer = _layer(module)
        if layer in FACE:
            continue
        assert layer in ALLOWED, f"{module}: layer {layer!r} is not in the layering table"
        for target, _ in _imports(module):
            other = _layer(target)
            if other != layer and other not in ALLOWED[layer]:
                wrong.append(f"{module} imports {target} ({layer} -> {other})")
    assert not wrong, "forbidden imports:\n" + "\n".join(wrong)


def test_no_import_cycles() -> None:
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for module in MODULES:
        for target, runtime in _imports(module):
            if runtime and target != module and not module.startswith(target + "."):
                graph[module].add(target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def strongconnect(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in graph:
        if v not in index:
            strongconnect(v)
    assert not cycles, f"import cycles: {cycles}"


def test_the_layering_test_sees_a_forbidden_import(tmp_path: Path) -> None:
    # The checker itself: a maths module importing the engine is caught.
    MODULES["compensator.rounders._probe"] = tmp_path / "probe.py"
    (tmp_path / "probe.py").write_text("from compensator.pipeline.runner import run_pipeline\n")
    try:
        with pytest.raises(AssertionError, match="rounders -> pipeline"):
            test_every_layer_imports_only_what_it_may()
    finally:
        del MODULES["compensator.rounders._probe"]


@pytest.mark.parametrize(
    ("statement", "absent"),
    [
        ("import compensator", ("torch", "transformers", "compensator.api")),
        ("import compensator.quant", ("transformers", "compensator.pipeline", "compensator.api")),
        ("import compensator.rounders", ("transformers", "compensator.pipeline")),
        ("import compensator.steps", ("transformers", "compensator.pipeline")),
    ],
)
def test_imports_stay_light(statement: str, absent: tuple[str, ...]) -> None:
    code = f"import sys; {statement}; print(' '.join(m for m in {absent!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"{statement} imported {out.stdout.strip()}"


def test_functions_and_modules_stay_small() -> None:
    big = []
    for module, path in MODULES.items():
        text = path.read_text()
        if len(text.splitlines()) > MAX_MODULE_LINES:
            big.append(f"{module}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = node.end_lineno - node.lineno + 1  # type: ignore[operator]
                if n > MAX_FUNCTION_LINES:
                    big.append(f"{module}.{node.name}: {n} lines")
    assert not big, "split these:\n" + "\n".join(big)
