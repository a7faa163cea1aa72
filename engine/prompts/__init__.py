"""Prompt learners: the only trainable parts of a student.

- :mod:`.learners`: CoOp, CoCoOp, VPT-deep, MaPLe, IVLP/PromptSRC and PromptKD's vision-prompted
  student with its projector, all behind :class:`PromptLearner`'s interface, which is all the
  distillation step uses.
- :mod:`.registry`: the learners by name and :func:`build_learner`, the one builder.

The names below are the old ``clipdistill.engine.prompts`` module's, re-exported.
"""
from clipdistill.engine.prompts.learners import (IVLP, PLACEHOLDER, PROJECTORS, PROMPTSRC_LOSS_WEIGHTS,
                                                 ClassNamePrompts, CoCoOp, ConvBNProjector, CoOp,
                                                 GaussianPromptAggregator, LayerNormMLPProjector, LearnerOutput,
                                                 MaPLe, PromptKDStudent, PromptLearner, PromptSRC, Tokenizer, VPTDeep,
                                                 encode_deep_prompted, scaled_logits)
from clipdistill.engine.prompts.registry import LEARNERS, build_learner

__all__ = ["IVLP", "PLACEHOLDER", "PROJECTORS", "PROMPTSRC_LOSS_WEIGHTS", "ClassNamePrompts", "CoCoOp", "CoOp",
           "ConvBNProjector", "GaussianPromptAggregator", "LayerNormMLPProjector", "LearnerOutput", "MaPLe",
           "PromptKDStudent", "PromptLearner", "PromptSRC", "Tokenizer", "VPTDeep", "encode_deep_prompted",
           "scaled_logits", "LEARNERS", "build_learner"]
