"""clipdistill.kernels: fused Triton kernels for distillation losses, with PyTorch references.

Pure math on tensors: never imports clipdistill.engine or clipdistill.loaders.
"""
