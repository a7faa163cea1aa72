"""The loaders' import graph: plan.py is a leaf the backends import; no cycles; no hidden imports.

Parses the sources (imports nothing of ours to find the graph), so it also guards
modules no test imports.
"""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

import clipdistill.loaders as loaders_package
from clipdistill.loaders.backends import torch as torch_backend_module

ROOT = Path(loaders_package.__file__).resolve().parent
PACKAGE = "clipdistill.loaders"
# The optional heavy dependencies a function may import (only when it needs them).
LAZY_OK = ("nvidia.dali",)


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join([PACKAGE, *parts])] = path
    return out


def _resolve(module: str, path: Path, node: ast.ImportFrom) -> list[str]:
    """The modules of ours an ``import from`` names (``from . import formats`` -> the formats module)."""
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    if node.level:
        base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
        base = f"{base}.{node.module}" if node.module else base
    else:
        base = node.module or ""
    return [base, *(f"{base}.{alias.name}" for alias in node.names)]


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    graph = {}
    for module, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom):
                deps.update(name for name in _resolve(module, path, node) if name in modules)
            elif isinstance(node, ast.Import):
                deps.update(alias.name for alias in node.names if alias.name in modules)
        graph[module] = {d for d in deps if d != module}
    return graph


def test_graph_finds_the_modules():
    graph = _graph()
    assert {f"{PACKAGE}.plan", f"{PACKAGE}.loader", f"{PACKAGE}.backends.dali",
            f"{PACKAGE}.backends.torch"} <= set(graph)
    assert f"{PACKAGE}.plan" in graph[f"{PACKAGE}.backends.torch"]
    assert f"{PACKAGE}.backends.dali" in graph[f"{PACKAGE}.loader"]


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for dep in sorted(graph.get(module, ())):
            if state.get(dep) == 1:
                cycle = path[path.index(dep):] + [dep] if dep in path else [module, dep]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep, path + [dep])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_plan_and_backends_never_import_the_loader():
    graph = _graph()
    importers = [m for m in graph if m == f"{PACKAGE}.plan" or m.startswith(f"{PACKAGE}.backends")]
    assert importers
    for module in importers:
        assert f"{PACKAGE}.loader" not in graph[module], module
    # ``from . import formats`` also names the package, whose __init__ imports nothing eagerly.
    assert graph[f"{PACKAGE}.plan"] <= {PACKAGE, f"{PACKAGE}.formats", f"{PACKAGE}.sources", f"{PACKAGE}.views"}


def test_only_optional_heavy_imports_are_inside_functions():
    found = []
    for module, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for inner in ast.walk(node):
                if isinstance(inner, ast.Import):
                    names = [alias.name for alias in inner.names]
                elif isinstance(inner, ast.ImportFrom):
                    names = ["." * inner.level + (inner.module or "")]
                else:
                    continue
                found += [f"{module}:{inner.lineno} {n}" for n in names if not n.startswith(LAZY_OK)]
    assert not found, "imports inside functions (move them to the module top): " + ", ".join(found)


def test_backends_torch_module_uses_pytorch():
    # A module named torch inside our package must not shadow PyTorch (imports are absolute).
    assert torch_backend_module.torch is torch
    assert torch_backend_module.__name__ == f"{PACKAGE}.backends.torch"


def test_importing_the_loader_does_not_import_dali(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    code = ("import json, sys\n"
            "import clipdistill.loaders.loader, clipdistill.loaders.backends.dali\n"
            "print(json.dumps(sorted(m for m in sys.modules if m.startswith('nvidia.dali'))))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []
