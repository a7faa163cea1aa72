"""CPU-only compatibility measure for torchvision's CUDA-only wheels.

Every torchvision wheel on PyPI for torch 2.13 is a CUDA build. Installed next to
a CPU build of torch, its compiled ``_C`` extension cannot load (it needs
``libc10_cuda.so``), and ``import torchvision`` then fails inside its meta
registrations with ``operator torchvision::nms does not exist``. That breaks
``import open_clip`` although open_clip uses none of torchvision's compiled ops.

:func:`ensure_torchvision_importable` must run before torchvision is first
imported. If torchvision's own ``_C`` loads (any GPU install, any matching CPU
build) it does nothing. Otherwise it declares the two operator schemas that
torchvision's Python code registers meta kernels for, so that the pure-Python
parts (transforms, ``open_clip``'s models and tokenizer) import and work. Any
call into a compiled torchvision op (nms, decode_jpeg, roi_align, ...) still
raises a clear error from torch's dispatcher, because no kernel is registered.

This module is deliberately tiny and has no other job.
"""
from __future__ import annotations

import importlib.util
import os
import sys

import torch

# Kept alive for the life of the process: dropping the Library object would
# deregister the schemas again.
_SHIM_LIBRARY: "torch.library.Library | None" = None
_STATE: str | None = None  # "native", "shimmed", "absent" once decided

_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)


def _torchvision_ops_load() -> bool:
    """Try to load torchvision's compiled extension without importing torchvision."""
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return False
    for folder in spec.submodule_search_locations:
        for name in sorted(os.listdir(folder)):
            if name.startswith("_C") and name.endswith((".so", ".pyd")):
                try:
                    torch.ops.load_library(os.path.join(folder, name))
                    return True
                except OSError:
                    return False
    return False


def ensure_torchvision_importable() -> str:
    """Make ``import torchvision`` (and so ``import open_clip``) work on a CPU-only torch.

    Returns how torchvision stands: ``"native"`` (its own ops load, or it was
    already imported), ``"shimmed"`` (schemas declared, compiled ops unavailable)
    or ``"absent"`` (torchvision is not installed). Safe to call many times.
    """
    global _SHIM_LIBRARY, _STATE
    if _STATE is not None:
        return _STATE
    if "torchvision" in sys.modules:
        _STATE = "native"
    elif importlib.util.find_spec("torchvision") is None:
        _STATE = "absent"
    elif _torchvision_ops_load():
        _STATE = "native"
    else:
        library = torch.library.Library("torchvision", "DEF")
        for schema in _SCHEMAS:
            library.define(schema)
        _SHIM_LIBRARY = library
        _STATE = "shimmed"
    return _STATE
