"""The one builder from a run's data config to its view transform and image loaders.

The training run (:mod:`.builder`) and the teacher cache (:mod:`.teacher_cache`) both make their
views here, so the cache's key (the ``repr`` of :func:`training_transform`) equals the run's by
construction, and both decode with the same backend, workers, interpolation and precheck.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from clipdistill.engine.config.run import DataConfig
from clipdistill.loaders.loader import ImageLoader, OutputSpec
from clipdistill.loaders.views import CenterCrop, RandomResizedCrop, ReplayViews, Transform


def training_transform(data: DataConfig) -> RandomResizedCrop:
    """The training views: random resized crops (``min_scale``..``max_scale`` of the area), flips."""
    return RandomResizedCrop(scale=(data.min_scale, data.max_scale), flip=data.flip)


def image_loader(samples, data: DataConfig, *, outputs: Sequence[OutputSpec], transform: Transform, seed: int,
                 device: torch.device, dtype: torch.dtype, batch_size: Optional[int] = None,
                 cache_dir: Optional[str] = None, replay: Optional[ReplayViews] = None, rank: int = 0,
                 world_size: int = 1) -> ImageLoader:
    """An :class:`ImageLoader` over ``samples`` with the data config's decoding settings.

    ``batch_size`` None: ``data.batch_size`` (the global batch, split over ``world_size`` ranks).
    """
    return ImageLoader(
        samples, global_batch_size=data.batch_size if batch_size is None else batch_size, outputs=list(outputs),
        transform=transform, seed=seed, backend=data.backend, device=device, dtype=dtype, workers=data.workers,
        interpolation=data.interpolation, precheck=data.precheck, cache_dir=cache_dir, replay=replay, rank=rank,
        world_size=world_size,
    )


def heldout_transform() -> CenterCrop:
    """The held-out images' one view: the center crop, as evaluation uses."""
    return CenterCrop()
