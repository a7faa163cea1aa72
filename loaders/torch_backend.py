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

import warnings

import numpy as np
import torch

from . import formats
from .loader import ImageLoader, StepPlan, normalize_hwc_uint8


def _pil_filter(interpolation: str):
    from PIL import Image

    return Image.Resampling.BILINEAR if interpolation == "bilinear" else Image.Resampling.BICUBIC


def decode_plan(plan: StepPlan, outputs, interpolation: str, locate) -> dict[str, np.ndarray]:
    """Decode every real row of a plan with PIL: {name: (R, S, S, 3) uint8}, zeros on padding.

    A sample that fails to decode is rejected in the plan (its rows become padding);
    ``locate(sample_id)`` names its file in the reject.
    """
    from PIL import Image

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
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                    img.load()
                if img.mode != "RGB":
                    img = img.convert("RGB")  # L, CMYK, P, RGBA, I;16 ... -> RGB
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
            plan.reject_sample(sid, locate(sid), formats.DECODE_ERROR, f"{type(exc).__name__}: {exc}")
            decoded.pop(sid, None)
    return arrays


def to_images(plan: StepPlan, arrays: dict[str, np.ndarray], loader: ImageLoader) -> dict[str, torch.Tensor]:
    """uint8 HWC arrays -> {name: (R, 3, S, S)} normalized, on the loader's device, zeros on padding."""
    pin = loader.device.type == "cuda" and torch.cuda.is_available()
    padding = ~plan.mask
    images = {}
    for o in loader.outputs:
        t = torch.from_numpy(arrays[o.name])
        if pin:
            t = t.pin_memory()
        out = normalize_hwc_uint8(t, o, loader.dtype, loader.device)
        if padding.any():
            out[torch.from_numpy(padding).to(out.device)] = 0
        images[o.name] = out
    return images


class _StepDataset(torch.utils.data.Dataset):
    """Item ``k`` is step ``start + k`` of one epoch for one rank.

    For CPU output the worker also normalizes (in parallel, and the main process
    stays free); for GPU output it returns uint8 and the GPU normalizes.
    """

    def __init__(self, loader: ImageLoader, epoch: int, start: int, stop: int, known: dict):
        self.loader = loader
        self.epoch, self.start, self.stop = epoch, start, stop
        self.known = known

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, k: int):
        loader = self.loader
        plan = loader.planner.prepare(self.epoch, self.start + k, self.known, open_images=True)
        arrays = decode_plan(plan, loader.outputs, loader.interpolation, loader.samples.location)
        plan.drop_payload()
        if loader.device.type == "cpu":
            return plan, to_images(plan, arrays, loader)
        return plan, arrays


def _identity(item):
    return item


class TorchBackend:
    def __init__(self, loader: ImageLoader):
        self.loader = loader

    def run(self, epoch: int, start: int, stop: int, known: dict):
        loader = self.loader
        dataset = _StepDataset(loader, epoch, start, stop, known)
        if len(dataset) == 0:
            return
        workers = min(loader.workers, len(dataset))
        if workers <= 1:
            items = (dataset[k] for k in range(len(dataset)))
        else:
            items = torch.utils.data.DataLoader(
                dataset, batch_size=None, shuffle=False, num_workers=workers, collate_fn=_identity,
                prefetch_factor=loader.prefetch, persistent_workers=False,
            )
        for plan, out in items:
            if loader.device.type != "cpu":
                out = to_images(plan, out, loader)
            yield plan, out

    def render(self, plan: StepPlan) -> dict[str, torch.Tensor]:
        arrays = decode_plan(plan, self.loader.outputs, self.loader.interpolation, self.loader.samples.location)
        return to_images(plan, arrays, self.loader)
