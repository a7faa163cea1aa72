"""Shim for one release: the torch backend moved to :mod:`clipdistill.loaders.backends.torch`."""
from __future__ import annotations

from .backends.torch import TorchBackend, decode_plan, to_images
from .plan import StepPlan, normalize_hwc_uint8

__all__ = ["TorchBackend", "StepPlan", "decode_plan", "normalize_hwc_uint8", "to_images"]
