"""The old path ``clipdistill.engine.step``: a re-export shim, kept for one release.

Import from ``clipdistill.engine.distill.step`` instead.
The module was: One distillation step's forward, as a module other trainers can call from their own loop.
"""
from clipdistill.engine.distill.step import DistillStep, Recipe, symmetric_kl_from_logits

__all__ = ["DistillStep", "Recipe", "symmetric_kl_from_logits"]
