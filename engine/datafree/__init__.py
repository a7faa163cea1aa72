"""Data-free distillation via prompt diversification (the third method; PAPERS.md).

From class names only: diversified prompts "a [style] style of a [class]" (:mod:`.diversify`)
drive a teacher-guided generator (:mod:`.generators`) that synthesizes a surrogate image set
(:mod:`.synthesize`); its diversity is measured in the teacher's feature space (:mod:`.report`),
and a small non-CLIP student is distilled on it (:mod:`.student`).

Commands (``register(subparsers)`` in :mod:`clipdistill.engine.datafree.cli`, which imports
only the standard library): ``clipdistill synthesize``, ``datafree-report``, ``distill-datafree``
and ``datafree-eval``.

Nothing heavy is imported here: the submodules import torch, timm and diffusers themselves.
"""
from __future__ import annotations


def register(subparsers) -> None:
    """Register every data-free command (see :mod:`clipdistill.engine.datafree.cli`)."""
    from clipdistill.engine.datafree.cli import register as register_commands

    register_commands(subparsers)
