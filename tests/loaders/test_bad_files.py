"""Bad files never stop a run: each is rejected with its path and reason, every valid sample is
seen exactly once per epoch, and every rank takes the same number of steps."""
from __future__ import annotations

import logging
import os
import shutil

import numpy as np
import pytest
import torch

from clipdistill.loaders import EmptySourceError, ImageLoader, OutputSpec
from clipdistill.loaders.sources import resolve_source
from clipdistill.loaders.synthetic import LOADABLE_KINDS, encode, natural_image

G = 4
OUT = (OutputSpec("student", 16),)
# What each bad kind is rejected for, with the cheap check on (default) and off.
REASONS = {"truncated": "truncated", "random_bytes": "unknown_format", "empty": "empty",
           "text": "unknown_format", "corrupt_scan": "decode_error"}
REASONS_NO_PRECHECK = dict(REASONS, truncated="decode_error")


def _epoch(loaders):
    """One epoch on every rank; returns (valid ids seen, steps per rank, rejects by location)."""
    seen, steps, rejects = [], [], {}
    for ld in loaders:
        batches = list(ld)
        steps.append(len(batches))
        for b in batches:
            assert all(x.shape[0] == b.mask.shape[0] for x in b.images.values())
            seen.extend(b.sample_ids[b.mask].tolist())
            for x in b.images.values():
                assert torch.isfinite(x).all() and (x[~b.mask] == 0).all()
            rejects.update({os.path.basename(r.location): r.reason for r in b.rejects})
    return seen, steps, rejects


@pytest.mark.parametrize("precheck", [True, False])
@pytest.mark.parametrize("world_size", [1, 3])
def test_every_bad_kind_is_rejected_and_every_valid_sample_seen_once(
        bad_folder, cache_dir, cpu_backend, precheck, world_size, caplog):
    root, kinds = bad_folder
    samples = resolve_source(root, cache_dir=cache_dir)
    bad_ids = {samples.paths.index(kinds[k].name) for k in REASONS}
    loaders = [ImageLoader(root, global_batch_size=G * world_size, outputs=OUT, backend=cpu_backend, rank=r,
                           world_size=world_size, cache_dir=cache_dir, workers=2, precheck=precheck)
               for r in range(world_size)]
    with caplog.at_level(logging.WARNING, logger="clipdistill.loaders"):
        seen, steps, rejects = _epoch(loaders)
    assert len(set(steps)) == 1  # ranks stay in step
    assert sorted(seen) == sorted(set(range(len(samples))) - bad_ids)  # each valid sample exactly once
    expected = REASONS if precheck else REASONS_NO_PRECHECK
    assert rejects == {kinds[k].name: reason for k, reason in expected.items()}
    for k in REASONS:  # logged with the path
        assert str(kinds[k]) in caplog.text
    state_rejects = {int(r["sample_id"]) for ld in loaders for r in ld.state_dict()["rejects"]}
    assert state_rejects == bad_ids
    # next epoch: known rejects (shared between ranks, as sync_rejects does) are padding from the start
    everyone = [r for ld in loaders for r in ld.rejects]
    for ld in loaders:
        ld.add_rejects(everyone)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="clipdistill.loaders"):
        seen2, _, rejects2 = _epoch(loaders)
    assert sorted(seen2) == sorted(seen) and rejects2 == {} and "rejected" not in caplog.text


