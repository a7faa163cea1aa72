"""The tiny run configuration the engine's tests share (loaded by path: tests are not a package).

Tests get it through the ``tiny_run_config`` fixture of ``conftest.py``; a test module whose
module-level helpers need it loads this file the way ``_gloo.py`` is loaded.
"""
from __future__ import annotations

from pathlib import Path


def tiny_run_config(data_dir: Path, out_dir: Path, **sections) -> dict:
    """A KDPL + CoOp run of the tiny models on ``data_dir/images`` (class names in ``data_dir/classes.txt``).

    Each keyword names a section: a dict updates that section's keys, ``None`` leaves the section out
    (the schema's defaults), anything else replaces it (``recipe="promptkd"``).
    """
    base = {
        "recipe": "kdpl",
        "teacher": {"name": "clipdistill-tiny-teacher", "weights": None},
        "student": {"name": "clipdistill-tiny-student", "weights": None},
        "learner": {"kind": "coop", "options": {"n_ctx": 2, "init_words": None}},
        "data": {"train": str(data_dir / "images"), "class_names": str(data_dir / "classes.txt"),
                 "templates": "generic", "batch_size": 8, "backend": "torch", "workers": 0,
                 "interpolation": "bilinear"},
        "optim": {"lr": 0.01, "warmup_steps": 1},
        "train": {"epochs": 1, "max_steps": 3, "device": "cpu", "out_dir": str(out_dir), "log_every": 1,
                  "checkpoint_every": 2, "progress": False, "seed": 0},
    }
    for key, value in sections.items():
        if value is None:
            base.pop(key, None)
        else:
            base[key] = {**base.get(key, {}), **value} if isinstance(value, dict) else value
    return base
