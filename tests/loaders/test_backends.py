"""Given the same view numbers, the torch (PIL) and dali-cpu backends agree.

Tolerances, in normalized units (CLIP std: 1 uint8 level is about 0.015):
the decoders are both libjpeg-turbo and the crop windows are identical, so only
the resampling differs (DALI's antialiased resize vs PIL's), by a level or two.
Observed on 64 generated 500x375 photos, outputs 224 and 336 (random resized
crops, and center crops), bilinear and bicubic: mean |diff| 0.0025-0.0029,
99.9th percentile 0.015-0.030, max 0.08-0.41 (a few pixels of upsampled small
crops, at 336). The bounds below leave room above those.
"""
from __future__ import annotations

import pytest
import torch

from clipdistill.loaders import CenterCrop, ImageLoader, OutputSpec

# (mean |diff|, 99.9th percentile |diff|, max |diff|) bounds per interpolation.
TOLERANCE = {"bilinear": (0.01, 0.08, 0.6), "bicubic": (0.01, 0.08, 0.6)}


def _all(folder, cache_dir, backend, **kw):
    loader = ImageLoader(folder, global_batch_size=8, backend=backend, cache_dir=cache_dir, workers=2,
                         outputs=(OutputSpec("student", 32), OutputSpec("teacher", 48)), **kw)
    return list(loader)


@pytest.mark.parametrize("interpolation, transform", [("bilinear", None), ("bicubic", CenterCrop(0.9))])
def test_torch_and_dali_cpu_agree(image_folder, cache_dir, require_dali, interpolation, transform):
    kw = dict(interpolation=interpolation, seed=4, views_per_sample=2)
    if transform is not None:
        kw["transform"] = transform
    ref = _all(image_folder, cache_dir, "torch", **kw)
    dali = _all(image_folder, cache_dir, "dali-cpu", **kw)
    assert len(ref) == len(dali)
    mean_tol, p999_tol, max_tol = TOLERANCE[interpolation]
    for a, b in zip(ref, dali):
        for field in ("sample_ids", "view_ids", "crops", "flips", "image_sizes", "mask"):
            assert torch.equal(getattr(a, field), getattr(b, field)), field
        for name in a.images:
            diff = (a.images[name] - b.images[name]).abs()
            assert diff.mean() < mean_tol, (name, diff.mean())
            assert torch.quantile(diff.flatten(), 0.999) < p999_tol, name
            assert diff.max() < max_tol, (name, diff.max())
