"""clipdistill.engine: models, prompt learners, recipes, the training loop and the CLI.

The engine is the only part of clipdistill that knows about kernels, loaders and
models at once. Importing it is cheap: heavy dependencies (open_clip, DALI,
DeepSpeed) are imported by the modules that need them.
"""
from importlib import metadata as _metadata

try:
    __version__ = _metadata.version("clipdistill")
except _metadata.PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0+unknown"
