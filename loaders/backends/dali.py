"""The DALI backends ("dali-gpu", "dali-cpu"): one pipeline graph, fed its views.

Graph, per row (one view of one image)::

    external_source -> encoded bytes, crop anchor (x, y), crop shape (w, h), flip
    decoders.image_slice(device="mixed" | "cpu")    # decodes only the crop window
    for each output size S:
        resize to S x S (antialiased linear or cubic)
        crop_mirror_normalize(mirror=flip, mean, std) -> CHW, fp32 or fp16

The order, crop windows and flips come from the Python side (:mod:`views`);
DALI draws no random numbers and reads no files. The external source is a
callable DALI calls ahead of time (``prefetch`` steps), so reading the files
of the next steps overlaps decoding.

DALI cannot skip a bad sample: a decode error fails the whole iteration. When
it does, each real sample of the failed step is decoded alone in a batch-1
probe pipeline; those that fail are rejected, the pipeline is rebuilt and the
same step runs again without them. An error no probe reproduces is raised.

A JPEG cut mid-scan whose end marker was put back (FF D9) decodes here: libjpeg-turbo and
nvJPEG only warn and fill the missing rows. The torch backend rejects it (``truncated``,
:func:`formats.load_checked`); for DALI runs, ``clipdistill index --decode`` finds such files
first. 16-bit and float pixels are scaled by DALI's decoders (x / 257, 255 x); 32-bit integer
pixels are rejected before decoding (:func:`formats.open_image`).
"""
from __future__ import annotations

import io
import logging
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from .. import formats
from ..plan import OutputSpec, Planner, StepPlan

logger = logging.getLogger("clipdistill.loaders")

_PLACEHOLDER: bytes | None = None


def _placeholder_jpeg() -> bytes:
    """A tiny valid JPEG fed when a step has no real row (DALI needs a non-empty batch)."""
    global _PLACEHOLDER
    if _PLACEHOLDER is None:
        buf = io.BytesIO()
        Image.new("RGB", (8, 8), (128, 128, 128)).save(buf, "JPEG", quality=90)
        _PLACEHOLDER = buf.getvalue()
    return _PLACEHOLDER


def _feed_arrays(plan: StepPlan | None):
    """The external source's four per-row lists for the plan's real rows (or the placeholder)."""
    rows = np.flatnonzero(plan.mask) if plan is not None else np.zeros(0, np.int64)
    if len(rows) == 0:
        return ([np.frombuffer(_placeholder_jpeg(), np.uint8)], [np.zeros(2, np.float32)],
                [np.full(2, 8, np.float32)], [np.zeros((), np.int32)])
    encoded = [np.frombuffer(plan.encoded[r], np.uint8) for r in rows]
    anchors = [plan.crops[r, :2].astype(np.float32) for r in rows]
    shapes = [plan.crops[r, 2:].astype(np.float32) for r in rows]
    flips = [np.asarray(plan.flips[r], dtype=np.int32) for r in rows]
    return encoded, anchors, shapes, flips


