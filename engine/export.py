"""The old path ``clipdistill.engine.export``: a re-export shim, kept for one release.

Import from ``clipdistill.engine.commands.export``, ``clipdistill.engine.evaluation.export`` instead.
The module was: Shipping a distilled student: one safetensors file, and prediction from it without the teacher.
"""
from clipdistill.engine.commands.export import register
from clipdistill.engine.evaluation.export import (BACKBONE_PREFIX, CHECKPOINT_FORMAT, CLASS_VECTORS, FORMAT,
                                                  LEARNER_PREFIX, DistilledStudent, ExportError, LoadedStudent,
                                                  StudentClassifier, build_backbone, construct_learner,
                                                  export_from_checkpoint, export_student, file_sha256, fresh_samples,
                                                  image_samples, load_export, predict, read_distilled)
from clipdistill.engine.evaluation.export import rebuild_learner as build_learner
from clipdistill.engine.evaluation.export import (shape_differences, student_class_vectors, teacher_class_vectors_for,
                                                  versions)
from clipdistill.engine.io import image_spec as image_preprocess

__all__ = ["BACKBONE_PREFIX", "CHECKPOINT_FORMAT", "CLASS_VECTORS", "DistilledStudent", "ExportError", "FORMAT",
           "LEARNER_PREFIX", "LoadedStudent", "StudentClassifier", "build_backbone", "build_learner",
           "construct_learner", "export_from_checkpoint", "export_student", "file_sha256",
           "fresh_samples", "image_preprocess", "image_samples", "load_export", "predict",
           "read_distilled", "register", "shape_differences", "student_class_vectors",
           "teacher_class_vectors_for", "versions"]
