"""The old import paths (kept for one release) give the very objects of the new modules."""
from __future__ import annotations

import importlib

import pytest

from clipdistill.loaders import plan
from clipdistill.loaders.backends import dali, torch as torch_backend_module

# Every public name loader.py defined before plan.py and backends/ were split out of it.
LOADER_NAMES = ["CLIP_MEAN", "CLIP_STD", "BACKENDS", "INTERPOLATIONS", "OutputSpec", "Reject", "StepPlan", "Batch",
                "Planner", "dali_available", "resolve_backend", "normalize_hwc_uint8", "ImageLoader", "logger"]
MOVED_TO_PLAN = ["CLIP_MEAN", "CLIP_STD", "OutputSpec", "Reject", "StepPlan", "Planner", "normalize_hwc_uint8"]


@pytest.mark.parametrize("name", LOADER_NAMES)
def test_loader_module_keeps_its_names(name):
    loader = importlib.import_module("clipdistill.loaders.loader")
    assert getattr(loader, name) is not None


@pytest.mark.parametrize("name", MOVED_TO_PLAN)
def test_loader_reexports_the_plan_objects(name):
    loader = importlib.import_module("clipdistill.loaders.loader")
    assert getattr(loader, name) is getattr(plan, name)


@pytest.mark.parametrize("old, new, names", [
    ("clipdistill.loaders.dali_backend", dali, ["DaliBackend", "StepPlan"]),
    ("clipdistill.loaders.torch_backend", torch_backend_module,
     ["TorchBackend", "StepPlan", "decode_plan", "to_images", "normalize_hwc_uint8"]),
])
def test_old_backend_modules_reexport_the_moved_objects(old, new, names):
    shim = importlib.import_module(old)
    assert shim.__doc__.startswith("Shim for one release")
    for name in names:
        assert getattr(shim, name) is getattr(new, name), name
    assert sorted(shim.__all__) == sorted(names)


def test_package_lazy_names_are_the_defining_modules_objects():
    import clipdistill.loaders as loaders
    from clipdistill.loaders import loader

    for name in loaders.__all__:
        assert getattr(loaders, name) is not None, name
    for name in ("ImageLoader", "Batch", "resolve_backend", "dali_available"):
        assert getattr(loaders, name) is getattr(loader, name)
    for name in ("OutputSpec", "Reject", "CLIP_MEAN", "CLIP_STD"):
        assert getattr(loaders, name) is getattr(plan, name) is getattr(loader, name)


def test_backends_package_exports_both_backends():
    from clipdistill.loaders import backends

    assert backends.DaliBackend is dali.DaliBackend
    assert backends.TorchBackend is torch_backend_module.TorchBackend
