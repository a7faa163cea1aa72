"""The one optimizer core of every training loop: learning rate, accumulation, clipping, the step.

Four loops train something here: distillation (:class:`~clipdistill.engine.training.trainer.Trainer`,
every recipe, the data-free timm student's included), PromptKD's teacher tuning (:mod:`.tune_teacher`),
few-shot fine-tuning in evaluation (:mod:`clipdistill.engine.evaluation.domains`) and the demo's CLIP
pretraining (:mod:`clipdistill.engine.commands.demo`). What they feed a step differs (image views and
a teacher, labeled shots, image-caption pairs) and so does what they report;
what happens after the loss is the same and lives here once::

    core = OptimizerCore(make_optimizer(params, name="adamw", lr=1e-3), params, base_lr=1e-3,
                         total_steps=1000, warmup_steps=50)
    for batch in batches:
        if core.backward(loss_of(batch)):  # True when this micro-batch closed an optimizer step
            ...                            # core.step optimizer steps taken; core.lr the next rate

The learning rate of optimizer step ``s`` is :func:`~clipdistill.engine.training.schedule.lr_at`
(warm-up, then cosine to zero or constant), set before the step runs.
"""
from __future__ import annotations

from typing import Callable, Iterable, Optional

import torch

from clipdistill.engine.training.schedule import lr_at

OPTIMIZERS = ("sgd", "adamw")
MAX_RATE = float(torch.finfo(torch.float32).max)


def make_optimizer(params: Iterable[torch.Tensor], *, name: str, lr: float, weight_decay: float = 0.0,
                   momentum: float = 0.9, betas: tuple[float, float] = (0.9, 0.999)) -> torch.optim.Optimizer:
    """SGD with momentum or AdamW over ``params`` (only the tensors that train)."""
    params = list(params)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay)
    raise ValueError(f"optimizer {name!r} is unknown; choose from {', '.join(OPTIMIZERS)}")


class OptimizerCore:
    """Backward, gradient accumulation, clipping and the optimizer step at the scheduled rate.

    Args:
        optimizer: over ``params``.
        params: the tensors that train (clipped together).
        base_lr, total_steps, warmup_steps, warmup_lr, schedule: :func:`lr_at`'s arguments;
            ``total_steps`` counts optimizer steps.
        grad_accum: micro-batches per optimizer step; each loss is divided by it.
        clip_grad_norm: max global gradient norm, or None.
        before_step: called after the last micro-batch's backward, before clipping and the step
            (e.g. summing gradients over ranks).
        step: optimizer steps already taken (a resumed run).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, params: Iterable[torch.Tensor], *, base_lr: float,
                 total_steps: int, warmup_steps: int = 0, warmup_lr: Optional[float] = None,
                 schedule: str = "cosine", grad_accum: int = 1, clip_grad_norm: Optional[float] = None,
                 before_step: Optional[Callable[[], None]] = None, step: int = 0):
        if grad_accum < 1:
            raise ValueError(f"grad_accum must be >= 1, got {grad_accum}")
        for name, rate in (("learning rate", base_lr), ("warm-up learning rate", warmup_lr)):
            # A rate past float32's range cannot even be applied (torch raises mid-step); one that fits
            # but overflows the parameters is caught by the trainers' finiteness checks.
            if rate is not None and not 0 <= rate <= MAX_RATE:
                raise ValueError(f"{name} {rate!r} is out of range: it must be finite, >= 0 and at most "
                                 f"{MAX_RATE:.4g} (float32's largest value)")
        self.optimizer = optimizer
        self.params = list(params)
        self.base_lr, self.total_steps = base_lr, total_steps
        self.warmup_steps, self.warmup_lr, self.schedule = warmup_steps, warmup_lr, schedule
        self.grad_accum, self.clip_grad_norm, self.before_step = grad_accum, clip_grad_norm, before_step
        self.step = step
        self.micro = 0
        self.lr = self.set_lr()
        optimizer.zero_grad(set_to_none=True)

    def set_lr(self) -> float:
        """Give the optimizer the rate of step :attr:`step` (the next one); return it."""
        self.lr = lr_at(self.step, base_lr=self.base_lr, total_steps=self.total_steps,
                        warmup_steps=self.warmup_steps, warmup_lr=self.warmup_lr, schedule=self.schedule)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr
        return self.lr

    def backward(self, loss: torch.Tensor) -> bool:
        """Accumulate ``loss``'s gradients; on every ``grad_accum``-th call take the optimizer step.

        Returns True when an optimizer step was taken (then :attr:`step` has advanced and
        :attr:`lr` is the next step's rate).
        """
        (loss / self.grad_accum).backward()
        self.micro += 1
        if self.micro % self.grad_accum:
            return False
        if self.before_step is not None:
            self.before_step()
        if self.clip_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.params, self.clip_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.set_lr()
        return True

    def skip(self) -> None:
        """Advance the schedule by one step without updating (a batch with nothing to learn from)."""
        self.step += 1
        self.set_lr()
