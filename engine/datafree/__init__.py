"""Data-free distillation via prompt diversification (the third method; PAPERS.md).

From class names only: diversified prompts "a [style] style of a [class]" (:mod:`.diversify`)
drive a teacher-guided generator (:mod:`.generators`) that synthesizes a surrogate image set
(:mod:`.synthesize`); its diversity is measured in the teacher's feature space (:mod:`.report`),
and a small non-CLIP student is distilled on it (:mod:`.student`).

Commands (:mod:`clipdistill.engine.commands.datafree`): ``clipdistill convert-vqgan`` (real VQGAN
weights from a taming-transformers checkpoint, :mod:`.convert_vqgan`), ``synthesize``,
``datafree-report``, ``distill-datafree`` and ``datafree-eval``.

Nothing is imported here: the submodules import torch, and timm and diffusers where they need them.
"""
