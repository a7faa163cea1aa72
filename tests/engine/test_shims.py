"""The old import paths (one release of re-export shims) and the documented entry points still work."""
from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

ENGINE = Path(__file__).resolve().parents[2] / "engine"
# old module -> (the file it was, the modules its names now live in)
SHIMS = {
    "train": ("training.trainer", "training.builder", "training.schedule", "io", "commands.distill"),
    "step": ("distill.step",),
    "recipes": ("config.run",),
    "checkpoint": ("training.checkpoint",),
    "class_vectors": ("models.class_vectors",),
    "towers": ("models.towers",),
    "distributed": ("parallel.launch", "parallel.zero", "parallel.batchnorm"),
    "batchnorm": ("parallel.batchnorm",),
    "evaluate": ("evaluation.evaluate", "distill.metrics", "commands.evaluate"),
    "export": ("evaluation.export", "commands.export"),
    "teacher_cache": ("training.teacher_cache", "commands.cache_teacher"),
    "tune_teacher": ("training.tune_teacher", "models.tuned", "commands.tune_teacher"),
    "demo": ("commands.demo",),
    "datafree.cli": ("commands.datafree",),
}
# Old public names that were renamed where they now live.
RENAMED = {("train", "_image_preprocess"): ("io", "image_spec"),
           ("export", "build_learner"): ("evaluation.export", "rebuild_learner"),
           ("export", "image_preprocess"): ("io", "image_spec")}


def _old_public_names(old: str) -> list[str]:
    """Public top-level names of the old module, as written in the shim's __all__."""
    shim = importlib.import_module(f"clipdistill.engine.{old}")
    return list(shim.__all__)


@pytest.mark.parametrize("old", sorted(SHIMS), ids=lambda old: f"engine.{old}")
def test_shim_reexports_the_same_objects(old):
    shim = importlib.import_module(f"clipdistill.engine.{old}")
    homes = [importlib.import_module(f"clipdistill.engine.{m}") for m in SHIMS[old]]
    names = _old_public_names(old)
    assert names, f"{old}: the shim exports nothing"
    for name in names:
        if (old, name) in RENAMED:
            module, real = RENAMED[(old, name)]
            assert getattr(shim, name) is getattr(importlib.import_module(f"clipdistill.engine.{module}"), real)
            continue
        owners = [h for h in homes if getattr(h, name, None) is getattr(shim, name)]
        assert owners, f"clipdistill.engine.{old}.{name} is not the object of any of {SHIMS[old]}"


def test_shims_cover_every_public_name_the_old_modules_had():
    # The names each old module defined at eeb4a4a (before the split), less private ones.
    expected = {
        "train": {"NonFiniteLossError", "read_class_names", "read_templates", "resolve_device", "lr_at", "Run",
                  "build_run", "Trainer", "distill", "register"},
        "step": {"Recipe", "symmetric_kl_from_logits", "DistillStep"},
        "tune_teacher": {"FORMAT", "ON_SHORT_CLASS", "TuneTeacherInputError", "ShotSelection", "draw_shots",
                         "TuneSettings", "TuneResult", "tune_teacher", "TunedTeacher", "load_tuned_teacher",
                         "tuned_teacher_class_vectors", "read_tuned_header", "save_tuned_teacher",
                         "labeled_accuracy", "register"},
    }
    for old, names in expected.items():
        assert names <= set(_old_public_names(old)), f"{old} lost {sorted(names - set(_old_public_names(old)))}"


def test_packages_at_old_module_paths_keep_their_names():
    from clipdistill.engine import config, models, prompts
    from clipdistill.engine.config import schema
    from clipdistill.engine.models import clip
    from clipdistill.engine.prompts import learners, registry

    assert config.ConfigError is schema.ConfigError and config.from_dict is schema.from_dict
    assert models.build_teacher is clip.build_teacher and models.TINY_TEACHER == "clipdistill-tiny-teacher"
    assert models.import_open_clip is clip.import_open_clip
    assert prompts.CoOp is learners.CoOp and prompts.build_learner is registry.build_learner
    assert prompts.LEARNERS is registry.LEARNERS


def test_every_shim_file_is_listed_here():
    listed = {f"{o.replace('.', '/')}.py" for o in SHIMS}
    found = set()
    for path in ENGINE.rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        doc = ast.get_docstring(ast.parse(text)) or ""
        if "re-export shim, kept for one release" in doc:
            found.add(str(path.relative_to(ENGINE)))
    assert found == listed


@pytest.mark.parametrize("argv, expect", [
    (["-m", "clipdistill.engine.cli", "--version"], "clipdistill "),
    (["-m", "clipdistill.engine.vocabulary", "--help"], "usage"),
])
def test_module_entry_points_run(argv, expect):
    proc = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert expect in proc.stdout


def test_console_script_points_at_cli_main():
    from importlib.metadata import entry_points

    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "clipdistill"]
    assert script.value == "clipdistill.engine.cli:main"
    from clipdistill.engine.cli import main

    assert script.load() is main


def test_readme_embedding_example_names_resolve():
    import re

    import clipdistill

    readme = (ENGINE.parent / "README.md").read_text(encoding="utf-8")
    block = readme.split("### Embedding", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    assert "import clipdistill as cd" in block
    used = set(re.findall(r"\bcd\.([A-Za-z_]\w*)", block))
    assert len(used) >= 6, used
    for name in sorted(used):  # every name the example uses is in the public API and resolves
        assert name in clipdistill.__all__, name
        assert getattr(clipdistill, name) is not None
