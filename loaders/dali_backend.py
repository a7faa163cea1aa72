"""Shim for one release: the DALI backend moved to :mod:`clipdistill.loaders.backends.dali`."""
from __future__ import annotations

from .backends.dali import DaliBackend
from .plan import StepPlan

__all__ = ["DaliBackend", "StepPlan"]
