"""The learners by name, and the one builder that constructs them from plain arguments."""
from __future__ import annotations

import inspect
from typing import Optional, Sequence

from torch import nn

from clipdistill.engine.prompts.learners import (IVLP, CoCoOp, CoOp, MaPLe, PromptKDStudent, PromptLearner, PromptSRC,
                                                 Tokenizer, VPTDeep)

LEARNERS: dict[str, type[PromptLearner]] = {
    "coop": CoOp,
    "cocoop": CoCoOp,
    "vpt": VPTDeep,
    "maple": MaPLe,
    "ivlp": IVLP,
    "promptsrc": PromptSRC,
    "promptkd": PromptKDStudent,
}


def build_learner(
    name: str,
    clip: nn.Module,
    *,
    tokenizer: Optional[Tokenizer] = None,
    class_names: Optional[Sequence[str]] = None,
    teacher_dim: Optional[int] = None,
    templates: Optional[Sequence[str]] = None,
    prompt_placement: Optional[str] = None,
    **options,
) -> PromptLearner:
    """Construct the learner called ``name`` (a key of :data:`LEARNERS`) from plain arguments.

    Text-side learners need ``tokenizer`` and ``class_names``; PromptKD's student needs
    ``teacher_dim``; learners with fixed prompts (VPT, PromptSRC's frozen reference) take
    ``templates`` and the others ignore it; so do learners without vision prompts ignore
    ``prompt_placement`` (None: the learner's default, the published placement);
    ``options`` are the learner's own keyword arguments (n_ctx, depth, ...).
    """
    if name not in LEARNERS:
        raise ValueError(f"unknown prompt learner {name!r}; choose one of {sorted(LEARNERS)}")
    cls = LEARNERS[name]
    parameters = inspect.signature(cls.__init__).parameters
    if templates is not None and "templates" in parameters:
        options = {**options, "templates": tuple(templates)}
    if prompt_placement is not None and "prompt_placement" in parameters:
        options = {**options, "prompt_placement": prompt_placement}
    if cls is PromptKDStudent:
        if teacher_dim is None:
            raise ValueError("promptkd needs teacher_dim, the teacher's embedding size")
        return cls(clip, teacher_dim, **options)
    if tokenizer is None or not class_names:
        raise ValueError(f"{name} needs a tokenizer and class_names")
    return cls(clip, tokenizer, class_names, **options)
