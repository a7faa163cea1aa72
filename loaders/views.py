"""Sample order and views as data: counter-based randomness, epoch order, sharding, crops.

Every random number the loader uses is a pure function of integers, computed
with numpy (never a global or stateful RNG, never DALI's random operators):

    u(seed, epoch, sample_id, view, counter) = splitmix64-chain(...) / 2**64   in [0, 1)

- Epoch order: samples sorted by the hash of (seed, epoch, sample_id): a
  permutation that depends on neither the world size nor the history.
- Sharding: the epoch is cut into global batches of G samples; step ``s`` is
  positions [s*G, (s+1)*G) of the order and rank ``r`` of ``w`` takes the
  ``r``-th of its ``w`` equal slices (B = G / w samples). Positions past the end
  of the epoch are padding (id -1), so every rank takes ceil(N / G) steps.
- Views: the crop window (x, y, w, h in pixels of the stored image) and the flip
  of view ``v`` of a sample are functions of (seed, epoch, sample_id, v) and the
  image size; :func:`sample_views` recomputes them at any time.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)

# Counter layout of one view: 4 draws per random-resized-crop attempt, then the flip.
RRC_ATTEMPTS = 10
_FLIP_COUNTER = 4 * RRC_ATTEMPTS


def splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finalizer (Steele, Lea, Flood 2014) on uint64 arrays (wrapping arithmetic)."""
    x = np.asarray(x, dtype=np.uint64)
    with np.errstate(over="ignore"):
        z = x + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
        return z ^ (z >> np.uint64(31))


def counter_hash(*keys) -> np.ndarray:
    """A 64-bit hash of a tuple of non-negative integer keys (scalars or broadcastable arrays)."""
    h = np.zeros((), dtype=np.uint64)
    for key in keys:
        h = splitmix64(h ^ np.asarray(key, dtype=np.int64).astype(np.uint64))
    return h


def uniform(*keys) -> np.ndarray:
    """float64 uniforms in [0, 1) from the hash of the keys (53 random bits)."""
    return (counter_hash(*keys) >> np.uint64(11)).astype(np.float64) * (1.0 / 2**53)


def epoch_order(num_samples: int, seed: int, epoch: int) -> np.ndarray:
    """The permutation of sample ids [0, N) for an epoch (int64, (N,))."""
    keys = counter_hash(seed, epoch, 0x5A3D, np.arange(num_samples, dtype=np.int64))
    return np.argsort(keys, kind="stable").astype(np.int64)


