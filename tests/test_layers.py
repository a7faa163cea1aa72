"""The import graph keeps the layers honest: no cycles, imports at module top, one direction.

Parses the source of ``engine/``, ``kernels/`` and ``loaders/`` (no import is executed) and
fails on:

- an import inside a function, unless it is of an optional heavy dependency (the list below,
  each with its reason);
- any import cycle, counting that importing ``a.b.c`` first runs the packages ``a.b`` and ``a``;
- ``kernels/`` importing ``engine/`` or ``loaders/``; ``loaders/`` importing ``engine/`` or
  ``kernels/``;
- anything under ``engine/`` importing ``benchmarks/`` (by name or by file path);
- ``engine/commands/`` (or ``engine/cli.py``) imported by anything below it;
- anything importing one of the one-release re-export shims at the old module paths.
"""
from __future__ import annotations

import ast
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"engine": "clipdistill.engine", "kernels": "clipdistill.kernels", "loaders": "clipdistill.loaders"}

# Imports that may sit inside a function, and why.
LAZY_ALLOWED = {
    "open_clip": "heavy; needs the torchvision measure of engine._torchvision_compat first",
    "timm": "imports torchvision: needs the same measure first",
    "torchvision": "CUDA builds fail to import next to a CPU torch until the measure has run",
    "nvidia.dali": "optional (extras dali-cuda12/13), large",
    "deepspeed": "optional (extra deepspeed), slow to import",
    "diffusers": "optional (extra datafree)",
    "matplotlib": "optional (extra plots)",
    "torch.utils.tensorboard": "optional: needs the tensorboard package",
}

# Old module paths kept for one release as re-export shims (see each file's docstring).
SHIMS = {
    "clipdistill.engine.train", "clipdistill.engine.step", "clipdistill.engine.recipes",
    "clipdistill.engine.checkpoint", "clipdistill.engine.class_vectors", "clipdistill.engine.towers",
    "clipdistill.engine.distributed", "clipdistill.engine.batchnorm", "clipdistill.engine.evaluate",
    "clipdistill.engine.export", "clipdistill.engine.teacher_cache", "clipdistill.engine.tune_teacher",
    "clipdistill.engine.demo", "clipdistill.engine.datafree.cli",
    "clipdistill.loaders.dali_backend", "clipdistill.loaders.torch_backend",
}
COMMANDS = ("clipdistill.engine.commands", "clipdistill.engine.cli")


@dataclass
class Module:
    name: str
    path: Path
    is_package: bool
    imports: list[tuple[str, int, bool]] = field(default_factory=list)  # (target, line, inside a function)
    loads_by_path: list[int] = field(default_factory=list)  # lines calling spec_from_file_location


def _module_name(root: Path, path: Path, packages: dict[str, str]) -> tuple[str, bool]:
    parts = list(path.relative_to(root).with_suffix("").parts)
    parts[0] = packages[parts[0]]
    is_package = parts[-1] == "__init__"
    if is_package:
        parts = parts[:-1]
    return ".".join(parts), is_package


def scan(root: Path, packages: dict[str, str]) -> dict[str, Module]:
    """Every module under ``root``'s package folders with the imports its source states."""
    modules: dict[str, Module] = {}
    for folder in packages:
        for path in sorted((root / folder).rglob("*.py")):
            name, is_package = _module_name(root, path, packages)
            modules[name] = Module(name, path, is_package)
    for module in modules.values():
        tree = ast.parse(module.path.read_text(encoding="utf-8"), filename=str(module.path))
        _collect(tree, module, modules, inside=False)
    return modules


def _collect(node: ast.AST, module: Module, modules: dict[str, Module], inside: bool) -> None:
    for child in ast.iter_child_nodes(node):
        child_inside = inside or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        if isinstance(child, ast.Import):
            for alias in child.names:
                module.imports.append((alias.name, child.lineno, inside))
        elif isinstance(child, ast.ImportFrom):
            base = child.module or ""
            if child.level:
                anchor = module.name.split(".")
                if not module.is_package:
                    anchor = anchor[:-1]
                anchor = anchor[: len(anchor) - (child.level - 1)]
                base = ".".join(anchor + ([child.module] if child.module else []))
            for alias in child.names:
                candidate = f"{base}.{alias.name}"
                module.imports.append((candidate if candidate in modules else base, child.lineno, inside))
        elif isinstance(child, ast.Call):
            func = child.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if called == "spec_from_file_location":
                module.loads_by_path.append(child.lineno)
        _collect(child, module, modules, child_inside)


def _ours(target: str) -> bool:
    return target == "clipdistill" or target.startswith("clipdistill.")


def _edges(modules: dict[str, Module]) -> dict[str, set[str]]:
    """Import edges among our modules; importing a.b.c also runs the packages a.b and a."""
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for module in modules.values():
        for target, _, _ in module.imports:
            if not _ours(target):
                continue
            parts = target.split(".")
            for end in range(len(parts), 1, -1):
                prefix = ".".join(parts[:end])
                if prefix in modules and prefix != module.name and not module.name.startswith(prefix + "."):
                    graph[module.name].add(prefix)
    return graph


