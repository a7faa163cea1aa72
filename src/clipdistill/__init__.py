"""clipdistill: distill large CLIP teachers into prompt-tuned students on unlabeled images.

The subpackages are :mod:`clipdistill.kernels` (the fused distillation loss),
:mod:`clipdistill.loaders` (files to batches) and :mod:`clipdistill.engine` (models,
prompt learners, recipes, the loop, the command line). The names below are the
embedding API, imported on first use: ``import clipdistill`` (and
``import clipdistill.kernels``) loads neither the engine nor open_clip.

    import clipdistill as cd
    teacher = cd.build_teacher("ViT-L-14", "/ckpt/teacher.safetensors", device="cuda")
    learner = cd.build_learner("coop", cd.build_student("ViT-B-16", "openai", device="cuda"),
                               tokenizer=cd.get_tokenizer("ViT-B-16"), class_names=names)
    vectors = cd.teacher_class_vectors(teacher, cd.get_tokenizer("ViT-L-14"), names, ["a photo of a {}."])
    step = cd.DistillStep(teacher, learner, vectors, recipe="kdpl")

examples/ (in the repository) has a Lightning module and a Hugging Face ``Trainer`` built on it.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "kd_loss": "clipdistill.kernels",
    "KDLoss": "clipdistill.kernels",
    "ImageLoader": "clipdistill.loaders",
    "DistillStep": "clipdistill.engine.distill.step",
    "build_teacher": "clipdistill.engine.models.clip",
    "build_student": "clipdistill.engine.models.clip",
    "get_tokenizer": "clipdistill.engine.models.clip",
    "build_learner": "clipdistill.engine.prompts.registry",
    "teacher_class_vectors": "clipdistill.engine.models.class_vectors",
    "teacher_transform": "clipdistill.engine.transforms",
    "student_transform": "clipdistill.engine.transforms",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
