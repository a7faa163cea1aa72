"""Order, sharding and view numbers: pure functions of integers."""
from __future__ import annotations

import numpy as np
import pytest

from clipdistill.loaders.views import (
    CenterCrop,
    RandomResizedCrop,
    counter_hash,
    epoch_order,
    rank_slots,
    sample_views,
    steps_per_epoch,
    uniform,
)


def test_counter_hash_is_a_pure_function_of_its_keys():
    a = counter_hash(7, 3, np.arange(1000), 2)
    b = counter_hash(7, 3, np.arange(1000), 2)
    assert a.dtype == np.uint64 and np.array_equal(a, b)
    assert len(np.unique(a)) == 1000
    # every key matters
    assert not np.array_equal(a, counter_hash(8, 3, np.arange(1000), 2))
    assert not np.array_equal(a, counter_hash(7, 4, np.arange(1000), 2))
    assert not np.array_equal(a, counter_hash(7, 3, np.arange(1000), 3))


def test_uniform_is_uniform():
    u = uniform(0, 0, np.arange(200_000), 0, 5)
    assert u.min() >= 0.0 and u.max() < 1.0
    hist, _ = np.histogram(u, bins=20, range=(0, 1))
    assert np.all(np.abs(hist / 10_000 - 1) < 0.05)


@pytest.mark.parametrize("n", [1, 2, 97, 1000])
def test_epoch_order_is_a_permutation_that_changes_with_epoch_and_seed(n):
    order = epoch_order(n, seed=5, epoch=0)
    assert np.array_equal(np.sort(order), np.arange(n))
    assert np.array_equal(order, epoch_order(n, seed=5, epoch=0))
    if n > 10:
        assert not np.array_equal(order, epoch_order(n, seed=5, epoch=1))
        assert not np.array_equal(order, epoch_order(n, seed=6, epoch=0))


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("n, global_batch", [(23, 6), (24, 6), (5, 12), (1, 6)])
def test_sharding_covers_every_sample_once_per_epoch(world_size, n, global_batch):
    order = epoch_order(n, seed=0, epoch=2)
    steps = steps_per_epoch(n, global_batch)
    taken = []
    for step in range(steps):
        per_rank = [rank_slots(order, step, global_batch, r, world_size) for r in range(world_size)]
        assert all(len(p) == global_batch // world_size for p in per_rank)  # ranks stay in step
        # the ranks' slices, in rank order, are the global batch: independent of the world size
        assert np.array_equal(np.concatenate(per_rank), rank_slots(order, step, global_batch, 0, 1))
        taken.extend(i for p in per_rank for i in p.tolist() if i >= 0)
    assert sorted(taken) == list(range(n))


def test_random_resized_crop_windows_lie_inside_and_follow_scale_and_ratio():
    n = 4000
    rng = np.random.default_rng(0)
    W = rng.integers(300, 600, n)
    H = rng.integers(300, 600, n)
    t = RandomResizedCrop(scale=(0.25, 0.9), ratio=(0.5, 2.0))
    crops, flips = sample_views(t, 3, 1, np.arange(n), np.zeros(n), W, H)
    x, y, w, h = crops.T.astype(np.int64)
    assert crops.dtype == np.int32 and flips.dtype == bool
    assert np.all((x >= 0) & (y >= 0) & (w >= 1) & (h >= 1) & (x + w <= W) & (y + h <= H))
    frac = w * h / (W * H)
    inside = (frac > 0.24) & (frac < 0.91)  # scale, with slack for rounding to whole pixels
    assert inside.mean() > 0.97  # the rest fell back to the centered crop after 10 attempts
    aspect = w[inside] / h[inside]
    assert aspect.min() > 0.49 and aspect.max() < 2.05
    assert np.abs(np.log(aspect)).mean() > 0.3  # log-uniform over [log 0.5, log 2]: mean |.| = 0.35
    assert 0.45 < flips.mean() < 0.55
    # same numbers, same views; another view index, other views
    again = sample_views(t, 3, 1, np.arange(n), np.zeros(n), W, H)
    assert np.array_equal(crops, again[0]) and np.array_equal(flips, again[1])
    other = sample_views(t, 3, 1, np.arange(n), np.ones(n), W, H)
    assert (other[0] != crops).any(axis=1).mean() > 0.9


def test_random_resized_crop_falls_back_to_a_centered_crop_on_extreme_aspect():
    # a 1000x10 strip: no crop of ratio in [3/4, 4/3] with area >= 90% fits, so every view falls back
    t = RandomResizedCrop(scale=(0.9, 1.0), flip=False)
    crops, flips = sample_views(t, 0, 0, np.arange(50), np.zeros(50), np.full(50, 1000), np.full(50, 10))
    assert np.all(crops == np.array([493, 0, 13, 10]))
    assert not flips.any()


@pytest.mark.parametrize("fraction", [1.0, 0.875])
def test_center_crop_is_the_centered_square(fraction):
    crops, flips = sample_views(CenterCrop(fraction), 0, 0, np.arange(3), np.zeros(3),
                                np.array([500, 375, 33]), np.array([375, 500, 33]))
    def rnd(v):  # half up, as the implementation (Python's round() rounds half to even)
        return int(np.floor(v + 0.5))

    side = rnd(375 * fraction)
    assert crops[0].tolist() == [rnd((500 - side) / 2), rnd((375 - side) / 2), side, side]
    assert crops[1].tolist() == [rnd((375 - side) / 2), rnd((500 - side) / 2), side, side]
    assert not flips.any()


def test_bad_transform_arguments_raise():
    with pytest.raises(ValueError, match="scale"):
        RandomResizedCrop(scale=(0.5, 0.1))
    with pytest.raises(ValueError, match="crop_fraction"):
        CenterCrop(0.0)
