"""What one rank decodes at one step, and the output contract every backend shares.

The leaf of :mod:`clipdistill.loaders` that the backends (:mod:`.backends.dali`,
:mod:`.backends.torch`) and :mod:`.loader` import; it imports none of them.

- :class:`OutputSpec`: one output resolution and its normalization;
- :class:`Reject`: a sample taken out of the run, and why;
- :class:`StepPlan`: one step's rows (R = samples x views): sample ids, view ids,
  crop windows, flips, image sizes, and the encoded bytes to decode;
- :class:`Planner`: the backend-independent part of a step (which samples, read
  and checked, with which views), as :meth:`Planner.prepare`;
- :func:`normalize_hwc_uint8`: uint8 HWC images to normalized CHW tensors.

The shapes and the batch contract are in :mod:`.loader`'s docstring.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import numpy as np
import torch

from . import formats
from .sources import SampleList
from .views import ReplayViews, Transform, epoch_order, rank_slots, sample_views, steps_per_epoch

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class OutputSpec:
    """One output resolution: square side ``size``, normalized as (x / 255 - mean) / std."""

    name: str
    size: int
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD

    def __post_init__(self):
        if self.size < 1:
            raise ValueError(f"OutputSpec {self.name!r}: size must be >= 1, got {self.size}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"OutputSpec {self.name!r}: mean and std need 3 values, std > 0")


@dataclass(frozen=True)
class Reject:
    """A sample taken out of the run, and why."""

    sample_id: int
    location: str
    reason: str
    detail: str
    epoch: int
    step: int

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class StepPlan:
    """What one rank decodes at one step (R rows); the fields are :class:`.loader.Batch`'s, in numpy."""

    epoch: int
    step: int
    sample_ids: np.ndarray  # (R,) int64, -1 on padding
    view_ids: np.ndarray  # (R,) int64
    crops: np.ndarray  # (R, 4) int32
    flips: np.ndarray  # (R,) bool
    sizes: np.ndarray  # (R, 2) int32
    rejects: list[Reject] = field(default_factory=list)
    encoded: list = field(default_factory=list, repr=False)  # per row: bytes or None; not sent between processes
    opened: list = field(default_factory=list, repr=False)  # per row: PIL image (torch backend) or None

    @property
    def mask(self) -> np.ndarray:
        return self.sample_ids >= 0

    def drop_payload(self) -> "StepPlan":
        self.encoded, self.opened = [], []
        return self

    def reject_sample(self, sample_id: int, location: str, reason: str, detail: str) -> None:
        rows = self.sample_ids == sample_id
        self.sample_ids[rows] = -1
        self.crops[rows] = 0
        self.flips[rows] = False
        self.sizes[rows] = 0
        for r in np.flatnonzero(rows):
            if self.encoded:
                self.encoded[r] = None
            if self.opened:
                self.opened[r] = None
        self.rejects.append(Reject(int(sample_id), location, reason, detail[:300], self.epoch, self.step))


class Planner:
    """The backend-independent part of a step: ids, reads, checks, view numbers."""

    def __init__(self, samples: SampleList, *, global_batch_size: int, rank: int, world_size: int,
                 views_per_sample: int, seed: int, transform: Transform, precheck: bool, max_pixels: int,
                 replay: ReplayViews | None = None):
        self.samples = samples
        self.replay = replay
        self.global_batch_size = global_batch_size
        self.rank = rank
        self.world_size = world_size
        self.views_per_sample = views_per_sample
        self.seed = seed
        self.transform = transform
        self.precheck = precheck
        self.max_pixels = max_pixels
        self._order_epoch: int | None = None
        self._order: np.ndarray | None = None

    @property
    def rows(self) -> int:
        return self.global_batch_size // self.world_size * self.views_per_sample

    def steps(self) -> int:
        return steps_per_epoch(len(self.samples), self.global_batch_size)

    def order(self, epoch: int) -> np.ndarray:
        if self._order_epoch != epoch:
            self._order = epoch_order(len(self.samples), self.seed, epoch)
            self._order_epoch = epoch
        return self._order

    def prepare(self, epoch: int, step: int, known: Mapping[int, object], open_images: bool = False) -> StepPlan:
        """Read and check this rank's samples of a step and compute their views."""
        slots = rank_slots(self.order(epoch), step, self.global_batch_size, self.rank, self.world_size)
        V = self.views_per_sample
        R = len(slots) * V
        plan = StepPlan(
            epoch=epoch, step=step,
            sample_ids=np.repeat(slots, V), view_ids=np.tile(np.arange(V, dtype=np.int64), len(slots)),
            crops=np.zeros((R, 4), np.int32), flips=np.zeros(R, bool), sizes=np.zeros((R, 2), np.int32),
            encoded=[None] * R, opened=[None] * R,
        )
        for j, sid in enumerate(slots.tolist()):
            if sid < 0:
                continue
            if sid in known:
                plan.sample_ids[j * V:(j + 1) * V] = -1
                continue
            reason, detail, data, img, size = self.read(sid, open_images)
            if reason is not None:
                plan.reject_sample(sid, self.samples.location(sid), reason, detail)
                continue
            plan.sizes[j * V:(j + 1) * V] = size
            for r in range(j * V, (j + 1) * V):
                plan.encoded[r] = data
                plan.opened[r] = img
        valid = plan.mask
        view_epoch = epoch
        if self.replay is not None:
            plan.view_ids[valid] = self.replay.choose(self.seed, epoch, plan.sample_ids[valid])
            view_epoch = self.replay.view_epoch
        if valid.any():
            crops, flips = sample_views(self.transform, self.seed, view_epoch, plan.sample_ids[valid],
                                        plan.view_ids[valid], plan.sizes[valid, 0], plan.sizes[valid, 1])
            plan.crops[valid] = crops
            plan.flips[valid] = flips
        return plan

    def read(self, sid: int, open_image: bool = False):
        """Read and check one sample: (reject reason or None, detail, bytes, PIL image or None, (w, h))."""
        try:
            data = self.samples.read(sid)
        except FileNotFoundError:
            return formats.MISSING, "file not found (deleted after indexing?)", None, None, None
        except OSError as exc:
            return formats.UNREADABLE, f"{type(exc).__name__}: {exc}", None, None, None
        reason, detail = formats.check_bytes(data)
        # Format and emptiness are always checked; the end-marker check only with precheck.
        if reason is not None and (self.precheck or reason != formats.TRUNCATED):
            return reason, detail, None, None, None
        reason, detail, img, size = formats.open_image(data, self.max_pixels)
        if reason is not None:
            return reason, detail, None, None, None
        return None, "", data, img if open_image else None, size


def normalize_hwc_uint8(images: torch.Tensor, spec: OutputSpec, dtype: torch.dtype,
                        device: torch.device) -> torch.Tensor:
    """(R, S, S, 3) uint8 -> (R, 3, S, S) normalized, on ``device`` in ``dtype``."""
    x = images.to(device, non_blocking=True).permute(0, 3, 1, 2).float()
    mean = torch.tensor(spec.mean, device=device).view(1, 3, 1, 1) * 255.0
    std = torch.tensor(spec.std, device=device).view(1, 3, 1, 1) * 255.0
    return ((x - mean) / std).to(dtype).contiguous(memory_format=torch.contiguous_format)