def steps_per_epoch(num_samples: int, global_batch_size: int) -> int:
    return -(-num_samples // global_batch_size)


def rank_slots(order: np.ndarray, step: int, global_batch_size: int, rank: int, world_size: int) -> np.ndarray:
    """Sample ids rank ``rank`` takes at ``step``: (G // world_size,) int64, -1 for padding."""
    per_rank = global_batch_size // world_size
    start = step * global_batch_size + rank * per_rank
    ids = np.full(per_rank, -1, dtype=np.int64)
    got = order[start:start + per_rank]
    ids[: len(got)] = got
    return ids


@dataclass(frozen=True)
class RandomResizedCrop:
    """Training views: a crop of random area fraction and aspect ratio, then an optional flip.

    The algorithm of torchvision's RandomResizedCrop (10 attempts, then a
    center crop clamped to the ratio range), with draws from the counter hash.

    Attributes:
        scale: range of the crop's area as a fraction of the image's.
        ratio: range of the crop's aspect ratio (width / height), sampled log-uniformly.
        flip: flip horizontally with probability 1/2.
    """

    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True

    def __post_init__(self):
        if not (0 < self.scale[0] <= self.scale[1] <= 1.0):
            raise ValueError(f"RandomResizedCrop: scale must satisfy 0 < lo <= hi <= 1, got {self.scale}")
        if not (0 < self.ratio[0] <= self.ratio[1]):
            raise ValueError(f"RandomResizedCrop: ratio must satisfy 0 < lo <= hi, got {self.ratio}")


@dataclass(frozen=True)
class CenterCrop:
    """Evaluation views: the centered square of side ``crop_fraction * min(width, height)``, no flip.

    Resizing that square to S equals "resize the shorter side to S / crop_fraction,
    center crop S" (CLIP's own preprocessing is crop_fraction=1.0; the ImageNet
    habit 224/256 is 0.875), for every output size at once.
    """

    crop_fraction: float = 1.0

    def __post_init__(self):
        if not (0 < self.crop_fraction <= 1.0):
            raise ValueError(f"CenterCrop: crop_fraction must be in (0, 1], got {self.crop_fraction}")


Transform = RandomResizedCrop | CenterCrop


def sample_views(
    transform: Transform,
    seed: int,
    epoch: int,
    sample_ids: np.ndarray,
    view_ids: np.ndarray,
    widths: np.ndarray,
    heights: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Crop windows and flips of views, from their numbers.

    Args:
        sample_ids, view_ids, widths, heights: (R,) integer arrays (image size in pixels).

    Returns:
        crops: (R, 4) int32, x, y, w, h in pixels (1 <= w <= width, 1 <= h <= height).
        flips: (R,) bool.
    """
    sample_ids = np.asarray(sample_ids, dtype=np.int64)
    view_ids = np.asarray(view_ids, dtype=np.int64)
    W = np.asarray(widths, dtype=np.int64)
    H = np.asarray(heights, dtype=np.int64)
    if isinstance(transform, CenterCrop):
        side = np.maximum(1, np.floor(np.minimum(W, H) * transform.crop_fraction + 0.5).astype(np.int64))
        x = np.floor((W - side) / 2 + 0.5).astype(np.int64)
        y = np.floor((H - side) / 2 + 0.5).astype(np.int64)
        crops = np.stack([x, y, side, side], axis=1).astype(np.int32)
        return crops, np.zeros(len(sample_ids), dtype=bool)
    if not isinstance(transform, RandomResizedCrop):
        raise TypeError(f"sample_views: unknown transform {transform!r}")

    # (R, attempts, 4) draws; counters 4k .. 4k+3 for attempt k.
    counters = np.arange(4 * RRC_ATTEMPTS, dtype=np.int64).reshape(1, RRC_ATTEMPTS, 4)
    u = uniform(seed, epoch, sample_ids[:, None, None], view_ids[:, None, None], counters)
    area = (W * H).astype(np.float64)[:, None]
    lo, hi = transform.scale
    target_area = area * (lo + (hi - lo) * u[..., 0])
    log_lo, log_hi = math.log(transform.ratio[0]), math.log(transform.ratio[1])
    aspect = np.exp(log_lo + (log_hi - log_lo) * u[..., 1])
    cw = np.floor(np.sqrt(target_area * aspect) + 0.5).astype(np.int64)
    ch = np.floor(np.sqrt(target_area / aspect) + 0.5).astype(np.int64)
    ok = (cw > 0) & (ch > 0) & (cw <= W[:, None]) & (ch <= H[:, None])
    cx = np.floor(u[..., 2] * (W[:, None] - cw + 1)).astype(np.int64)
    cy = np.floor(u[..., 3] * (H[:, None] - ch + 1)).astype(np.int64)
    first = np.argmax(ok, axis=1)
    found = ok[np.arange(len(first)), first]
    rows = np.arange(len(first))
    x, y, w, h = cx[rows, first], cy[rows, first], cw[rows, first], ch[rows, first]
    if not found.all():
        # torchvision's fallback: the whole image, clamped to the ratio range, centered.
        in_ratio = W / np.maximum(H, 1)
        fw = np.where(in_ratio < transform.ratio[0], W,
                      np.where(in_ratio > transform.ratio[1],
                               np.floor(H * transform.ratio[1] + 0.5).astype(np.int64), W))
        fh = np.where(in_ratio < transform.ratio[0],
                      np.floor(W / transform.ratio[0] + 0.5).astype(np.int64), H)
        fw, fh = np.clip(fw, 1, W), np.clip(fh, 1, H)
        fx, fy = (W - fw) // 2, (H - fh) // 2
        x, y = np.where(found, x, fx), np.where(found, y, fy)
        w, h = np.where(found, w, fw), np.where(found, h, fh)
    crops = np.stack([x, y, w, h], axis=1).astype(np.int32)
    if transform.flip:
        flips = uniform(seed, epoch, sample_ids, view_ids, _FLIP_COUNTER) < 0.5
    else:
        flips = np.zeros(len(sample_ids), dtype=bool)
    return crops, np.asarray(flips, dtype=bool).reshape(len(sample_ids))


# Bumped whenever the mapping from (seed, epoch, sample, view, image size) to a crop and flip
# changes; stored with anything that replays views later (the teacher cache).
VIEWS_VERSION = 1


@dataclass(frozen=True)
class ReplayViews:
    """Replay stored views instead of drawing new ones (the teacher cache's training mode).

    A cache holds ``num_views`` views of every sample, drawn as in epoch ``view_epoch``.
    In each training epoch every sample shows one of them, chosen by a hash of
    (seed, epoch, sample_id): the crop and flip are recomputed from (seed,
    view_epoch, sample_id, view), so they are exactly the stored ones.
    """

    num_views: int
    view_epoch: int = 0

    def __post_init__(self):
        if self.num_views < 1:
            raise ValueError(f"ReplayViews: num_views must be >= 1, got {self.num_views}")

    def choose(self, seed: int, epoch: int, sample_ids: np.ndarray) -> np.ndarray:
        """(N,) int64 view ids in [0, num_views) for the samples of an epoch."""
        ids = np.maximum(np.asarray(sample_ids, dtype=np.int64), 0)
        return (counter_hash(seed, epoch, 0x7EAC, ids) % np.uint64(self.num_views)).astype(np.int64)
