"""A model's input transform for code that brings its own data: PIL image -> normalized tensor.

:func:`teacher_transform` and :func:`student_transform` read the side, mean and std from the
model's image tower (:func:`clipdistill.engine.io.image_spec`) and render an image the way the
engine's loaders do (``clipdistill.loaders``, torch backend): a crop window of the decoded image
resized to S x S in one step (bicubic by default, as ``data.interpolation``), an optional flip,
then ``(x / 255 - mean) / std``. Without a crop window it is the centered square
(``crop_fraction`` of the shorter side, :class:`clipdistill.loaders.CenterCrop`), which is
CLIP's own evaluation preprocessing at ``crop_fraction=1``.

Teacher and student should see the same view of an image: :class:`PairedViews` draws one crop
window and flip per image, the way the engine's loaders do, and renders it for both.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from PIL import Image
from torch import nn

from clipdistill.engine.io import image_spec
from clipdistill.loaders.backends.torch import rgb8
from clipdistill.loaders.plan import OutputSpec, normalize_hwc_uint8
from clipdistill.loaders.views import CenterCrop, RandomResizedCrop, sample_views

_RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}


@dataclass(frozen=True)
class ImageTransform:
    """PIL image -> (3, size, size) float32 tensor, normalized with ``mean`` and ``std`` (0..1 units)."""

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"
    crop_fraction: float = 1.0

    def __post_init__(self):
        if self.interpolation not in _RESAMPLE:
            raise ValueError(f"interpolation must be one of {sorted(_RESAMPLE)}, got {self.interpolation!r}")
        CenterCrop(self.crop_fraction)  # validates the fraction
        OutputSpec("image", self.size, self.mean, self.std)  # validates size, mean and std

    def __call__(self, image: Image.Image, crop: Optional[tuple[int, int, int, int]] = None,
                 flip: bool = False) -> torch.Tensor:
        """``crop``: (x, y, w, h) in pixels of ``image``; default the centered square. ``flip``: horizontal."""
        image = rgb8(image)
        if crop is None:
            crops, _ = sample_views(CenterCrop(self.crop_fraction), 0, 0, np.zeros(1), np.zeros(1),
                                    np.array([image.width]), np.array([image.height]))
            crop = tuple(int(v) for v in crops[0])
        x, y, w, h = crop
        if w < 1 or h < 1 or x < 0 or y < 0 or x + w > image.width or y + h > image.height:
            raise ValueError(f"crop {tuple(crop)} does not lie inside the {image.width}x{image.height} image")
        view = image.resize((self.size, self.size), _RESAMPLE[self.interpolation], box=(x, y, x + w, y + h))
        if flip:
            view = view.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        pixels = torch.from_numpy(np.asarray(view, dtype=np.uint8).copy())[None]
        spec = OutputSpec("image", self.size, self.mean, self.std)
        return normalize_hwc_uint8(pixels, spec, torch.float32, torch.device("cpu"))[0]


@dataclass(frozen=True)
class PairedViews:
    """PIL image -> (teacher image, student image): the same view of it at each model's input.

    ``train``: a random view per call, the engine's training crop and flip
    (:class:`clipdistill.loaders.RandomResizedCrop` with ``scale``), drawn from torch's global
    generator (so ``torch.manual_seed`` or Lightning's ``seed_everything`` make it repeatable);
    otherwise the centered square of each transform.
    """

    teacher: ImageTransform
    student: ImageTransform
    train: bool = True
    scale: tuple[float, float] = (0.08, 1.0)

    def __call__(self, image: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.train:
            return self.teacher(image), self.student(image)
        seed = int(torch.randint(0, 2**62, ()))
        crops, flips = sample_views(RandomResizedCrop(scale=self.scale), seed, 0, np.zeros(1), np.zeros(1),
                                    np.array([image.width]), np.array([image.height]))
        crop, flip = tuple(int(v) for v in crops[0]), bool(flips[0])
        return self.teacher(image, crop, flip), self.student(image, crop, flip)


def _clip_model(model: nn.Module) -> nn.Module:
    """The open_clip model inside a Teacher (``.model``), a prompt learner (``.clip``), or itself."""
    for attribute in ("model", "clip"):
        inner = getattr(model, attribute, None)
        if isinstance(inner, nn.Module) and hasattr(inner, "visual"):
            return inner
    if hasattr(model, "visual"):
        return model
    raise TypeError(f"{type(model).__name__} is not a CLIP model, a Teacher or a prompt learner (no image tower)")


def _transform_for(model: nn.Module, interpolation: str, crop_fraction: float) -> ImageTransform:
    size, mean, std = image_spec(_clip_model(model))
    return ImageTransform(size, mean, std, interpolation, crop_fraction)


def teacher_transform(teacher: nn.Module, *, interpolation: str = "bicubic",
                      crop_fraction: float = 1.0) -> ImageTransform:
    """The teacher's input transform (its resolution and normalization); ``teacher``: a
    :class:`~clipdistill.engine.models.Teacher` or an open_clip model."""
    return _transform_for(teacher, interpolation, crop_fraction)


def student_transform(student: nn.Module, *, interpolation: str = "bicubic",
                      crop_fraction: float = 1.0) -> ImageTransform:
    """The student's input transform; ``student``: a prompt learner or an open_clip model."""
    return _transform_for(student, interpolation, crop_fraction)


__all__ = ["ImageTransform", "PairedViews", "student_transform", "teacher_transform"]
