"""The old path ``clipdistill.engine.tune_teacher``: a re-export shim, kept for one release.

Import from ``clipdistill.engine.commands.tune_teacher``, ``clipdistill.engine.models.tuned``, ``clipdistill.engine.training.tune_teacher`` instead.
The module was: ``clipdistill tune-teacher``: PromptKD's first stage, and loading the tuned teacher back.
"""
from clipdistill.engine.commands.tune_teacher import register
from clipdistill.engine.models.tuned import (FORMAT, LEARNER_KIND, TunedTeacher, load_tuned_teacher,
                                             read_tuned_header, save_tuned_teacher, tuned_teacher_class_vectors)
from clipdistill.engine.training.tune_teacher import (ON_SHORT_CLASS, ShotSelection, TuneResult, TuneSettings,
                                                      TuneTeacherInputError, draw_shots, labeled_accuracy,
                                                      tune_teacher)

__all__ = ["FORMAT", "LEARNER_KIND", "ON_SHORT_CLASS", "ShotSelection", "TuneResult", "TuneSettings",
           "TuneTeacherInputError", "TunedTeacher", "draw_shots", "labeled_accuracy",
           "load_tuned_teacher", "read_tuned_header", "register", "save_tuned_teacher", "tune_teacher",
           "tuned_teacher_class_vectors"]
