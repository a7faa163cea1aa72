"""The decoding backends of :class:`clipdistill.loaders.ImageLoader`.

- :mod:`.dali`: "dali-gpu" and "dali-cpu", one DALI pipeline graph (DALI is
  imported inside its functions only, so importing this package needs no DALI);
- :mod:`.torch`: "torch", a PyTorch DataLoader whose workers decode with PIL.

Both take plain arguments (a :class:`~clipdistill.loaders.plan.Planner`, the
output specs, device, dtype, ...) and offer ``run(epoch, start, stop, known)``,
which yields ``(StepPlan, {name: (R, 3, S, S) tensor})`` per step, and
``render(plan)``. They import :mod:`..plan`, never :mod:`..loader`.
"""
from __future__ import annotations

from .dali import DaliBackend
from .torch import TorchBackend

__all__ = ["DaliBackend", "TorchBackend"]
