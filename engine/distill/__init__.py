"""One distillation step as a module any loop can call, and the one agreement/KL tally.

- :mod:`.step`: :class:`~clipdistill.engine.distill.step.DistillStep`, the embedding API.
- :mod:`.metrics`: teacher-student agreement and KL, top-1, as tallies that sum over batches
  and ranks.
"""
