"""Tiny random-init open_clip models for the engine's tests (no network, no weights)."""
from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import pytest
import torch

from clipdistill.engine.models import TINY_STUDENT as STUDENT
from clipdistill.engine.models import TINY_TEACHER as TEACHER

CLASS_NAMES = ["cat", "golden retriever", "sea lion", "x-wing fighter", "tulip"]  # C = 5, a prime
SHAPE_CLASSES = ["circle", "square", "triangle", "cross", "ring"]  # the demo's shapes, in its order

_spec = importlib.util.spec_from_file_location("_run_config", Path(__file__).with_name("_run_config.py"))
_run_config = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_run_config)


@pytest.fixture(scope="session")
def class_names() -> list[str]:
    return list(CLASS_NAMES)


@pytest.fixture(scope="session")
def _student_clip():
    from clipdistill.engine.models import load_clip

    torch.manual_seed(0)
    return load_clip(STUDENT, None)


@pytest.fixture(scope="session")
def _teacher_clip():
    from clipdistill.engine.models import load_clip

    torch.manual_seed(1)
    return load_clip(TEACHER, None)


@pytest.fixture
def student_clip(_student_clip):
    """A fresh copy per test: learners freeze it in place."""
    return copy.deepcopy(_student_clip)


@pytest.fixture
def teacher_clip(_teacher_clip):
    return copy.deepcopy(_teacher_clip)


@pytest.fixture(scope="session")
def tokenizer():
    from clipdistill.engine.models import get_tokenizer

    return get_tokenizer(STUDENT)


@pytest.fixture
def images():
    # Seeded: a test's outcome must not depend on which tests ran before it (the global stream).
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def write_shape_folder(root, classes: list[str], count: int, side: int):
    """``root/images/*.jpg``: ``count`` demo shapes cycling over ``classes``; ``root/classes.txt``."""
    import numpy as np
    from PIL import Image

    from clipdistill.engine.commands.demo import render_image

    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    for i in range(count):
        image = render_image(i % len(classes), rng, side=side)
        Image.fromarray(image).save(root / "images" / f"{i:03d}.jpg", quality=90)
    (root / "classes.txt").write_text("\n".join(classes) + "\n")
    return root


@pytest.fixture(scope="session")
def shape_folder(tmp_path_factory):
    """A factory: ``shape_folder(name, classes, count, side)`` -> a folder of generated shape JPEGs."""
    return lambda name, classes, count, side: write_shape_folder(tmp_path_factory.mktemp(name), classes, count, side)


def _forbid_everywhere(monkeypatch, function, message: str) -> int:
    """Replace ``function`` in every loaded clipdistill module that holds it; return how many.

    Modules import functions by name at their top, so a patch must reach each holder, not only
    the module that defines the function.
    """
    import sys

    def refuse(*args, **kwargs):
        raise AssertionError(message)

    holders = 0
    for name, module in list(sys.modules.items()):
        if not name.startswith("clipdistill.") or module is None:
            continue
        for attr, value in list(vars(module).items()):
            if value is function:
                monkeypatch.setattr(module, attr, refuse)
                holders += 1
    assert holders, f"{function.__qualname__} is held by no loaded clipdistill module"
    return holders


@pytest.fixture
def forbid(monkeypatch):
    """``forbid(function, message)``: calling ``function`` from any clipdistill module fails the test."""
    return lambda function, message: _forbid_everywhere(monkeypatch, function, message)


@pytest.fixture(scope="session")
def shape_data(shape_folder) -> Path:
    """20 small generated JPEGs of the demo's five shapes and a class-name file: a tiny run's data."""
    return shape_folder("train_data", SHAPE_CLASSES, 20, 40)


@pytest.fixture(scope="session")
def tiny_run_config():
    """A factory: ``tiny_run_config(data_dir, out_dir, **sections)`` -> a tiny KDPL run's config dict.

    See ``_run_config.tiny_run_config``: a dict updates a section, ``None`` drops it.
    """
    return _run_config.tiny_run_config
