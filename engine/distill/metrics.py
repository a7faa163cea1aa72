"""The one teacher-student tally: top-1 agreement and KL(p_t‖p_s), and labeled top-1.

Every report uses these: ``clipdistill eval``, held-out model selection while training, the
demo and data-free evaluation. Units are fixed: ``agreement`` and ``top1`` in percent, ``kl`` in
nats per image. Counts stay on the logits' device until ``result()``; ``all_reduce`` sums the
tallies of every rank.
"""
from __future__ import annotations

import math
from typing import Any, Optional

import torch

from clipdistill.engine.parallel.launch import is_initialized
from clipdistill.kernels import kl_rows_reference


def base_novel_split(num_classes: int) -> tuple[list[int], list[int]]:
    """Class indices of the base half (the first ceil(C/2)) and the novel half (the rest)."""
    if num_classes < 2:
        raise ValueError(f"base-to-novel needs at least 2 classes, got {num_classes}")
    n_base = math.ceil(num_classes / 2)
    return list(range(n_base)), list(range(n_base, num_classes))


def harmonic_mean(base: float, novel: float) -> float:
    """2·base·novel / (base + novel); 0 when both are 0."""
    return 0.0 if base + novel == 0 else 2.0 * base * novel / (base + novel)


class TopOneTally:
    """Top-1 accuracy accumulated over batches, overall and (optionally) base / novel.

    :meth:`update` takes logits (B, C) over all C classes and labels (B,) int64 in [0, C).
    With ``base_to_novel``, base images (labels < ceil(C/2)) are scored on the base columns
    only and novel images on the novel columns only. Counts stay on the logits' device
    until :meth:`result`.
    """

    def __init__(self, num_classes: int, base_to_novel: bool = False):
        self.num_classes = num_classes
        self.n_base = len(base_novel_split(num_classes)[0]) if base_to_novel else None
        self._counts: Optional[torch.Tensor] = None  # correct, n, base correct, base n, novel correct, novel n

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        if logits.dim() != 2 or logits.shape[1] != self.num_classes:
            raise ValueError(f"logits must be (B, {self.num_classes}), got {tuple(logits.shape)}")
        labels = labels.to(logits.device)
        counts = [(logits.argmax(-1) == labels).sum(), torch.tensor(labels.numel(), device=logits.device)]
        if self.n_base is not None:
            m = self.n_base
            base = labels < m
            novel = ~base
            counts += [(logits[base, :m].argmax(-1) == labels[base]).sum(), base.sum(),
                       (logits[novel, m:].argmax(-1) + m == labels[novel]).sum(), novel.sum()]
        counts = torch.stack(counts).to(torch.int64)
        self._counts = counts if self._counts is None else self._counts + counts

    def result(self) -> dict[str, Any]:
        """``top1`` (percent) and ``images``; with base-to-novel also ``base``, ``novel``, ``hm``
        (percent) and ``base_images``, ``novel_images``."""
        counts = [0] * (6 if self.n_base is not None else 2) if self._counts is None else self._counts.tolist()

        def pct(correct: int, n: int) -> float:
            return 100.0 * correct / n if n else float("nan")

        out: dict[str, Any] = {"top1": pct(counts[0], counts[1]), "images": counts[1]}
        if self.n_base is not None:
            base, novel = pct(counts[2], counts[3]), pct(counts[4], counts[5])
            out.update(base=base, novel=novel, hm=harmonic_mean(base, novel), base_images=counts[3],
                       novel_images=counts[5])
        return out


def agreement_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> dict[str, float]:
    """Top-1 agreement (percent) and mean KL(p_t‖p_s) (nats) of (B, C) logits, computed in float32."""
    tally = AgreementTally()
    tally.update(teacher_logits, student_logits)
    return tally.result()


class AgreementTally:
    """Teacher-student top-1 agreement and KL(p_t‖p_s), accumulated over batches of (B, C) logits."""

    def __init__(self):
        self._sums: Optional[torch.Tensor] = None  # agreeing rows, sum of per-row KL, rows

    def update(self, teacher_logits: torch.Tensor, student_logits: torch.Tensor,
               mask: Optional[torch.Tensor] = None) -> None:
        """Add a batch; ``mask`` (B,) bool: only its True rows count (padding is skipped)."""
        if teacher_logits.shape != student_logits.shape or teacher_logits.dim() != 2:
            raise ValueError(f"teacher and student logits must both be (B, C); got {tuple(teacher_logits.shape)} "
                             f"and {tuple(student_logits.shape)}")
        kl = kl_rows_reference(student_logits.float(), teacher_logits.float(), forward_weight=1.0,
                               reverse_weight=0.0).double()
        agree = (teacher_logits.argmax(-1) == student_logits.argmax(-1)).double()
        if mask is None:
            rows = torch.full((), float(kl.numel()), dtype=torch.float64, device=kl.device)
        else:
            if tuple(mask.shape) != (kl.numel(),):
                raise ValueError(f"mask must be ({kl.numel()},), got {tuple(mask.shape)}")
            w = mask.to(device=kl.device, dtype=torch.float64)
            agree, kl, rows = agree * w, torch.where(w > 0, kl, torch.zeros_like(kl)), w.sum()
        sums = torch.stack([agree.sum(), kl.sum(), rows])
        self._sums = sums if self._sums is None else self._sums + sums

    def all_reduce(self, device: torch.device) -> None:
        """Sum the tallies of every rank of the initialized process group (a collective; a no-op
        without one)."""
        if not is_initialized():
            return
        sums = self._sums if self._sums is not None else torch.zeros(3, dtype=torch.float64, device=device)
        sums = sums.to(device)
        torch.distributed.all_reduce(sums)
        self._sums = sums

    def result(self) -> dict[str, float]:
        """``agreement`` (percent), ``kl`` (nats per image), ``images``."""
        if self._sums is None:
            return {"agreement": float("nan"), "kl": float("nan"), "images": 0}
        agree, kl, n = self._sums.tolist()
        return {"agreement": 100.0 * agree / n if n else float("nan"), "kl": kl / n if n else float("nan"),
                "images": int(n)}
