"""ImageLoader: a source of encoded images to batches of normalized views on a device.

One object, three backends with one output contract:

- ``"dali-gpu"``: DALI decodes on the GPU (``decoders.image_slice`` on device
  "mixed": nvJPEG plus the hardware JPEG engines, their share set by
  ``hw_decoder_load``), resizes and normalizes there;
- ``"dali-cpu"``: the same DALI graph on the CPU (``device_id=None``, libjpeg-turbo);
- ``"torch"``: a PyTorch DataLoader whose workers decode with PIL.
- ``"auto"``: dali-gpu when DALI imports and CUDA is available, else dali-cpu when
  DALI imports, else torch. The choice is logged (logger ``clipdistill.loaders``).

The backends live in :mod:`.backends` and receive plain arguments (the
:class:`Planner`, the output specs, device, dtype, ...); they and this module
import the shared types from :mod:`.plan`.

What every backend does per step (see :mod:`views` for the numbers):

1. the rank's sample ids for the step (a fixed slice of the global batch);
2. read each file, reject what cannot be read, what is not an image, what the
   cheap check fails (``precheck``) and images over ``max_pixels``;
3. the crop window and flip of each view from (seed, epoch, sample_id, view);
4. one decode of the crop window per view, resized to every output size and
   normalized with each output's own mean and std (so a 336 teacher input and a
   224 student input show the same view);
5. a sample whose decode fails is rejected (DALI: the pipeline is rebuilt and
   the same step runs again without it); its rows become padding.

Batch contract (:class:`Batch`), with R = (global_batch_size // world_size) * views_per_sample
rows, sample-major (row ``i`` is view ``i % V`` of slot ``i // V``):

- ``images[name]``: (R, 3, S, S) on ``device`` in ``dtype``, for each OutputSpec;
  padding rows are zeros;
- ``sample_ids`` (R,) int64 (-1 on padding), ``view_ids`` (R,) int64,
  ``crops`` (R, 4) int32 (x, y, w, h in pixels of the stored image),
  ``flips`` (R,) bool, ``image_sizes`` (R, 2) int32 (width, height),
  ``mask`` (R,) bool (True for real rows) -- all on the CPU;
- ``epoch``, ``step``, and ``rejects`` found while making this batch.

Every rank takes ceil(N / global_batch_size) steps per epoch, whatever it rejects.
Resume: :meth:`ImageLoader.state_dict` / :meth:`ImageLoader.load_state_dict`; the
next batch after a resume is the one the uninterrupted run would have yielded,
also with another world size (same global batch size).

Backend agreement: given the same view numbers, dali-cpu and torch outputs
differ by resampling only (both decode with libjpeg-turbo; DALI's antialiased
resize vs PIL's). On generated 500x375 photos at 224 and 336, in normalized
units: mean |diff| <= 0.003, 99.9th percentile <= 0.03 (two uint8 levels), max
0.41; the tests hold mean < 0.01, p99.9 < 0.08, max < 0.6
(tests/loaders/test_backends.py). dali-gpu (nvJPEG, fancy upsampling on) is
compared with dali-cpu by the GPU tests.
"""
from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass
from typing import Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.distributed as dist

from . import formats
from .backends.dali import DaliBackend
from .backends.torch import TorchBackend
# CLIP_MEAN ... normalize_hwc_uint8 are defined in plan.py (the leaf the backends import) and stay
# importable from here, where they were defined before.
from .plan import CLIP_MEAN, CLIP_STD, OutputSpec, Planner, Reject, StepPlan, normalize_hwc_uint8
from .sources import resolve_source
from .views import CenterCrop, RandomResizedCrop, ReplayViews, Transform, sample_views

__all__ = [
    "BACKENDS", "INTERPOLATIONS", "CLIP_MEAN", "CLIP_STD", "OutputSpec", "Reject", "StepPlan", "Batch", "Planner",
    "dali_available", "resolve_backend", "normalize_hwc_uint8", "ImageLoader",
]

logger = logging.getLogger("clipdistill.loaders")

BACKENDS = ("dali-gpu", "dali-cpu", "torch", "auto")
INTERPOLATIONS = ("bilinear", "bicubic")
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass
class Batch:
    """One step's batch for one rank (see the module docstring for shapes)."""

    images: dict[str, torch.Tensor]
    sample_ids: torch.Tensor
    view_ids: torch.Tensor
    crops: torch.Tensor
    flips: torch.Tensor
    image_sizes: torch.Tensor
    mask: torch.Tensor
    epoch: int
    step: int
    rejects: list[Reject]


