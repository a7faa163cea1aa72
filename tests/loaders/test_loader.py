"""The output contract of every CPU backend: shapes, dtypes, ranges, padding, views, replay."""
from __future__ import annotations

import logging

import pytest
import torch

from clipdistill.loaders import CLIP_MEAN, CLIP_STD, CenterCrop, ImageLoader, OutputSpec
from clipdistill.loaders.loader import resolve_backend

STUDENT = OutputSpec("student", 24)
TEACHER = OutputSpec("teacher", 36, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))

# Extremes of (x/255 - mean) / std over the channels, plus a margin for fp16/bf16 rounding.
def _bounds(spec):
    lo = min((0 - m) / s for m, s in zip(spec.mean, spec.std))
    hi = max((1 - m) / s for m, s in zip(spec.mean, spec.std))
    return lo - 0.02, hi + 0.02


def _loader(folder, cache_dir, backend, **kw):
    kw.setdefault("global_batch_size", 6)
    kw.setdefault("outputs", (STUDENT, TEACHER))
    kw.setdefault("workers", 2)
    return ImageLoader(folder, backend=backend, cache_dir=cache_dir, **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_shapes_dtypes_ranges_and_padding(image_folder, cache_dir, cpu_backend, dtype):
    loader = _loader(image_folder, cache_dir, cpu_backend, dtype=dtype)
    batches = list(loader)
    assert len(batches) == len(loader) == 4  # ceil(23 / 6)
    for b in batches:
        for spec in (STUDENT, TEACHER):
            x = b.images[spec.name]
            assert x.shape == (6, 3, spec.size, spec.size) and x.dtype == dtype and x.device.type == "cpu"
            assert x.is_contiguous()
            assert torch.isfinite(x).all()
            lo, hi = _bounds(spec)
            assert x.float().min() >= lo and x.float().max() <= hi
            assert x[b.mask].float().std() > 0.1  # real content, not zeros
            assert (x[~b.mask] == 0).all()  # padding rows are zeros
        assert b.sample_ids.dtype == torch.int64 and b.crops.dtype == torch.int32 and b.flips.dtype == torch.bool
        assert torch.equal(b.mask, b.sample_ids >= 0)
    # 23 = 3 full steps + 5: the last batch holds one padding row
    assert [int(b.mask.sum()) for b in batches] == [6, 6, 6, 5]
    ids = torch.cat([b.sample_ids[b.mask] for b in batches])
    assert sorted(ids.tolist()) == list(range(23))
    assert loader.epoch == 1 and loader.samples_consumed == 0


def test_both_resolutions_show_the_same_view(image_folder, cache_dir, cpu_backend):
    """The teacher image, shrunk to the student's size, is the student image (same crop, same flip)."""
    same_norm = OutputSpec("student", 24, mean=TEACHER.mean, std=TEACHER.std)
    loader = _loader(image_folder, cache_dir, cpu_backend, outputs=(same_norm, TEACHER))
    batch = next(iter(loader))
    t = torch.nn.functional.interpolate(batch.images["teacher"], size=24, mode="bilinear", antialias=True)
    s = batch.images["student"]
    assert (t - s).abs().mean() < 0.05
    # a mismatched view (the next sample's) is far
    assert (t.roll(1, 0) - s).abs().mean() > 0.1


def test_views_per_sample_and_eval_transform(image_folder, cache_dir, cpu_backend):
    loader = _loader(image_folder, cache_dir, cpu_backend, views_per_sample=3, outputs=(STUDENT,))
    b = next(iter(loader))
    assert b.images["student"].shape == (18, 3, 24, 24)
    assert b.view_ids.tolist() == [0, 1, 2] * 6
    assert torch.equal(b.sample_ids[::3], b.sample_ids[1::3])
    assert (b.crops[::3] != b.crops[1::3]).any(dim=1).all()  # three different windows of one sample
    evaluation = _loader(image_folder, cache_dir, cpu_backend, transform=CenterCrop(0.875), outputs=(STUDENT,))
    e = next(iter(evaluation))
    w, h = e.image_sizes[:, 0], e.image_sizes[:, 1]
    side = torch.floor(torch.minimum(w, h) * 0.875 + 0.5).int()
    assert torch.equal(e.crops[:, 2], side) and torch.equal(e.crops[:, 3], side) and not e.flips.any()


def test_a_view_replayed_from_its_numbers_equals_the_original(image_folder, cache_dir, cpu_backend):
    loader = _loader(image_folder, cache_dir, cpu_backend, seed=11, views_per_sample=2)
    batches = list(loader)
    b = batches[2]
    m = b.mask
    # the numbers are recomputed from (seed, epoch, sample id, view) and the image size
    crops, flips = loader.view_params(b.epoch, b.sample_ids[m], b.view_ids[m])
    assert torch.equal(crops, b.crops[m]) and torch.equal(flips, b.flips[m])
    # and decoding them again gives the same pixels (a new loader: nothing cached)
    fresh = _loader(image_folder, cache_dir, cpu_backend, seed=11)
    replay = fresh.render(b.sample_ids[m], crops, flips)
    for name in ("student", "teacher"):
        assert torch.equal(replay[name], b.images[name][m])


def test_order_and_views_change_with_epoch_and_seed(image_folder, cache_dir):
    loader = _loader(image_folder, cache_dir, "torch", outputs=(STUDENT,), workers=1)
    e0 = list(loader)
    e1 = list(loader)
    assert e1[0].epoch == 1
    ids0 = torch.cat([b.sample_ids for b in e0])
    ids1 = torch.cat([b.sample_ids for b in e1])
    assert not torch.equal(ids0, ids1) and sorted(ids0[ids0 >= 0].tolist()) == sorted(ids1[ids1 >= 0].tolist())


def test_auto_backend_choice_is_logged(caplog):
    with caplog.at_level(logging.INFO, logger="clipdistill.loaders"):
        chosen = resolve_backend("auto", "cpu")
    assert chosen in ("dali-cpu", "torch")
    assert f"chose {chosen!r}" in caplog.text
    with pytest.raises(ValueError, match="backend must be one of"):
        resolve_backend("pil")
    if not torch.cuda.is_available():
        with pytest.raises((RuntimeError, ImportError)):
            resolve_backend("dali-gpu")


def test_bad_arguments_raise(image_folder, cache_dir):
    with pytest.raises(ValueError, match="multiple of world_size"):
        _loader(image_folder, cache_dir, "torch", global_batch_size=7, world_size=2)
    with pytest.raises(ValueError, match="rank"):
        _loader(image_folder, cache_dir, "torch", rank=2, world_size=2)
    with pytest.raises(ValueError, match="distinct names"):
        _loader(image_folder, cache_dir, "torch", outputs=(STUDENT, STUDENT))
    with pytest.raises(ValueError, match="dtype"):
        _loader(image_folder, cache_dir, "torch", dtype=torch.int8)


def test_clip_normalization_constants():
    assert CLIP_MEAN == (0.48145466, 0.4578275, 0.40821073) and CLIP_STD == (0.26862954, 0.26130258, 0.27577711)


def test_tar_shards_load_like_the_folder_they_were_made_from(image_folder, cache_dir, tmp_path, cpu_backend):
    import io
    import tarfile

    from clipdistill.loaders.sources import resolve_source

    samples = resolve_source(image_folder, cache_dir=cache_dir)
    for shard, ids in (("000.tar", range(0, 12)), ("001.tar", range(12, 23))):  # the folder's order
        with tarfile.open(tmp_path / shard, "w") as tar:
            for i in ids:
                data = samples.read(i)
                info = tarfile.TarInfo(f"{i:05d}.jpg")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    from_folder = list(_loader(image_folder, cache_dir, cpu_backend, outputs=(STUDENT,), seed=2))
    from_shards = list(_loader(str(tmp_path / "*.tar"), cache_dir, cpu_backend, outputs=(STUDENT,), seed=2))
    for a, b in zip(from_folder, from_shards, strict=True):
        assert torch.equal(a.sample_ids, b.sample_ids)
        assert torch.equal(a.images["student"], b.images["student"])
