"""The old path ``clipdistill.engine.demo``: a re-export shim, kept for one release.

Import from ``clipdistill.engine.commands.demo`` instead.
The module was: ``clipdistill demo``: a complete, honest distillation on the CPU in a few minutes.
"""
from clipdistill.engine.commands.demo import (CLASSES, IMAGE_SIDE, STUDENT_WORDS, TEMPLATE, compare, make_dataset,
                                              pretrain_clip, register, render_image, run_demo, student_logits,
                                              to_tensor, write_jpegs)

__all__ = ["CLASSES", "IMAGE_SIDE", "STUDENT_WORDS", "TEMPLATE", "compare", "make_dataset", "pretrain_clip",
           "register", "render_image", "run_demo", "student_logits", "to_tensor", "write_jpegs"]