def dali_available() -> bool:
    """Whether NVIDIA DALI can be imported (the optional extra ``clipdistill[dali-cuda13]``)."""
    try:
        return importlib.util.find_spec("nvidia.dali") is not None
    except ModuleNotFoundError:
        return False


def resolve_backend(backend: str, device: "str | torch.device | None" = None) -> str:
    """The concrete backend for a requested one ("auto" picks; others are checked)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}; got {backend!r}")
    want_cpu = device is not None and torch.device(device).type == "cpu"
    if backend == "auto":
        if dali_available() and torch.cuda.is_available() and not want_cpu:
            chosen, why = "dali-gpu", "DALI imports and CUDA is available"
        elif dali_available():
            chosen, why = "dali-cpu", "DALI imports, no CUDA device" if not torch.cuda.is_available() \
                else "DALI imports, CPU output requested"
        else:
            chosen, why = "torch", "DALI is not installed (pip install 'clipdistill[dali-cuda13]')"
        logger.info("clipdistill.loaders: backend 'auto' chose %r (%s)", chosen, why)
        return chosen
    if backend.startswith("dali") and not dali_available():
        raise ImportError(
            f"backend {backend!r} needs NVIDIA DALI: pip install nvidia-dali-cuda130 "
            "(or clipdistill[dali-cuda13]); or use backend='torch'"
        )
    if backend == "dali-gpu" and not torch.cuda.is_available():
        raise RuntimeError("backend 'dali-gpu' needs a CUDA device; none is visible to torch (use 'dali-cpu')")
    logger.info("clipdistill.loaders: backend %r (requested)", backend)
    return backend


class ImageLoader:
    """Batches of replayable views of a source's images, for one rank of a run.

    Args:
        source: folder, list file, tar shard(s) or SampleList (see :func:`resolve_source`).
        global_batch_size: samples per step over all ranks (G); must divide by world_size.
        outputs: the resolutions to produce from each view (e.g. student 224 and teacher 336).
        transform: :class:`RandomResizedCrop` (train) or :class:`CenterCrop` (eval).
        views_per_sample: views of each sample per step (V); rows per batch are G // world_size * V.
        seed: the run's seed; with the epoch it fixes the order and every view.
        rank, world_size: this process's place in the run.
        backend: "dali-gpu" | "dali-cpu" | "torch" | "auto".
        device: where images go (default: the GPU for dali-gpu, else the CPU).
        dtype: torch.float32, torch.float16 or torch.bfloat16.
        workers: DALI CPU threads or DataLoader worker processes (default: all cores).
        interpolation: "bilinear" or "bicubic" (both antialiased when shrinking).
        precheck: check each file's end marker before decoding (cheap; catches truncated files).
        max_pixels: larger images are rejected.
        hw_decoder_load: dali-gpu only: share of JPEG decoding sent to the hardware decoder.
        prefetch: steps prepared ahead.
        cache_dir: where a scanned folder's list is saved.
        replay: show stored views (:class:`ReplayViews`, the teacher cache) instead of new ones.
    """

    def __init__(
        self,
        source,
        *,
        global_batch_size: int,
        outputs: Sequence[OutputSpec] = (OutputSpec("image", 224),),
        transform: Transform = RandomResizedCrop(),
        views_per_sample: int = 1,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        backend: str = "auto",
        device: "str | torch.device | None" = None,
        dtype: torch.dtype = torch.float32,
        workers: int | None = None,
        interpolation: str = "bilinear",
        precheck: bool = True,
        max_pixels: int = formats.DEFAULT_MAX_PIXELS,
        hw_decoder_load: float = 0.65,
        prefetch: int = 2,
        cache_dir: str | os.PathLike | None = None,
        replay: ReplayViews | None = None,
    ):
        if global_batch_size < 1 or world_size < 1 or global_batch_size % world_size:
            raise ValueError(
                f"global_batch_size ({global_batch_size}) must be a positive multiple of world_size ({world_size})"
            )
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}); got {rank}")
        if views_per_sample < 1:
            raise ValueError(f"views_per_sample must be >= 1; got {views_per_sample}")
        if replay is not None and views_per_sample != 1:
            raise ValueError("replay: a replayed run shows one stored view per sample; set views_per_sample=1")
        outputs = tuple(outputs)
        if not outputs or len({o.name for o in outputs}) != len(outputs):
            raise ValueError("outputs: give at least one OutputSpec, with distinct names")
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {_DTYPES}; got {dtype}")
        if interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {INTERPOLATIONS}; got {interpolation!r}")
        if not isinstance(transform, (RandomResizedCrop, CenterCrop)):
            raise TypeError(f"transform must be RandomResizedCrop or CenterCrop; got {transform!r}")
        self.samples = resolve_source(source, cache_dir=cache_dir)
        self.backend = resolve_backend(backend, device)
        if device is None:
            device = "cuda" if self.backend == "dali-gpu" else "cpu"
        self.device = torch.device(device)
        if self.backend == "dali-gpu" and self.device.type != "cuda":
            raise ValueError(f"backend 'dali-gpu' puts images on a CUDA device; got device={self.device}")
        if self.backend == "dali-cpu" and self.device.type != "cpu":
            logger.info("clipdistill.loaders: dali-cpu output is copied to %s", self.device)
        self.outputs = outputs
        self.dtype = dtype
        self.interpolation = interpolation
        self.seed = int(seed)
        self.planner = Planner(
            self.samples, global_batch_size=global_batch_size, rank=rank, world_size=world_size,
            views_per_sample=views_per_sample, seed=self.seed, transform=transform, precheck=precheck,
            max_pixels=max_pixels, replay=replay,
        )
        self.workers = max(1, workers if workers is not None else (os.cpu_count() or 1))
        self.hw_decoder_load = hw_decoder_load
        self.prefetch = max(1, prefetch)
        self._epoch = 0
        self._consumed = 0
        self._rejects: dict[int, Reject] = {}
        self._impl = self._make_backend()

    def _make_backend(self) -> DaliBackend | TorchBackend:
        common = dict(device=self.device, dtype=self.dtype, interpolation=self.interpolation,
                      workers=self.workers, prefetch=self.prefetch)
        if self.backend == "torch":
            return TorchBackend(self.planner, self.outputs, **common)
        return DaliBackend(self.planner, self.outputs, gpu=self.backend == "dali-gpu",
                           hw_decoder_load=self.hw_decoder_load, **common)

    # ---- position -------------------------------------------------------------------------------
    @property
    def global_batch_size(self) -> int:
        return self.planner.global_batch_size

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def samples_consumed(self) -> int:
        return self._consumed

    @property
    def rejects(self) -> list[Reject]:
        """Every sample rejected so far (by this rank, or carried in a loaded state)."""
        return list(self._rejects.values())

    def add_rejects(self, rejects) -> int:
        """Learn rejects found elsewhere (another rank; Reject objects or their dicts); returns how many were new.

        Each rank finds the bad files of its own slices. Sharing them (e.g. with
        :meth:`sync_rejects` at the end of an epoch) spares other ranks trying them
        again in later epochs; the batches do not depend on it either way.
        """
        added = 0
        for r in rejects:
            r = r if isinstance(r, Reject) else Reject(**r)
            if r.sample_id not in self._rejects:
                self._rejects[r.sample_id] = r
                added += 1
        return added

    def sync_rejects(self, group=None) -> int:
        """All-gather every rank's rejects (a collective: call it on all ranks, e.g. after an epoch).

        No-op without an initialized torch.distributed process group. Returns how many were new here.
        """
        if not (dist.is_available() and dist.is_initialized()):
            return 0
        gathered: list = [None] * dist.get_world_size(group)
        dist.all_gather_object(gathered, [r.as_dict() for r in self._rejects.values()], group=group)
        return self.add_rejects(r for part in gathered for r in part)

    def __len__(self) -> int:
        """Steps per epoch (the same on every rank)."""
        return self.planner.steps()

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its beginning at the next iteration."""
        self._epoch, self._consumed = int(epoch), 0

    def state_dict(self) -> dict:
        """The loader's position, for a checkpoint (plain Python types)."""
        return {
            "version": 1,
            "epoch": self._epoch,
            "samples_consumed": self._consumed,
            "global_batch_size": self.global_batch_size,
            "seed": self.seed,
            "num_samples": len(self.samples),
            "list_digest": self.samples.digest(),
            "rejects": [r.as_dict() for r in self._rejects.values()],
        }

    def load_state_dict(self, state: Mapping) -> None:
        """Continue from a saved position (also one saved with another world size)."""
        if state.get("version") != 1:
            raise ValueError(f"loader state: unknown version {state.get('version')!r}")
        if state["num_samples"] != len(self.samples) or state["list_digest"] != self.samples.digest():
            raise ValueError(
                "loader state: the sample list changed since the checkpoint "
                f"({state['num_samples']} samples, digest {state['list_digest']} then; "
                f"{len(self.samples)}, {self.samples.digest()} now); resume with the saved list file"
            )
        if state["seed"] != self.seed:
            raise ValueError(f"loader state: seed {state['seed']} in the checkpoint, {self.seed} given")
        consumed = int(state["samples_consumed"])
        if consumed % self.global_batch_size:
            raise ValueError(
                f"loader state: {consumed} samples consumed is not a multiple of the global batch size "
                f"{self.global_batch_size}; resume with the checkpoint's global batch size "
                f"({state['global_batch_size']})"
            )
        self._epoch = int(state["epoch"])
        self._consumed = consumed
        for r in state.get("rejects", []):
            self._rejects.setdefault(int(r["sample_id"]), Reject(**r))

    # ---- iteration ------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[Batch]:
        """The rest of the current epoch, one Batch per step; then the epoch advances."""
        steps = len(self)
        if self._consumed >= steps * self.global_batch_size:
            self._epoch, self._consumed = self._epoch + 1, 0
        epoch, start = self._epoch, self._consumed // self.global_batch_size
        for plan, images in self._impl.run(epoch, start, steps, dict(self._rejects)):
            for rej in plan.rejects:
                if rej.sample_id not in self._rejects:
                    self._rejects[rej.sample_id] = rej
                    logger.warning("clipdistill.loaders: rejected sample %d (%s): %s: %s",
                                   rej.sample_id, rej.location, rej.reason, rej.detail)
            self._consumed = (plan.step + 1) * self.global_batch_size
            yield self._batch(plan, images)
        self._epoch, self._consumed = epoch + 1, 0

    def _batch(self, plan: StepPlan, images: dict[str, torch.Tensor]) -> Batch:
        return Batch(
            images=images,
            sample_ids=torch.from_numpy(plan.sample_ids.copy()),
            view_ids=torch.from_numpy(plan.view_ids.copy()),
            crops=torch.from_numpy(plan.crops.copy()),
            flips=torch.from_numpy(plan.flips.copy()),
            image_sizes=torch.from_numpy(plan.sizes.copy()),
            mask=torch.from_numpy(plan.mask.copy()),
            epoch=plan.epoch,
            step=plan.step,
            rejects=list(plan.rejects),
        )

    # ---- replay ---------------------------------------------------------------------------------
    def view_params(self, epoch: int, sample_ids: Sequence[int], view_ids: Sequence[int]):
        """Recompute the crops and flips of views from their numbers (reads the image headers).

        Returns:
            crops (R, 4) int32 tensor, flips (R,) bool tensor.
        """
        sample_ids = np.asarray(sample_ids, dtype=np.int64)
        sizes = np.zeros((len(sample_ids), 2), np.int64)
        for i, sid in enumerate(sample_ids.tolist()):
            _, sizes[i] = formats.image_size(self.samples.read(sid))
        crops, flips = sample_views(self.planner.transform, self.seed, epoch, sample_ids,
                                    np.asarray(view_ids, dtype=np.int64), sizes[:, 0], sizes[:, 1])
        return torch.from_numpy(crops), torch.from_numpy(flips)

    def render(self, sample_ids: Sequence[int], crops, flips) -> dict[str, torch.Tensor]:
        """Decode given views (crop x, y, w, h and flip per row) with this loader's backend.

        Replaying a batch's ``sample_ids``, ``crops`` and ``flips`` (its real rows)
        reproduces its images. Returns {name: (R, 3, S, S)} on the loader's device.
        """
        sample_ids = np.asarray(sample_ids, dtype=np.int64)
        crops = np.asarray(crops, dtype=np.int32).reshape(len(sample_ids), 4)
        flips = np.asarray(flips, dtype=bool).reshape(len(sample_ids))
        R = len(sample_ids)
        plan = StepPlan(epoch=-1, step=-1, sample_ids=sample_ids.copy(), view_ids=np.zeros(R, np.int64),
                        crops=crops.copy(), flips=flips.copy(), sizes=np.zeros((R, 2), np.int32),
                        encoded=[self.samples.read(int(s)) for s in sample_ids], opened=[None] * R)
        images = self._impl.render(plan)
        if plan.rejects:
            raise ValueError(f"render: cannot decode {[(r.location, r.detail) for r in plan.rejects]}")
        return images