class DaliBackend:
    """Decode the planner's steps with DALI, on the GPU (``gpu=True``, "dali-gpu") or the CPU.

    Args:
        planner: makes each step's :class:`StepPlan` (ids, bytes, views).
        outputs: the resolutions to produce from each view.
        gpu: decode on the GPU (device "mixed") instead of the CPU.
        device: where the images go (for ``gpu``, the CUDA device DALI runs on).
        dtype: torch.float32, torch.float16 or torch.bfloat16.
        interpolation: "bilinear" or "bicubic".
        workers: DALI CPU threads.
        prefetch: steps the external source prepares ahead.
        hw_decoder_load: ``gpu`` only: share of JPEG decoding sent to the hardware decoder.
    """

    def __init__(self, planner: Planner, outputs: Sequence[OutputSpec], *, gpu: bool, device: torch.device,
                 dtype: torch.dtype, interpolation: str, workers: int, prefetch: int, hw_decoder_load: float):
        import nvidia.dali  # noqa: F401  (fail here, with the import error, if DALI is missing)

        self.planner = planner
        self.outputs = tuple(outputs)
        self.gpu = gpu
        self.device = torch.device(device)
        self.dtype = dtype
        self.interpolation = interpolation
        self.workers = workers
        self.prefetch = prefetch
        self.hw_decoder_load = hw_decoder_load
        if self.gpu:
            self.device_id = self.device.index if self.device.index is not None else torch.cuda.current_device()
        else:
            self.device_id = None
        self._probe = None

    # ---- graph ----------------------------------------------------------------------------------
    def _build(self, batch_size: int, source=None, prefetch: int = 1):
        """A pipeline reading from ``source`` (a batch_info callable), or from fed named inputs."""
        from nvidia.dali import Pipeline, fn, types

        pipe = Pipeline(batch_size=batch_size, num_threads=self.workers, device_id=self.device_id,
                        prefetch_queue_depth=prefetch)
        interp = types.INTERP_LINEAR if self.interpolation == "bilinear" else types.INTERP_CUBIC
        out_type = types.FLOAT16 if self.dtype == torch.float16 else types.FLOAT
        decoder_kwargs = dict(device="mixed", hw_decoder_load=self.hw_decoder_load,
                              jpeg_fancy_upsampling=True) if self.gpu else dict(device="cpu")
        with pipe:
            if source is not None:
                encoded, anchor, shape, flip = fn.external_source(
                    source=source, batch=True, batch_info=True, num_outputs=4)
            else:
                encoded = fn.external_source(name="encoded")
                anchor = fn.external_source(name="anchor")
                shape = fn.external_source(name="shape")
                flip = fn.external_source(name="flip")
            # Crop numbers are pixels of the stored image (no EXIF rotation, as in the torch backend).
            image = fn.decoders.image_slice(
                encoded, anchor, shape, output_type=types.RGB, normalized_anchor=False,
                normalized_shape=False, adjust_orientation=False, **decoder_kwargs)
            outs = []
            for o in self.outputs:
                resized = fn.resize(image, resize_x=o.size, resize_y=o.size, interp_type=interp, antialias=True)
                outs.append(fn.crop_mirror_normalize(
                    resized, mirror=flip, mean=[m * 255.0 for m in o.mean], std=[s * 255.0 for s in o.std],
                    output_layout="CHW", dtype=out_type))
            pipe.set_outputs(*outs)
        pipe.build()
        return pipe

    def _to_torch(self, outs, plan: StepPlan) -> dict[str, torch.Tensor]:
        """DALI outputs of the plan's real rows -> {name: (R, 3, S, S)}, zeros on padding."""
        device, dtype = self.device, self.dtype
        mask = plan.mask
        rows = np.flatnonzero(mask)
        dali_dtype = torch.float16 if dtype == torch.float16 else torch.float32
        images = {}
        for o, tl in zip(self.outputs, outs):
            shape = (len(rows), 3, o.size, o.size)
            if self.gpu:
                from nvidia.dali.plugin.pytorch import feed_ndarray

                dense = torch.empty(shape, dtype=dali_dtype, device=device)
                feed_ndarray(tl.as_tensor(), dense, cuda_stream=torch.cuda.current_stream(device))
            else:
                # A view of DALI's output buffer, which the next run reuses: copied below.
                dense = torch.from_dlpack(tl.as_tensor())[: len(rows)] if len(rows) else None
            if len(rows) == len(mask):
                out = dense.to(device=device, dtype=dtype, copy=True)
            else:
                out = torch.zeros((len(mask), 3, o.size, o.size), dtype=dtype, device=device)
                if len(rows):
                    out[torch.from_numpy(rows).to(device)] = dense.to(device=device, dtype=dtype)
            images[o.name] = out
        return images

    # ---- bad files ------------------------------------------------------------------------------
    def _probe_plan(self, plan: StepPlan) -> int:
        """Decode each real sample of ``plan`` alone; reject those that fail. Returns how many."""
        found = 0
        for sid in dict.fromkeys(plan.sample_ids[plan.mask].tolist()):
            r = int(np.flatnonzero(plan.sample_ids == sid)[0])
            if self._probe is None:
                self._probe = self._build(batch_size=1)
            encoded, anchors, shapes, flips = _feed_arrays(_single_row(plan, r))
            try:
                self._probe.feed_input("encoded", encoded)
                self._probe.feed_input("anchor", anchors)
                self._probe.feed_input("shape", shapes)
                self._probe.feed_input("flip", flips)
                self._probe.run()
            except Exception as exc:
                self._probe = None  # a failed pipeline is not reused
                detail = _error_summary(exc)
                plan.reject_sample(sid, self.planner.samples.location(sid), formats.DECODE_ERROR, detail)
                found += 1
        return found

    # ---- iteration ------------------------------------------------------------------------------
    def run(self, epoch: int, start: int, stop: int, known: dict):
        planner = self.planner
        known = dict(known)
        plans: dict[int, StepPlan] = {}
        found_rejects: dict[int, list] = {}  # step -> rejects found by probing, reported with that step
        step = start
        pipe = None
        first = start

        def source(info):
            s = first + info.iteration
            if s >= stop:
                return _feed_arrays(None)  # prefetched past the end: never run
            plan = planner.prepare(epoch, s, known)
            plan.rejects[:0] = found_rejects.get(s, [])
            plans[s] = plan
            return _feed_arrays(plan)

        try:
            while step < stop:
                if pipe is None:
                    first = step
                    plans.clear()
                    pipe = self._build(batch_size=planner.rows, source=source, prefetch=self.prefetch)
                try:
                    outs = pipe.run()
                except Exception as exc:
                    pipe = None
                    suspects = [plans[s] for s in sorted(plans) if s >= step]
                    culprits = 0
                    for plan in suspects:  # the failed step first; later ones only if it is clean
                        before = len(plan.rejects)
                        culprits += self._probe_plan(plan)
                        for rej in plan.rejects[before:]:
                            known[rej.sample_id] = rej
                            found_rejects.setdefault(plan.step, []).append(rej)
                        if culprits:
                            break
                    if not culprits:
                        raise RuntimeError(
                            f"DALI failed at epoch {epoch} step {step} and no sample of the step fails alone; "
                            "not a bad-file error") from exc
                    logger.info("clipdistill.loaders: DALI failed at step %d; %d bad file(s) rejected, rebuilding",
                                step, culprits)
                    continue
                plan = plans.pop(step)
                images = self._to_torch(outs, plan)
                plan.drop_payload()
                yield plan, images
                step += 1
        finally:
            pipe = None
            self._probe = None  # no DALI threads outlive the epoch

    def render(self, plan: StepPlan) -> dict[str, torch.Tensor]:
        pipe = self._build(batch_size=max(1, len(plan.sample_ids)))
        encoded, anchors, shapes, flips = _feed_arrays(plan)
        for name, value in (("encoded", encoded), ("anchor", anchors), ("shape", shapes), ("flip", flips)):
            pipe.feed_input(name, value)
        try:
            outs = pipe.run()
        except Exception:
            self._probe_plan(plan)
            if not plan.rejects:
                raise
            return {}
        return self._to_torch(outs, plan)


def _single_row(plan: StepPlan, r: int) -> StepPlan:
    return StepPlan(epoch=plan.epoch, step=plan.step, sample_ids=plan.sample_ids[r:r + 1].copy(),
                    view_ids=plan.view_ids[r:r + 1].copy(), crops=plan.crops[r:r + 1].copy(),
                    flips=plan.flips[r:r + 1].copy(), sizes=plan.sizes[r:r + 1].copy(),
                    encoded=[plan.encoded[r]], opened=[None])


def _error_summary(exc: Exception) -> str:
    """The informative lines of a DALI error (it repeats the pipeline's traceback)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    useful = [ln for ln in lines if ("rror" in ln or "ailed" in ln or "nvimgcodec" in ln.lower())
              and "Critical error in pipeline" not in ln and "which was used" not in ln]
    return " | ".join(useful[-2:] or lines[-1:])[:300]