def test_png_grayscale_and_cmyk_named_jpg_load_as_rgb(bad_folder, cache_dir, cpu_backend):
    root, kinds = bad_folder
    samples = resolve_source(root, cache_dir=cache_dir)
    spec = OutputSpec("img", 16, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    ld = ImageLoader(root, global_batch_size=G, outputs=(spec,), backend=cpu_backend, cache_dir=cache_dir,
                     workers=1)
    ids = {k: samples.paths.index(kinds[k].name) for k in LOADABLE_KINDS}
    crops = np.array([[0, 0, 40, 40]] * len(ids))
    images = ld.render(list(ids.values()), crops, np.zeros(len(ids), bool))["img"]
    assert images.shape == (3, 3, 16, 16)
    gray = images[list(ids).index("grayscale")]
    assert torch.allclose(gray[0], gray[1]) and torch.allclose(gray[1], gray[2])  # L -> RGB: equal channels
    for k in LOADABLE_KINDS:
        assert images[list(ids).index(k)].std() > 0.05, k


def test_cmyk_converts_alike_in_both_backends(bad_folder, cache_dir, require_dali):
    root, kinds = bad_folder
    samples = resolve_source(root, cache_dir=cache_dir)
    sid = samples.paths.index(kinds["cmyk"].name)
    out = {}
    for backend in ("torch", "dali-cpu"):
        ld = ImageLoader(root, global_batch_size=G, outputs=OUT, backend=backend, cache_dir=cache_dir, workers=1)
        out[backend] = ld.render([sid], [[5, 5, 50, 60]], [True])["student"]
    assert (out["torch"] - out["dali-cpu"]).abs().mean() < 0.05


def test_files_deleted_or_unreadable_after_indexing_are_rejected(tmp_path, bad_folder, cache_dir, cpu_backend):
    root, kinds = bad_folder
    work = tmp_path / "copy"
    shutil.copytree(root, work)
    for k in REASONS:  # keep only the good files
        (work / kinds[k].name).unlink()
    samples = resolve_source(work, cache_dir=cache_dir)  # indexed now, into a list file
    samples.save(tmp_path / "indexed.list")  # (a folder's saved list would be rescanned: its folder changed)
    names = sorted(samples.paths)[:2]
    (work / names[0]).unlink()  # deleted
    (work / names[1]).unlink()
    (work / names[1]).mkdir()  # now unreadable as a file (works as root too, unlike chmod 000)
    ld = ImageLoader(tmp_path / "indexed.list", global_batch_size=G, outputs=OUT, backend=cpu_backend, workers=2)
    seen, steps, rejects = _epoch([ld])
    assert rejects == {names[0]: "missing", names[1]: "unreadable"}
    assert len(seen) == len(samples) - 2 and len(set(seen)) == len(seen)


def test_a_very_large_image_loads_and_max_pixels_rejects_it(tmp_path, cache_dir, cpu_backend):
    from PIL import Image

    folder = tmp_path / "big"
    folder.mkdir()
    small = natural_image(np.random.default_rng(0), 80, 80)
    big = Image.fromarray(small).resize((8000, 8000), Image.Resampling.BILINEAR)
    big.save(folder / "huge.jpg", quality=80)
    del big
    (folder / "small.jpg").write_bytes(encode(small))
    ld = ImageLoader(folder, global_batch_size=2, outputs=OUT, backend=cpu_backend, cache_dir=cache_dir,
                     workers=1)
    b = next(iter(ld))
    assert b.mask.all() and sorted(b.image_sizes[:, 0].tolist()) == [80, 8000]
    assert torch.isfinite(b.images["student"]).all()
    capped = ImageLoader(folder, global_batch_size=2, outputs=OUT, backend=cpu_backend, cache_dir=cache_dir,
                         workers=1, max_pixels=4096 * 4096)
    b = next(iter(capped))
    assert b.mask.sum() == 1 and [r.reason for r in b.rejects] == ["too_large"]


def test_an_empty_source_is_a_clear_error(tmp_path, cache_dir):
    (tmp_path / "nothing").mkdir()
    with pytest.raises(EmptySourceError, match="no images found"):
        ImageLoader(tmp_path / "nothing", global_batch_size=2, backend="torch", cache_dir=cache_dir)


def test_resume_with_bad_files_equals_uninterrupted(bad_folder, cache_dir, cpu_backend):
    root, _ = bad_folder

    def make():
        return ImageLoader(root, global_batch_size=G, outputs=OUT, backend=cpu_backend, cache_dir=cache_dir,
                           workers=1, seed=3)

    reference = list(make())
    interrupted = make()
    it = iter(interrupted)
    head = [next(it) for _ in range(2)]
    state = interrupted.state_dict()
    resumed = make()
    resumed.load_state_dict(state)
    for a, b in zip(reference, head + list(resumed)):
        assert torch.equal(a.sample_ids, b.sample_ids) and torch.equal(a.images["student"], b.images["student"])
