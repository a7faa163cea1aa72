"""The old path ``clipdistill.engine.evaluate``: a re-export shim, kept for one release.

Import from ``clipdistill.engine.commands.evaluate``, ``clipdistill.engine.distill.metrics``, ``clipdistill.engine.evaluation.evaluate`` instead.
The module was: Evaluation: zero-shot top-1, base-to-novel, cross-dataset, teacher-student agreement, model selection.
"""
from clipdistill.engine.commands.evaluate import register
from clipdistill.engine.distill.metrics import (AgreementTally, TopOneTally, agreement_kl, base_novel_split,
                                                harmonic_mean)
from clipdistill.engine.evaluation.evaluate import (MODEL_LABELS, REPORT_FORMAT, SELECTION_METRICS, Classifier,
                                                    Dataset, EvalInputError, LabeledFolder, LoaderSettings,
                                                    distilled_classifier, evaluate_agreement, evaluate_labeled,
                                                    format_report, heldout_agreement_kl, holdout_split, is_better,
                                                    module_classifier, read_class_list, run_evaluation,
                                                    scan_labeled_folder, teacher_classifier, zero_shot_classifier)

__all__ = ["AgreementTally", "Classifier", "Dataset", "EvalInputError", "LabeledFolder", "LoaderSettings",
           "MODEL_LABELS", "REPORT_FORMAT", "SELECTION_METRICS", "TopOneTally", "agreement_kl",
           "base_novel_split", "distilled_classifier", "evaluate_agreement", "evaluate_labeled",
           "format_report", "harmonic_mean", "heldout_agreement_kl", "holdout_split", "is_better",
           "module_classifier", "read_class_list", "register", "run_evaluation", "scan_labeled_folder",
           "teacher_classifier", "zero_shot_classifier"]
