"""The installable package: the top-level API, its laziness, and the requirements wheels carry."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
PUBLIC = {"kd_loss", "KDLoss", "DistillStep", "ImageLoader", "build_teacher", "build_student", "build_learner",
          "get_tokenizer", "teacher_class_vectors", "teacher_transform", "student_transform"}


def _python(code: str, cwd: Path, env: dict | None = None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} if env is None else env
    proc = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().splitlines()[-1]


def test_import_clipdistill_loads_neither_the_engine_nor_open_clip(tmp_path):
    loaded = json.loads(_python(
        "import sys, json, clipdistill, clipdistill.kernels\n"
        "heavy = ('clipdistill.engine', 'clipdistill.loaders', 'open_clip', 'torchvision')\n"
        "print(json.dumps({name: name in sys.modules for name in heavy}))",
        tmp_path,
    ))
    assert not any(loaded.values()), loaded


def test_public_api_is_lazy_and_complete():
    import clipdistill

    assert set(clipdistill.__all__) == PUBLIC
    assert PUBLIC <= set(dir(clipdistill))
    for name in sorted(PUBLIC):
        value = getattr(clipdistill, name)
        assert value.__module__.startswith("clipdistill."), (name, value.__module__)
        assert value.__name__ == name
    from clipdistill.engine.distill.step import DistillStep
    from clipdistill.kernels import kd_loss

    assert clipdistill.DistillStep is DistillStep and clipdistill.kd_loss is kd_loss
    with pytest.raises(AttributeError, match="no attribute 'no_such_name'"):
        clipdistill.no_such_name


def test_version_is_the_installed_distributions():
    import clipdistill
    import clipdistill.engine

    assert re.fullmatch(r"\d+\.\d+\.\d+", clipdistill.__version__)
    assert clipdistill.__version__ == metadata.version("clipdistill") == clipdistill.engine.__version__


def test_top_level_package_is_typed_and_ships():
    import clipdistill

    package = Path(clipdistill.__file__).parent
    assert (package / "py.typed").is_file()
    assert (REPO_ROOT / "LICENSE").read_text(encoding="utf-8").lstrip().startswith("Apache License")


def _metadata(hook: str, out: Path, env: dict) -> list[str]:
    """Requires-Dist lines of the metadata that the build backend's ``hook`` writes."""
    out.mkdir()
    name = _python(f"import _build_backend as b; print(b.{hook}({str(out)!r}))", REPO_ROOT, env)
    text = (out / name / "METADATA").read_text(encoding="utf-8")
    return [line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("Requires-Dist:")]


def test_wheels_are_loose_and_editable_installs_keep_the_installed_torch(tmp_path):
    """A wheel (or sdist) names no torchvision: it travels to other environments and pip's wheel cache.
    An editable install, built for this environment, narrows torchvision to this torch's release."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "CLIPDISTILL_LOOSE_REQUIREMENTS", "CLIPDISTILL_BUILD_FOR_THIS_ENVIRONMENT")}
    wheel = _metadata("prepare_metadata_for_build_wheel", tmp_path / "wheel", env)
    editable = _metadata("prepare_metadata_for_build_editable", tmp_path / "editable", env)
    assert any(r.startswith("torch>=") for r in wheel) and any(r.startswith("open_clip_torch") for r in wheel)
    assert not [r for r in wheel if r.startswith("torchvision")], wheel
    minor = int(metadata.version("torch").split(".")[1])
    assert f"torchvision<0.{minor + 16},>=0.{minor + 15}" in editable, editable
    assert set(editable) - set(wheel) == {f"torchvision<0.{minor + 16},>=0.{minor + 15}"}
    loose = _metadata("prepare_metadata_for_build_editable", tmp_path / "loose",
                      {**env, "CLIPDISTILL_LOOSE_REQUIREMENTS": "1"})
    assert loose == wheel


def test_importing_the_engine_makes_torchvision_importable(tmp_path):
    """No explicit call: ``import clipdistill.engine`` applies the torchvision measure, so packages that
    import torchvision afterwards (open_clip, Lightning, transformers) work next to a CPU torch too."""
    state = _python(
        "import clipdistill.engine\n"
        "import torchvision\n"
        "from torchvision import transforms\n"
        "from clipdistill.engine._torchvision_compat import ensure_torchvision_importable\n"
        "print(ensure_torchvision_importable())",
        tmp_path,
    )
    assert state in ("native", "shimmed")


def test_pillow_requirement_opens_16_bit_grey_png_as_i16():
    """Pillow before 10.3 opens a 16-bit grey PNG as mode I, which the loaders refuse (formats.REFUSED_MODES)."""
    import ast

    tree = ast.parse((REPO_ROOT / "setup.py").read_text())
    requirements = next(ast.literal_eval(node.value) for node in tree.body if isinstance(node, ast.Assign)
                        and any(getattr(t, "id", None) == "REQUIREMENTS" for t in node.targets))
    pillow = [r for r in requirements if re.match(r"pillow\b", r, re.I)]
    assert len(pillow) == 1, requirements
    floor = re.search(r">=\s*([\d.]+)", pillow[0])
    assert floor and tuple(int(p) for p in floor.group(1).split(".")) >= (10, 3), pillow[0]