def cycles(modules: dict[str, Module]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    graph = _edges(modules)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def violations(modules: dict[str, Module]) -> list[str]:
    """Every broken layering rule, one line each, naming the file and line."""
    problems: list[str] = []
    for module in modules.values():
        where = module.path.name if module.path.parent.name in PACKAGES else str(module.path)
        layer = module.name.split(".")[1] if module.name.count(".") >= 1 else module.name
        is_shim = module.name in SHIMS
        for target, line, inside in module.imports:
            if inside and not target.startswith(tuple(LAZY_ALLOWED)):
                problems.append(f"{module.path}:{line}: import of {target} inside a function")
            if not _ours(target):
                if layer == "engine" and (target == "benchmarks" or target.startswith("benchmarks.")):
                    problems.append(f"{module.path}:{line}: the product imports the benchmarks ({target})")
                continue
            target_layer = target.split(".")[1] if target.count(".") >= 1 else ""
            if layer == "kernels" and target_layer in ("engine", "loaders"):
                problems.append(f"{module.path}:{line}: kernels/ imports {target}")
            if layer == "loaders" and target_layer in ("engine", "kernels"):
                problems.append(f"{module.path}:{line}: loaders/ imports {target}")
            if target.startswith(COMMANDS) and not module.name.startswith(COMMANDS) and not is_shim:
                problems.append(f"{module.path}:{line}: {module.name} imports the command layer ({target})")
            if target in SHIMS and not is_shim:
                problems.append(f"{module.path}:{line}: imports the old-path shim {target}; import the new module")
        if layer == "engine" and module.loads_by_path:
            problems.append(f"{where}:{module.loads_by_path[0]}: loads a module by file path (benchmarks?)")
    return problems


# ------------------------------------------------------------------------------------ the tree


@pytest.fixture(scope="module")
def tree() -> dict[str, Module]:
    return scan(REPO_ROOT, PACKAGES)


def test_no_import_cycles(tree):
    found = cycles(tree)
    assert not found, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_layering_rules(tree):
    problems = violations(tree)
    assert not problems, f"{len(problems)} layering problems:\n" + "\n".join(problems)


def test_every_shim_exists_and_is_only_a_shim(tree):
    for name in SHIMS:
        assert name in tree, f"shim {name} is listed but missing"
        source = tree[name].path.read_text(encoding="utf-8")
        assert "one release" in source, f"{name}: a shim says in its docstring that it goes after one release"
        body = ast.parse(source).body
        defs = [n for n in body if isinstance(n, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))]
        assert not defs, f"{name} defines {[d.name for d in defs]}: a shim re-exports, it holds no code"


def test_engine_subpackages_exist(tree):
    for sub in ("config", "models", "prompts", "distill", "training", "parallel", "commands", "evaluation"):
        assert f"clipdistill.engine.{sub}" in tree, f"engine/{sub}/ has no __init__.py"
    assert "clipdistill.engine.io" in tree
    assert "clipdistill.loaders.plan" in tree and "clipdistill.loaders.backends" in tree


# ------------------------------------------------------------------------------------ the checker itself


def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text), encoding="utf-8")


def test_checker_finds_a_cycle_through_a_package_init(tmp_path):
    _write(tmp_path, {
        "engine/__init__.py": "",
        "engine/a/__init__.py": "from clipdistill.engine.b import thing\n",
        "engine/a/x.py": "X = 1\n",
        "engine/b.py": "from clipdistill.engine.a.x import X\nthing = X\n",
    })
    found = cycles(scan(tmp_path, {"engine": "clipdistill.engine"}))
    assert found == [["clipdistill.engine.a", "clipdistill.engine.b"]]


def test_checker_finds_each_kind_of_violation(tmp_path):
    _write(tmp_path, {
        "engine/__init__.py": "",
        "engine/commands/__init__.py": "",
        "engine/commands/run.py": "import clipdistill.engine.low\n",
        "engine/low.py": """\
            import importlib.util
            from clipdistill.engine.commands import run
            import benchmarks.harness

            def f():
                import json
                import open_clip
                return importlib.util.spec_from_file_location("h", "benchmarks/harness.py")
            """,
        "kernels/__init__.py": "from clipdistill.engine import low\n",
        "loaders/__init__.py": "from clipdistill.kernels import x\n",
    })
    problems = violations(scan(tmp_path, PACKAGES))
    text = "\n".join(problems)
    assert "import of json inside a function" in text
    assert "open_clip" not in text
    assert "imports the command layer" in text
    assert "the product imports the benchmarks" in text
    assert "loads a module by file path" in text
    assert "kernels/ imports clipdistill.engine" in text
    assert "loaders/ imports clipdistill.kernels" in text
