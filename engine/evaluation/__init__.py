"""Evaluation and inference: labeled and unlabeled reports, export of a distilled student, prediction.

- :mod:`.evaluate`: zero-shot, base-to-novel, cross-dataset top-1, agreement and KL.
- :mod:`.domains`: out-of-distribution top-1 over the domains of one dataset, and few-shot fine-tuning.
- :mod:`.export`: reading checkpoints and exports, rebuilding the learner, writing one export file,
  and prediction from it.
"""
