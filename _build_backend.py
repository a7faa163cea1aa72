"""clipdistill's PEP 517 build backend: setuptools', plus one step for editable installs.

open_clip requires torchvision without a version. Where torch is installed but torchvision is
not, pip would take the newest torchvision, which needs a newer torch, and replace the user's
(CUDA) torch with it. An editable install (``pip install -e .``) is built for the environment it
goes into and never leaves it, so its metadata may name the torchvision built for that
environment's torch: the two editable hooks below ask setup.py for that narrowing.

Wheels and sdists (``pip wheel``, ``python -m build``, the wheel pip builds for ``pip install .``)
keep the loose requirements: a wheel carries its metadata to other machines and into pip's wheel
cache, where a torchvision pin taken from the build machine's torch would replace another
environment's torch. README ("Installing") says how to keep a torch when installing a wheel.
"""
from __future__ import annotations

import os

from setuptools import build_meta as _setuptools
from setuptools.build_meta import (build_sdist, build_wheel, get_requires_for_build_editable,
                                   get_requires_for_build_sdist, get_requires_for_build_wheel,
                                   prepare_metadata_for_build_wheel)

# Read by setup.py; set only while an editable hook runs.
FOR_THIS_ENVIRONMENT = "CLIPDISTILL_BUILD_FOR_THIS_ENVIRONMENT"


def _for_this_environment(hook):
    def run(*args, **kwargs):
        previous = os.environ.get(FOR_THIS_ENVIRONMENT)
        os.environ[FOR_THIS_ENVIRONMENT] = "1"
        try:
            return hook(*args, **kwargs)
        finally:
            if previous is None:
                os.environ.pop(FOR_THIS_ENVIRONMENT, None)
            else:
                os.environ[FOR_THIS_ENVIRONMENT] = previous

    run.__name__ = hook.__name__
    run.__doc__ = hook.__doc__
    return run


prepare_metadata_for_build_editable = _for_this_environment(_setuptools.prepare_metadata_for_build_editable)
build_editable = _for_this_environment(_setuptools.build_editable)

__all__ = ["build_editable", "build_sdist", "build_wheel", "get_requires_for_build_editable",
           "get_requires_for_build_sdist", "get_requires_for_build_wheel", "prepare_metadata_for_build_editable",
           "prepare_metadata_for_build_wheel"]
