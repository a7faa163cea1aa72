"""The old path ``clipdistill.engine.train``: a re-export shim, kept for one release.

Import from ``clipdistill.engine.commands.distill``, ``clipdistill.engine.io``, ``clipdistill.engine.training.builder``, ``clipdistill.engine.training.schedule``, ``clipdistill.engine.training.trainer`` instead.
The module was: The training loop: build a run from its config, distill, checkpoint, resume exactly.
"""
from clipdistill.engine.commands.distill import register
from clipdistill.engine.io import image_spec as _image_preprocess
from clipdistill.engine.io import read_class_names, read_templates, resolve_device
from clipdistill.engine.training.builder import Run, build_run
from clipdistill.engine.training.schedule import lr_at
from clipdistill.engine.training.trainer import NonFiniteLossError, Trainer, distill

__all__ = ["NonFiniteLossError", "Run", "Trainer", "_image_preprocess", "build_run", "distill", "lr_at",
           "read_class_names", "read_templates", "register", "resolve_device"]
