"""clipdistill.loaders: files to batches of tensors on a device (DALI GPU/CPU, PyTorch).

Knows nothing of models.
"""
