"""The "torch" backend: a PyTorch DataLoader whose workers decode with PIL.

Each DataLoader item is a whole step of one rank: the worker reads and checks
the files, decodes each image once, and cuts every view's crop window out of it
with ``Image.resize(size, box=crop)`` for each output size (antialiased, like
DALI's resize), flipping after. For CPU output the workers normalize too; for
GPU output they return uint8 HWC arrays (4x less to move than floats) and the
main process normalizes on the GPU.

No torchvision: PIL, numpy and torch only. Needs no DALI.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch  # absolute: PyTorch, not this module (clipdistill.loaders.backends.torch)
from PIL import Image

from .. import formats
from ..plan import OutputSpec, Planner, StepPlan, normalize_hwc_uint8


def _pil_filter(interpolation: str):
    return Image.Resampling.BILINEAR if interpolation == "bilinear" else Image.Resampling.BICUBIC


def rgb8(img: Image.Image) -> Image.Image:
    """An 8-bit RGB version of a decoded image, deeper pixels scaled as DALI scales them.

    16-bit pixels (PIL modes I;16*) become round(x / 257), float pixels (mode F) round(255 x),
    clipped to 0..255; other modes (L, CMYK, P, RGBA, ...) go through PIL's convert. PIL's own
    convert would clip 16-bit values at 255 (a white image). 16-bit RGB PNGs are opened by PIL
    as 8-bit RGB (the high byte: at most one level below DALI's rounding).
    """
    if img.mode == "RGB":
        return img
    if img.mode in formats.SIXTEEN_BIT_MODES:
        gray = np.rint(np.asarray(img).astype(np.float32) / 257.0)
    elif img.mode in formats.FLOAT_MODES:
        gray = np.clip(np.rint(np.asarray(img, dtype=np.float32) * 255.0), 0, 255)
    else:
        return img.convert("RGB")
    return Image.fromarray(gray.astype(np.uint8), "L").convert("RGB")


def decode_plan(plan: StepPlan, outputs: Sequence[OutputSpec], interpolation: str,
                locate: Callable[[int], str]) -> dict[str, np.ndarray]:
    """Decode every real row of a plan with PIL: {name: (R, S, S, 3) uint8}, zeros on padding.

    A sample that fails to decode is rejected in the plan (its rows become padding);
    ``locate(sample_id)`` names its file in the reject.
    """
    resample = _pil_filter(interpolation)
    R = len(plan.sample_ids)
    arrays = {o.name: np.zeros((R, o.size, o.size, 3), np.uint8) for o in outputs}
    decoded: dict[int, object] = {}
    for r in range(R):
        sid = int(plan.sample_ids[r])
        if sid < 0:
            continue
        try:
            img = decoded.get(sid)
            if img is None:
                img = plan.opened[r] if plan.opened and plan.opened[r] is not None else None
                if img is None:
                    img, _ = formats.image_size(plan.encoded[r])
                formats.load_checked(img, plan.encoded[r])
                img = rgb8(img)
                decoded[sid] = img
            x, y, w, h = (int(v) for v in plan.crops[r])
            for o in outputs:
                view = img.resize((o.size, o.size), resample, box=(x, y, x + w, y + h))
                if plan.flips[r]:
                    view = view.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
                arrays[o.name][r] = np.asarray(view)
        except Exception as exc:  # PIL raises OSError, ValueError, SyntaxError, ... on bad data
            rows = plan.sample_ids == sid
            for o in outputs:
                arrays[o.name][rows] = 0
            if isinstance(exc, formats.TruncatedImage):
                plan.reject_sample(sid, locate(sid), formats.TRUNCATED, str(exc))
            else:
                plan.reject_sample(sid, locate(sid), formats.DECODE_ERROR, f"{type(exc).__name__}: {exc}")
            decoded.pop(sid, None)
    return arrays


def to_images(plan: StepPlan, arrays: dict[str, np.ndarray], outputs: Sequence[OutputSpec], dtype: torch.dtype,
              device: torch.device) -> dict[str, torch.Tensor]:
    """uint8 HWC arrays -> {name: (R, 3, S, S)} normalized, on ``device`` in ``dtype``, zeros on padding."""
    pin = device.type == "cuda" and torch.cuda.is_available()
    padding = ~plan.mask
    images = {}
    for o in outputs:
        t = torch.from_numpy(arrays[o.name])
        if pin:
            t = t.pin_memory()
        out = normalize_hwc_uint8(t, o, dtype, device)
        if padding.any():
            out[torch.from_numpy(padding).to(out.device)] = 0
        images[o.name] = out
    return images


class _StepDataset(torch.utils.data.Dataset):
    """Item ``k`` is ``decode_step(epoch, start + k, known)``: step ``start + k`` of one epoch for one rank."""

    def __init__(self, decode_step: Callable, epoch: int, start: int, stop: int, known: dict):
        self.decode_step = decode_step
        self.epoch, self.start, self.stop = epoch, start, stop
        self.known = known

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, k: int):
        return self.decode_step(self.epoch, self.start + k, self.known)


def _identity(item):
    return item


class TorchBackend:
    """Decode the planner's steps with PIL in DataLoader workers.

    Args:
        planner: makes each step's :class:`StepPlan` (ids, bytes, views).
        outputs: the resolutions to produce from each view.
        device: where the images go.
        dtype: torch.float32, torch.float16 or torch.bfloat16.
        interpolation: "bilinear" or "bicubic".
        workers: DataLoader worker processes (0 or 1: decode in this process).
        prefetch: steps each worker prepares ahead.
    """

    def __init__(self, planner: Planner, outputs: Sequence[OutputSpec], *, device: torch.device,
                 dtype: torch.dtype, interpolation: str, workers: int, prefetch: int):
        self.planner = planner
        self.outputs = tuple(outputs)
        self.device = torch.device(device)
        self.dtype = dtype
        self.interpolation = interpolation
        self.workers = workers
        self.prefetch = prefetch

    def decode_step(self, epoch: int, step: int, known: dict):
        """One step, in a worker: (plan, images) for CPU output, else (plan, uint8 HWC arrays).

        For CPU output the worker also normalizes (in parallel, and the main process
        stays free); for GPU output it returns uint8 and the GPU normalizes.
        """
        plan = self.planner.prepare(epoch, step, known, open_images=True)
        arrays = decode_plan(plan, self.outputs, self.interpolation, self.planner.samples.location)
        plan.drop_payload()
        if self.device.type == "cpu":
            return plan, to_images(plan, arrays, self.outputs, self.dtype, self.device)
        return plan, arrays

    def run(self, epoch: int, start: int, stop: int, known: dict):
        dataset = _StepDataset(self.decode_step, epoch, start, stop, known)
        if len(dataset) == 0:
            return
        workers = min(self.workers, len(dataset))
        if workers <= 1:
            items = (dataset[k] for k in range(len(dataset)))
        else:
            items = torch.utils.data.DataLoader(
                dataset, batch_size=None, shuffle=False, num_workers=workers, collate_fn=_identity,
                prefetch_factor=self.prefetch, persistent_workers=False,
            )
        for plan, out in items:
            if self.device.type != "cpu":
                out = to_images(plan, out, self.outputs, self.dtype, self.device)
            yield plan, out

    def render(self, plan: StepPlan) -> dict[str, torch.Tensor]:
        arrays = decode_plan(plan, self.outputs, self.interpolation, self.planner.samples.location)
        return to_images(plan, arrays, self.outputs, self.dtype, self.device)
