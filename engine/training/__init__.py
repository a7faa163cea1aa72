"""Training: the builder, the loop, its schedule and checkpoints, the teacher cache, teacher tuning.

- :mod:`.builder`: a run's config turned into models, the step and the loaders (the one builder).
- :mod:`.trainer`: the loop (metrics, checkpoints, exact resume, held-out selection).
- :mod:`.schedule`: warm-up and cosine learning rates.
- :mod:`.checkpoint`: atomic safetensors + JSON checkpoints, RNG states.
- :mod:`.teacher_cache`: the teacher's features for K views of every image, stored once.
- :mod:`.tune_teacher`: PromptKD's first stage, PromptSRC tuning on a few labels.
"""
