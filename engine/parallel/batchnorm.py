"""Batch norm whose statistics come from the real rows of a batch, on one rank or all of them.

A batch can hold padding: the loader fills an epoch's short last step, and the rows of images
it rejected, with zero images, and in a distributed run every rank takes the same number of
rows whatever its share of real ones. Padding must not enter batch statistics, or a step's
normalization (and the running statistics kept for inference) would depend on how many rows
happened to be padding and on how the global batch was split between ranks.

:class:`RowBatchNorm2d` (PromptKD's projector uses it) takes ``row_mask`` (B,) bool, True for
real rows, and computes the per-channel mean and variance over those rows only. Once
:func:`synchronize` has marked it, it sums its statistics over every rank of the initialized
process group first, with a differentiable all-reduce (the gradient flows through the global
statistics as in torch's SyncBatchNorm), on every backend: gloo on the CPU too, which
SyncBatchNorm refuses. Padding rows are normalized with the real rows'
statistics; their loss weight is zero, so they contribute nothing.

Without a mask and unsynchronized, the forward is torch's BatchNorm2d, kernel included; in eval
mode the running statistics are used as usual. The parameter and buffer names are BatchNorm2d's,
so checkpoints are interchangeable.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from clipdistill.engine.parallel.launch import is_initialized, rank_and_world


class _RowStatistics:
    """The masked, optionally synchronized training forward, shared by every RowBatchNorm class."""

    synchronized: bool = False  # set per module by synchronize()

    def forward(self, input: torch.Tensor, row_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        sync = self.synchronized and rank_and_world()[1] > 1
        batch_stats = self.training or not self.track_running_stats
        if not batch_stats or (row_mask is None and not sync):
            return super().forward(input)
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (N, C, ...), got {input.dim()}D")
        if row_mask is not None and tuple(row_mask.shape) != (input.shape[0],):
            raise ValueError(f"row_mask must be ({input.shape[0]},) for an input of {tuple(input.shape)}, "
                             f"got {tuple(row_mask.shape)}")
        return _masked_batch_norm(self, input, row_mask, sync)


class _AllReduceSum(torch.autograd.Function):
    """Σ over ranks, differentiable: the gradient of a sum is the sum of the ranks' gradients."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        out = tensor.clone()
        torch.distributed.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        torch.distributed.all_reduce(grad)
        return grad


def _masked_batch_norm(bn: nn.modules.batchnorm._BatchNorm, input: torch.Tensor, row_mask: Optional[torch.Tensor],
                       sync: bool) -> torch.Tensor:
    def all_reduce(t: torch.Tensor) -> torch.Tensor:
        return _AllReduceSum.apply(t) if sync else t

    x = input.float()
    c = x.shape[1]
    dims = [0] + list(range(2, x.dim()))
    shape = [1, c] + [1] * (x.dim() - 2)
    weight_shape = [x.shape[0]] + [1] * (x.dim() - 1)
    per_row = x[0, 0].numel()  # elements of one channel in one row (H·W; 1 for (B, C) input)
    if row_mask is None:
        w = torch.ones(x.shape[0], dtype=x.dtype, device=x.device)
    else:
        w = row_mask.to(device=x.device, dtype=x.dtype)
    # Two passes, as torch's own kernel: the mean first, then the squared deviations from it
    # (E[x²] - mean² loses float32 precision when |mean| >> std).
    stats = all_reduce(torch.cat([(x * w.view(weight_shape)).sum(dims), (w.sum() * per_row).view(1)]))
    n = stats[-1]
    n_safe = n.clamp_min(1.0)
    mean = stats[:c] / n_safe
    centered = x - mean.view(shape)
    var = all_reduce((centered * centered * w.view(weight_shape)).sum(dims)) / n_safe
    if bn.training and bn.track_running_stats:
        with torch.no_grad():
            seen = n > 0  # a batch with no real row anywhere leaves the running statistics alone
            bn.num_batches_tracked.add_(seen.to(bn.num_batches_tracked.dtype))
            if bn.momentum is None:  # cumulative average
                m = 1.0 / bn.num_batches_tracked.clamp_min(1).to(mean.dtype)
            else:
                m = torch.tensor(float(bn.momentum), dtype=mean.dtype, device=mean.device)
            unbiased = var * n / (n - 1).clamp_min(1.0)
            new_mean = bn.running_mean * (1 - m) + m * mean.to(bn.running_mean.dtype)
            new_var = bn.running_var * (1 - m) + m * unbiased.to(bn.running_var.dtype)
            bn.running_mean.copy_(torch.where(seen, new_mean, bn.running_mean))
            bn.running_var.copy_(torch.where(seen, new_var, bn.running_var))
    y = centered * torch.rsqrt(var.view(shape) + bn.eps)
    if bn.affine:
        y = y * bn.weight.view(shape) + bn.bias.view(shape)
    return y.to(input.dtype)


class RowBatchNorm2d(_RowStatistics, nn.BatchNorm2d):
    """``nn.BatchNorm2d`` whose training statistics skip padding rows (``row_mask``) and, once
    :func:`synchronize` d, span every rank (see the module docstring)."""


def row_batch_norm(norm: nn.Module, input: torch.Tensor, row_mask: Optional[torch.Tensor]) -> torch.Tensor:
    """``norm(input, row_mask)`` for a row batch norm; any other module there is refused by name.

    torch's ``SyncBatchNorm.convert_sync_batchnorm`` (which Lightning's ``sync_batchnorm=True``
    runs) swaps every batch norm of a model for a ``SyncBatchNorm``, which takes no row mask and
    runs on GPUs only: the way to synchronize these is :func:`synchronize`.
    """
    if not isinstance(norm, _RowStatistics):
        raise TypeError(
            f"this batch norm became a {type(norm).__name__}, which cannot skip padding rows (no row_mask) "
            f"(torch.nn.SyncBatchNorm.convert_sync_batchnorm does that; Lightning runs it for "
            f"sync_batchnorm=True): leave that off and call "
            f"clipdistill.engine.parallel.batchnorm.synchronize(module) on the module holding the step "
            f"instead, which takes the statistics over every rank's real rows on any backend")
    return norm(input, row_mask)


def synchronize(module: nn.Module) -> nn.Module:
    """Take every batch norm in ``module`` over the whole distributed batch (real rows only).

    RowBatchNorm modules are marked synchronized; any other torch batch norm becomes a
    synchronized row batch norm of its own kind (same parameters and buffers: optimizer and
    checkpoint names do not change). A no-op for statistics in a single process.
    """
    for child in module.modules():
        if isinstance(child, _RowStatistics):
            child.synchronized = True
        elif isinstance(child, nn.modules.batchnorm._BatchNorm) and not isinstance(child, nn.SyncBatchNorm):
            child.__class__ = type(f"Row{type(child).__name__}", (_RowStatistics, type(child)), {})
            child.synchronized = True
    return module


def sync_batch_norm(module: nn.Module) -> nn.Module:
    """Take every batch norm in ``module`` over the global batch's real rows (no-op in one process).

    :func:`clipdistill.engine.batchnorm.synchronize`: the same implementation on every backend
    (torch's SyncBatchNorm refuses CPU tensors and cannot skip padding rows). Parameters and
    buffers are kept, so optimizer and checkpoint names do not change.
    """
    if not is_initialized():
        return module
    return synchronize(module)


__all__ = ["RowBatchNorm2d", "row_batch_norm", "synchronize", "sync_batch_norm"]
