"""clipdistill.kernels: fused Triton kernels for distillation losses, with PyTorch references.

Pure math on tensors: never imports clipdistill.engine or clipdistill.loaders.
"""
from clipdistill.kernels.kd_loss import KDLoss, kd_loss, kd_loss_reference, kl_rows_reference, resolve_backend

__all__ = ["KDLoss", "kd_loss", "kd_loss_reference", "kl_rows_reference", "resolve_backend"]
