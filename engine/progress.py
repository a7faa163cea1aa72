"""Progress bars for the engine's long loops, behind one switch.

Every long loop (distillation steps, teacher tuning, evaluation and prediction batches, class-vector
encoding, the demo's pretraining, the teacher cache) draws its bar through :func:`progress_bar`, so
one call decides for all of them: the command line's ``--no-progress`` calls
``set_progress(False)``. Otherwise a bar is drawn only when stderr is a terminal (tqdm's
``disable=None``), so logs and CI output never fill with carriage returns.
"""
from __future__ import annotations

import sys
from typing import Iterable, Optional

from tqdm import tqdm

_ENABLED = True


def set_progress(enabled: bool) -> None:
    """Allow (the default) or forbid progress bars for the whole process."""
    global _ENABLED
    _ENABLED = bool(enabled)


def progress_enabled() -> bool:
    """Whether a bar would be drawn now: allowed, and stderr is a terminal."""
    return _ENABLED and sys.stderr.isatty()


def progress_bar(iterable: Optional[Iterable] = None, *, total: Optional[float] = None, desc: str = "",
                 unit: str = "it", initial: float = 0, leave: bool = True) -> tqdm:
    """A tqdm bar on stderr; disabled (a no-op wrapper) when bars are off or stderr is not a terminal."""
    return tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial, leave=leave, file=sys.stderr,
                dynamic_ncols=True, disable=None if _ENABLED else True)
