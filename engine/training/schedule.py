"""Learning-rate schedules: warm-up, then cosine to zero or constant (every training loop's one)."""
from __future__ import annotations

import math
from typing import Optional


def lr_at(step: int, *, base_lr: float, total_steps: int, warmup_steps: int, warmup_lr: Optional[float],
          schedule: str) -> float:
    """Learning rate of optimizer step ``step`` (0-based): warm-up, then cosine to 0 or constant."""
    if step < warmup_steps:
        return warmup_lr if warmup_lr is not None else base_lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return base_lr
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return 0.5 * base_lr * (1.0 + math.cos(math.pi * progress))
