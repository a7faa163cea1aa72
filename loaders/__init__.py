"""clipdistill.loaders: files to batches of tensors on a device (DALI GPU/CPU, PyTorch).

Knows nothing of models. The public names are imported on first use, so that
``clipdistill index`` (which needs neither torch nor DALI) starts fast:

- :class:`ImageLoader`, :class:`Batch`, :func:`resolve_backend`, :func:`dali_available` (loader.py)
- :class:`OutputSpec`, :class:`Reject`, ``CLIP_MEAN``, ``CLIP_STD`` (plan.py, the leaf that
  loader.py and the backends in backends/ import)
- :class:`RandomResizedCrop`, :class:`CenterCrop`, :func:`sample_views`,
  :func:`epoch_order`, :func:`rank_slots` (views.py)
- :class:`SampleList`, :func:`resolve_source`, :func:`check_source`, :func:`expand_braces`,
  :class:`EmptySourceError` (sources.py)
- :func:`index_source`, :func:`validate` (index.py)

DALI is optional (``pip install clipdistill[dali-cuda13]``); it is imported only
by the DALI backends.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "ImageLoader": "loader", "Batch": "loader", "resolve_backend": "loader", "dali_available": "loader",
    "OutputSpec": "plan", "Reject": "plan", "CLIP_MEAN": "plan", "CLIP_STD": "plan",
    "RandomResizedCrop": "views", "CenterCrop": "views", "sample_views": "views",
    "epoch_order": "views", "rank_slots": "views", "ReplayViews": "views", "VIEWS_VERSION": "views",
    "SampleList": "sources", "resolve_source": "sources", "check_source": "sources", "expand_braces": "sources",
    "EmptySourceError": "sources",
    "index_source": "index", "validate": "index",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
