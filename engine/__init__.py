"""clipdistill.engine: models, prompt learners, recipes, the training loop and the CLI.

The engine is the only part of clipdistill that knows about kernels, loaders and
models at once. Importing it is cheap: heavy dependencies (open_clip, DALI,
DeepSpeed) are imported by the modules that need them.

Importing it applies the CPU-only torchvision measure
(:func:`clipdistill.engine._torchvision_compat.ensure_torchvision_importable`) before anything
can import torchvision, so that packages importing torchvision afterwards (open_clip,
Lightning, transformers) work next to a CPU torch too; where torchvision's own ops load it does
nothing.
"""
from clipdistill import __version__
from clipdistill.engine._torchvision_compat import ensure_torchvision_importable

ensure_torchvision_importable()

__all__ = ["__version__"]
