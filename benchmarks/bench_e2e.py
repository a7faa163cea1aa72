"""End-to-end distillation throughput: the engine, the published practice and the hardware limit.

    python -m benchmarks.bench_e2e [--quick] [--pairs T:S ...] [--learners vpt coop] [--batches 64 256]
                          [--modes live cached reference] [--steps N] [--results DIR]

Run it from the repository root (see "Where rows go" below). For every teacher/student pair,
learner (VPT, CoOp) and batch size, three providers run full distillation steps (loader ->
teacher -> student forward -> loss -> backward -> optimizer step):

- ``ours-live``: the engine's run (:func:`clipdistill.engine.training.builder.build_run`) stepped as
  :class:`~clipdistill.engine.training.trainer.Trainer` steps it: the engine's loader, the frozen teacher
  under no_grad, :class:`~clipdistill.engine.distill.step.DistillStep` (the fused ``kd_loss``), the
  Trainer's optimizer, bf16 autocast on a GPU.
- ``ours-cached``: the same with ``teacher.cache=DIR``; the cache is built once per pair with
  :func:`~clipdistill.engine.training.teacher_cache.build_teacher_cache` (its time is a ``build_ms`` row).
- ``reference``: :class:`ReferencePipeline`, a re-implementation *written here* of what the
  published KDPL / PromptKD code does per step -- **not their code**: a torch DataLoader of PIL
  decoding workers (8 on a GPU machine, fewer on the CPU), the teacher's text features
  recomputed from the class prompts every step (PromptKD's practice), and an eager fp32 KL over
  materialized B x C logits. The models, the learner, the precision and the optimizer are the
  engine's, so the comparison isolates those three practices.

Per case the rows report:

- images/s from an **uninstrumented** run (``measure`` of one step: CUDA events on a GPU, the
  wall clock on the CPU; no synchronization inside a step);
- a time breakdown per stage (loader wait, teacher text, teacher forward, student forward, loss,
  backward, optimizer) from a **separately instrumented** run of the same step split into its
  stages, which synchronizes the device before and after every stage (CUDA events on a GPU,
  ``perf_counter`` on the CPU). The synchronizations remove the overlap of host and device work,
  so the instrumented step is slower than the uninstrumented one; the breakdown says where the
  time goes, the images/s say how fast it goes;
- peak GPU memory (``torch.cuda.max_memory_allocated`` during the timed steps; coarse RSS growth
  on the CPU);
- the hardware limit: FLOPs per image counted with ``torch.utils.flop_counter.FlopCounterMode``
  (teacher forward + student forward and backward, the per-step text-encoder work divided by the
  batch; the fused kd_loss custom op is not counted, it is O(B*C*D), well under 1%) over the
  device's measured matrix rate (a bf16 ``torch.mm`` of 8192^3 on a GPU, fp32 on the CPU), and
  the measured images/s as a fraction of it.

Where rows go: they are written with the repository's shared harness (``benchmarks/harness.py``:
``measure``, ``record``, provenance). This benchmark imports the product; the product never
imports it (``clipdistill bench e2e`` was retired for ``python -m benchmarks.bench_e2e``).

Defaults: on a GPU ViT-L-14 -> ViT-B-16 and ViT-H-14 -> ViT-B-32 with random-init weights,
batches 64 and 256; ``--quick`` (and any run without a GPU): the shipped tiny configs on the CPU.
Each (pair, learner, batch, provider) builds its own run (build_run is the one builder), so a
full default run builds several large models: pick subsets with --pairs/--learners/--batches on
a machine with a per-command time limit.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from benchmarks import harness as _harness
from clipdistill.engine.config.run import load_run_config
from clipdistill.engine.io import image_spec, read_templates
from clipdistill.engine.models.clip import get_tokenizer
from clipdistill.engine.training.builder import build_run
from clipdistill.engine.training.teacher_cache import build_teacher_cache
from clipdistill.engine.training.trainer import Trainer
from clipdistill.kernels import kd_loss
from clipdistill.loaders.synthetic import write_dataset

BENCHMARK = "bench_e2e"
STAGES = ("loader_wait", "teacher_text", "teacher_fwd", "student_fwd", "loss", "backward", "optimizer")
GPU_PAIRS = ("ViT-L-14:ViT-B-16", "ViT-H-14:ViT-B-32")
QUICK_PAIRS = ("clipdistill-tiny-teacher:clipdistill-tiny-student",)


# --------------------------------------------------------------------------------- timing stages


class StageClock:
    """Times named stages of one step; disabled, it costs one ``if`` per stage.

    Enabled, every stage is bracketed by device synchronizations (CUDA events on a GPU,
    ``perf_counter`` on the CPU), so stage times add up to the step's time but host and device
    work no longer overlap.
    """

    def __init__(self, device, enabled: bool):
        self.device = torch.device(device)
        self.enabled = enabled
        self.ms: dict[str, float] = {}

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def reset(self) -> None:
        self.ms = {name: 0.0 for name in STAGES}

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        if not self.enabled:
            yield
            return

        self._sync()
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self._sync()
            elapsed = start.elapsed_time(end)
        else:
            t0 = time.perf_counter()
            yield
            self._sync()
            elapsed = (time.perf_counter() - t0) * 1e3
        self.ms[name] = self.ms.get(name, 0.0) + elapsed


def _plain_learner(learner) -> None:
    if learner.needs_logits or learner.scores_against_teacher:
        raise ValueError(f"bench e2e splits the KDPL step of learners with shared class vectors (VPT, CoOp, ...); "
                         f"{type(learner).__name__} is not one of them")


def _endless(loader) -> Iterator[Any]:
    while True:
        yield from loader


# --------------------------------------------------------------------------------- our pipeline


class EnginePipeline:
    """The engine's step as the Trainer runs it, plus the same step split into timed stages.

    :meth:`step` calls ``run.step`` (:class:`DistillStep`) exactly as ``Trainer.fit`` does
    (without logging and checkpoints); :meth:`instrumented_step` computes the same loss from
    the step's parts (teacher, learner, ``kd_loss`` with the step's options) so that each part
    can be timed; a test checks that both give the same loss.
    """

    def __init__(self, run):
        _plain_learner(run.step.student)
        self.run = run
        self.trainer = Trainer(run, log=lambda message: None)  # the run's own optimizer
        self.optimizer = self.trainer.optimizer
        self.batches = _endless(run.loader)
        run.step.train()

    def _inputs(self, batch):
        run = self.run
        teacher_images = batch.images[run.teacher_input] if run.teacher_input else None
        student_images = batch.images[run.student_input]
        mask, teacher_features = batch.mask, None
        if run.feature_cache is not None:
            teacher_features, mask = self.trainer._cached_features(batch)
        row_weights = mask.to(device=run.device, dtype=run.step.teacher_class_vectors.dtype, non_blocking=True)
        return teacher_images, student_images, row_weights, teacher_features

    def _autocast(self):
        run = self.run
        return torch.autocast(run.device.type, dtype=run.autocast_dtype or torch.float32,
                              enabled=run.autocast_dtype is not None)

    def step(self) -> None:
        teacher_images, student_images, row_weights, teacher_features = self._inputs(next(self.batches))
        with self._autocast():
            parts = self.run.step(teacher_images, student_images, row_weights, teacher_features=teacher_features)
        parts["loss"].backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def split_loss(self, clock: StageClock, teacher_images, student_images, row_weights, teacher_features):
        """DistillStep's KDPL loss for shared class vectors, computed part by part."""
        step = self.run.step
        with self._autocast():
            with clock.stage("teacher_fwd"):
                if teacher_features is None:
                    with torch.no_grad():
                        teacher_features = step.teacher.encode_image(teacher_images)
                teacher_features = teacher_features.detach()
            with clock.stage("student_fwd"):
                image_features = step.student.encode_image(student_images)
                class_features = step.student.class_features(None)
            with clock.stage("loss"):
                loss = step.kd_weight * kd_loss(
                    image_features, teacher_features.to(image_features.dtype),
                    step.teacher_class_vectors.to(image_features.dtype),
                    student_class_vectors=class_features.to(image_features.dtype),
                    logit_scale=step.student_logit_scale, teacher_logit_scale=step.student_logit_scale,
                    row_weights=row_weights, backend=step.loss_backend, **step.loss_options,
                ).float()
        return loss

    def instrumented_step(self, clock: StageClock) -> "torch.Tensor":
        with clock.stage("loader_wait"):
            inputs = self._inputs(next(self.batches))
        loss = self.split_loss(clock, *inputs)
        with clock.stage("backward"):
            loss.backward()
        with clock.stage("optimizer"):
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()


# --------------------------------------------------------------------------------- the reference


def reference_kl_loss(student_features, teacher_features, teacher_vectors, student_vectors,
                      logit_scale: float) -> "torch.Tensor":
    """The published KDPL loss as their code computes it: eager fp32 over materialized logits.

    student_features (B, D_s), teacher_features (B, D_t), teacher_vectors (C, D_t),
    student_vectors (C, D_s); both logit matrices (B, C) are formed with the student's logit
    scale, then 0.5 * KL(p_t || p_s) + 0.5 * KL(p_s || p_t), batchmean.
    """
    s = F.normalize(student_features.float(), dim=-1)
    t = F.normalize(teacher_features.float().detach(), dim=-1)
    student_logits = logit_scale * s @ F.normalize(student_vectors.float(), dim=-1).t()
    teacher_logits = logit_scale * t @ F.normalize(teacher_vectors.float().detach(), dim=-1).t()
    log_p_s = F.log_softmax(student_logits, dim=-1)
    log_p_t = F.log_softmax(teacher_logits, dim=-1)
    forward = F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True)  # KL(p_t || p_s)
    reverse = F.kl_div(log_p_t, log_p_s, reduction="batchmean", log_target=True)  # KL(p_s || p_t)
    return 0.5 * forward + 0.5 * reverse


class _PILViews:
    """A map-style dataset: PIL decode, random resized crop, flip, normalize (per output size)."""

    def __init__(self, paths: list[str], outputs: list[tuple[int, tuple, tuple]], scale=(0.5, 1.0), seed: int = 0):
        self.paths, self.outputs, self.scale, self.seed = paths, outputs, scale, seed

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        rng = np.random.default_rng((self.seed, index, time.perf_counter_ns()))
        with Image.open(self.paths[index]) as img:
            img = img.convert("RGB")
            width, height = img.size
            area = width * height * rng.uniform(*self.scale)
            ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
            w = int(min(width, round(math.sqrt(area * ratio))))
            h = int(min(height, round(math.sqrt(area / ratio))))
            x, y = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
            flip = bool(rng.integers(0, 2))
            views = []
            for size, mean, std in self.outputs:
                crop = img.resize((size, size), Image.BICUBIC, box=(x, y, x + w, y + h))
                if flip:
                    crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
                arr = torch.from_numpy(np.asarray(crop, dtype=np.float32) / 255.0).permute(2, 0, 1)
                views.append((arr - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1))
        return tuple(views)


class ReferencePipeline:
    """A re-implementation of the published code's per-step practice -- not their code.

    What it does like the published KDPL / PromptKD code: a ``torch.utils.data.DataLoader``
    whose worker processes decode JPEGs with PIL and crop them; the teacher's text features of
    every class prompt re-encoded each step (PromptKD); an eager fp32 KL over both materialized
    B x C logit matrices (:func:`reference_kl_loss`). What it shares with the engine, so that
    only those practices differ: the models, the learner, autocast and the optimizer settings.
    """

    def __init__(self, run, image_paths: list[str], *, batch_size: int, workers: int):
        _plain_learner(run.step.student)
        self.run = run
        self.step_module = run.step
        outputs = [image_spec(_student_model(run))]
        teacher_spec = image_spec(run.teacher.model)
        self.same_input = teacher_spec == outputs[0]
        if not self.same_input:
            outputs.append(teacher_spec)
        cfg = run.config
        dataset = _PILViews(list(image_paths), outputs, scale=(cfg.data.min_scale, cfg.data.max_scale),
                            seed=cfg.train.seed)
        self.loader = torch.utils.data.DataLoader(
            dataset, batch_size=batch_size, shuffle=True, drop_last=True, num_workers=workers,
            pin_memory=run.device.type == "cuda", persistent_workers=workers > 0,
        )
        if len(self.loader) == 0:
            raise ValueError(f"reference: {len(dataset)} images make no full batch of {batch_size}")
        templates = read_templates(cfg.data.templates)
        self.num_templates = len(templates)
        tokenizer = get_tokenizer(cfg.teacher.name)
        self.tokens = tokenizer([t.format(name) for name in run.class_names for t in templates]).to(run.device)
        self.optimizer = Trainer(run, log=lambda m: None).optimizer  # the same optimizer settings, its own state
        self.batches = _endless(self.loader)
        run.step.train()

    def _autocast(self):
        run = self.run
        return torch.autocast(run.device.type, dtype=run.autocast_dtype or torch.float32,
                              enabled=run.autocast_dtype is not None)

    def _step(self, clock: StageClock):
        run, step = self.run, self.step_module
        dtype = run.autocast_dtype or torch.float32
        with clock.stage("loader_wait"):
            views = next(self.batches)
            student_images = views[0].to(run.device, dtype=dtype, non_blocking=True)
            teacher_images = (student_images if self.same_input
                              else views[1].to(run.device, dtype=dtype, non_blocking=True))
        with self._autocast():
            with clock.stage("teacher_text"), torch.no_grad():
                text = F.normalize(run.teacher.model.encode_text(self.tokens).float(), dim=-1)
                text = text.view(len(run.class_names), self.num_templates, -1).mean(dim=1)
                teacher_vectors = F.normalize(text, dim=-1)
            with clock.stage("teacher_fwd"), torch.no_grad():
                teacher_features = run.teacher.encode_image(teacher_images)
            with clock.stage("student_fwd"):
                image_features = step.student.encode_image(student_images)
                class_features = step.student.class_features(None)
        with clock.stage("loss"):
            loss = reference_kl_loss(image_features, teacher_features, teacher_vectors, class_features,
                                     step.student_logit_scale)
        with clock.stage("backward"):
            loss.backward()
        with clock.stage("optimizer"):
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def step(self) -> None:
        self._step(_OFF_CLOCK)

    def instrumented_step(self, clock: StageClock):
        return self._step(clock)

    def close(self) -> None:
        # Persistent DataLoader workers end with their iterator.
        self.batches.close()


def _student_model(run):
    return run.step.student.clip  # every PromptLearner keeps its frozen backbone as .clip


class _OffClock(StageClock):
    def __init__(self):
        self.enabled = False
        self.ms = {}


_OFF_CLOCK = _OffClock()


# --------------------------------------------------------------------------------- FLOPs and the limit


def count_flops(fn: Callable[[], Any]) -> int:
    """Floating-point operations of one call of ``fn`` (FlopCounterMode: matmuls, convolutions, attention)."""
    # The math backend: its matmuls are counted on every device, whereas the CPU's fused
    # attention kernel is not registered with the counter (attention would count as 0).
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def step_flops(run, teacher, batch_size: int) -> dict[str, int]:
    """FLOPs of one step on random inputs: teacher forward, student forward + backward (one step's work).

    ``teacher`` is a live :class:`~clipdistill.engine.models.Teacher` (a cached run has none: pass
    the live run's). Returns {"teacher": ..., "student": ...} for a batch of ``batch_size``.
    """
    device = run.device
    s_size = image_spec(_student_model(run))[0]
    t_size = image_spec(teacher.model)[0]
    gen = torch.Generator().manual_seed(0)
    student_images = torch.randn(batch_size, 3, s_size, s_size, generator=gen).to(device)
    teacher_images = torch.randn(batch_size, 3, t_size, t_size, generator=gen).to(device)
    features: dict[str, torch.Tensor] = {}

    def teacher_forward():
        features["t"] = teacher.encode_image(teacher_images)

    def student_step():
        parts = run.step(None, student_images, None, teacher_features=features["t"])
        parts["loss"].backward()

    autocast = torch.autocast(device.type, dtype=run.autocast_dtype or torch.float32,
                              enabled=run.autocast_dtype is not None)
    with autocast:
        flops_teacher = count_flops(teacher_forward)
        student_step()  # once uncounted: a learner may compute fixed parts lazily (VPT's class vectors)
        flops_student = count_flops(student_step)
    for p in run.step.trainable_parameters().values():
        p.grad = None
    return {"teacher": flops_teacher, "student": flops_student}


def flops_per_image(run, teacher, batch_size: int) -> dict[str, float]:
    """FLOPs per image at ``batch_size``: per-image work plus the per-step work (text encoder) / batch.

    Counted at batches of 1 and 2: per-image = F(2) - F(1), per-step = 2 F(1) - F(2).
    """
    one, two = step_flops(run, teacher, 1), step_flops(run, teacher, 2)
    out = {}
    for part in ("teacher", "student"):
        per_image = two[part] - one[part]
        per_step = max(0, 2 * one[part] - two[part])
        out[part] = per_image + per_step / batch_size
    out["total"] = out["teacher"] + out["student"]
    return out


def matmul_rate(device, *, quick: bool, harness: ModuleType) -> dict:
    """The device's measured matrix rate: bf16 ``torch.mm`` 8192^3 on a GPU, fp32 on the CPU (as gpu_suite)."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    size = 8192 if cuda else (512 if quick else 1024)
    dtype = torch.bfloat16 if cuda else torch.float32
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    stats = harness.measure(lambda: torch.mm(a, b), device=device, warmup=2 if quick else 10,
                            repeats=5 if quick else 50)
    return {"provider": "torch.mm", "shape": f"{size}x{size}x{size}", "dtype": str(dtype).replace("torch.", ""),
            "metric": "matmul_ms", **stats, "tflops": 2.0 * size**3 / (stats["median"] * 1e-3) / 1e12}


# --------------------------------------------------------------------------------- cases


def make_images(folder: Path, count: int, side: int) -> Path:
    """``count`` generated natural-looking JPEGs (4:3, ``side`` wide) in ``folder``."""
    write_dataset(folder, count, size=(side, side * 3 // 4))
    return folder


def run_config(work: Path, images: Path, *, teacher: str, student: str, learner: str, batch: int, quick: bool,
               classes: int, device: str, workers: Optional[int]) -> dict:
    """The run config of one case (a plain dict for :func:`load_run_config`)."""
    names = work / "classes.txt"
    if not names.exists():
        names.write_text("\n".join(f"class {i}" for i in range(classes)) + "\n")
    options = {"vpt": {"n_tokens": 8, "depth": 2 if quick else 12},
               "coop": {"n_ctx": 4, "init_words": None}}[learner]
    return {
        "recipe": "kdpl",
        "teacher": {"name": teacher, "weights": None},
        "student": {"name": student, "weights": None},
        "learner": {"kind": learner, "options": options},
        "data": {"train": str(images), "class_names": str(names), "templates": "generic",
                 "batch_size": batch, "backend": "auto", "workers": workers},
        "train": {"epochs": 1, "device": device, "out_dir": str(work / "run"), "progress": False,
                  "log_every": 10_000, "checkpoint_every": 10_000_000, "keep_last": 1},
    }


def _stats_rows(pipeline, *, device, warmup: int, steps: int, harness: ModuleType) -> dict:
    """Uninstrumented images/s and peak memory, then the instrumented breakdown."""
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    stats = harness.measure(pipeline.step, device=dev, warmup=warmup, repeats=steps)
    peak_total = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None
    clock = StageClock(dev, enabled=True)
    stage_runs, totals = [], []
    for i in range(max(1, warmup) + max(3, steps // 2)):
        clock.reset()
        clock._sync()
        t0 = time.perf_counter()
        pipeline.instrumented_step(clock)
        clock._sync()
        if i >= max(1, warmup):
            totals.append((time.perf_counter() - t0) * 1e3)
            stage_runs.append(dict(clock.ms))
    breakdown = {name: harness.percentile([r[name] for r in stage_runs], 50) for name in STAGES}
    return {"stats": stats, "peak_gpu_mem_bytes": peak_total, "breakdown_ms": breakdown,
            "instrumented_step_ms": harness.percentile(totals, 50),
            "instrumented_stage_sum_ms": harness.percentile([sum(r.values()) for r in stage_runs], 50)}


def _row(provider: str, shape: str, dtype: str, batch: int, measured: dict, flops: float, rate_tflops: float,
         extra: dict) -> dict:
    stats = measured["stats"]
    images_per_s = batch / (stats["median"] * 1e-3)
    limit = rate_tflops * 1e12 / flops if flops > 0 else None
    return {
        "provider": provider, "shape": shape, "dtype": dtype, "metric": "images_per_s",
        "median": images_per_s, "p20": batch / (stats["p80"] * 1e-3), "p80": batch / (stats["p20"] * 1e-3),
        "unit": "images/s", "repeats": stats["repeats"], "peak_mem_bytes": stats["peak_mem_bytes"],
        "step_ms": stats["median"], "batch": batch, "flops_per_image": flops,
        "hw_limit_images_per_s": limit, "fraction_of_limit": images_per_s / limit if limit else None,
        "peak_gpu_mem_bytes": measured["peak_gpu_mem_bytes"], "breakdown_ms": measured["breakdown_ms"],
        "instrumented_step_ms": measured["instrumented_step_ms"],
        "instrumented_stage_sum_ms": measured["instrumented_stage_sum_ms"], **extra,
    }


def run_benchmark(args: argparse.Namespace, harness: Optional[ModuleType] = None) -> list[dict]:
    """Run every requested case; write rows as they come (flushed one by one); return the written rows."""
    harness = harness or _harness
    cuda = torch.cuda.is_available() and not args.quick
    quick = not cuda
    device = "cuda" if cuda else "cpu"
    pairs = args.pairs or (GPU_PAIRS if cuda else QUICK_PAIRS)
    batches = args.batches or ([64, 256] if cuda else [8, 16])
    steps = args.steps or (20 if cuda else 4)
    warmup = args.warmup if args.warmup is not None else (3 if cuda else 1)
    workers = args.reference_workers if args.reference_workers is not None else (8 if cuda else 1)
    n_images = args.images or (4 * max(batches) if cuda else max(2 * max(batches), 32))
    dtype = "bf16-autocast" if cuda else "fp32"
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="clipdistill_bench_e2e_"))
    images = make_images(work / "images", n_images, 500 if cuda else 64)
    image_paths = sorted(str(p) for p in images.glob("*.jpg"))
    write = (lambda rows: harness.record(BENCHMARK, rows, device=device, quick=quick, results_dir=args.results))
    written: list[dict] = []
    rate = matmul_rate(device, quick=quick, harness=harness)
    written += write([rate])
    rate_tflops = rate["tflops"]
    for pair in pairs:
        teacher_name, student_name = pair.split(":")
        for learner in args.learners:
            for batch in batches:
                shape = f"{teacher_name}->{student_name},{learner},B={batch}"
                base = run_config(work, images, teacher=teacher_name, student=student_name, learner=learner,
                                  batch=batch, quick=quick, classes=args.classes, device=device,
                                  workers=args.loader_workers)
                facts = {"teacher": teacher_name, "student": student_name, "learner": learner,
                         "classes": args.classes, "images": n_images}
                live = build_run(load_run_config(base, [f"train.out_dir={work / 'live'}"]), log=lambda m: None)
                flops = flops_per_image(live, live.teacher, batch)
                flops_facts = {"flops_teacher_per_image": flops["teacher"], "flops_student_per_image": flops["student"],
                               "device_matmul_tflops": rate_tflops}
                for mode in args.modes:
                    provider = {"live": "ours-live", "cached": "ours-cached", "reference": "reference"}[mode]
                    extra = {**facts, **flops_facts}
                    if mode == "cached":
                        cache_dir = work / f"cache-{teacher_name}"
                        if not (cache_dir / "DONE").exists():
                            started = time.perf_counter()
                            build_teacher_cache(load_run_config(base, [f"train.out_dir={work / 'build'}"]),
                                                views=args.views, out=cache_dir, shard_size=1024,
                                                batch_size=max(batches), progress=False, log=lambda m: None)
                            if cuda:
                                torch.cuda.synchronize()
                            build_ms = (time.perf_counter() - started) * 1e3
                            (cache_dir / "DONE").write_text(f"{build_ms}\n")
                            written += write([{"provider": "cache_build", "shape": f"{teacher_name},N={n_images},"
                                               f"K={args.views}", "dtype": dtype, "metric": "build_ms",
                                               "median": build_ms, "p20": build_ms, "p80": build_ms, "unit": "ms",
                                               "repeats": 1, "peak_mem_bytes": None}])
                        run = build_run(load_run_config(base, [f"teacher.cache={cache_dir}",
                                                               f"train.out_dir={work / 'cached'}"]),
                                        log=lambda m: None)
                        pipeline = EnginePipeline(run)
                        case_flops = flops["student"]  # the teacher's work was done when the cache was built
                        extra["views"] = args.views
                    elif mode == "live":
                        pipeline, case_flops = EnginePipeline(live), flops["total"]
                    else:
                        pipeline = ReferencePipeline(live, image_paths, batch_size=batch, workers=workers)
                        case_flops = flops["total"]  # the useful work; recomputing text features is overhead
                        extra.update({"reference_workers": workers,
                                      "note": "re-implementation of the published practice, not their code"})
                    extra["limit_flops_per_image"] = case_flops
                    measured = _stats_rows(pipeline, device=device, warmup=warmup, steps=steps, harness=harness)
                    if isinstance(pipeline, ReferencePipeline):
                        pipeline.close()
                    written += write([_row(provider, shape, dtype, batch, measured, case_flops, rate_tflops, extra)])
                    del pipeline
                del live
                if cuda:
                    torch.cuda.empty_cache()
    return written


def summarize(rows: list[dict]) -> dict:
    """Speed-ups over the reference per (pair, learner, batch); the best fraction of the limit."""
    cases: dict[str, dict[str, float]] = {}
    for row in rows:
        if row.get("metric") == "images_per_s":
            cases.setdefault(row["shape"], {})[row["provider"]] = row["median"]
    out: dict[str, Any] = {}
    for shape, by in cases.items():
        if "reference" in by:
            for provider in ("ours-live", "ours-cached"):
                if provider in by:
                    out.setdefault(f"{provider}_vs_reference", {})[shape] = round(by[provider] / by["reference"], 3)
    fractions = [r["fraction_of_limit"] for r in rows if r.get("provider") == "ours-live"
                 and r.get("fraction_of_limit") is not None]
    if fractions:
        out["ours_live_best_fraction_of_limit"] = round(max(fractions), 4)
    return out


# --------------------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--quick", action="store_true", help="tiny shipped models on the CPU (also without a GPU)")
    parser.add_argument("--pairs", nargs="+", default=None, metavar="TEACHER:STUDENT",
                        help=f"teacher/student pairs (default: {' '.join(GPU_PAIRS)} on a GPU)")
    parser.add_argument("--learners", nargs="+", default=["vpt", "coop"], choices=["vpt", "coop"])
    parser.add_argument("--batches", nargs="+", type=int, default=None, help="batch sizes (default 64 256; quick 8 16)")
    parser.add_argument("--modes", nargs="+", default=["live", "cached", "reference"],
                        choices=["live", "cached", "reference"])
    parser.add_argument("--steps", type=int, default=None, help="timed steps per case (default 20; quick 4)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3; quick 1)")
    parser.add_argument("--images", type=int, default=None, help="generated images (default 4x the largest batch)")
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--views", type=int, default=2, help="views per image in the teacher cache")
    parser.add_argument("--reference-workers", type=int, default=None,
                        help="the reference's DataLoader workers (default 8 on a GPU, 1 on the CPU)")
    parser.add_argument("--loader-workers", type=int, default=None, help="the engine loader's workers (data.workers)")
    parser.add_argument("--results", type=Path, default=None, help="results folder (default benchmarks/results)")
    parser.add_argument("--work", type=Path, default=None, help="folder for images, caches and runs (default: tmp)")
    return parser


def main(args: argparse.Namespace, harness: Optional[ModuleType] = None) -> int:
    """Run, print the table and, last, one JSON line."""
    harness = harness or _harness
    rows = run_benchmark(args, harness)
    columns = ["provider", "shape", "dtype", "metric", "median", "unit", "step_ms", "fraction_of_limit",
               "peak_gpu_mem_bytes", "instrumented_step_ms"]
    harness.print_table(rows, columns)
    for row in rows:
        if "breakdown_ms" in row:
            print(f"{row['provider']:12s} {row['shape']}: "
                  + ", ".join(f"{k} {v:.3g}" for k, v in row["breakdown_ms"].items()) + " ms", flush=True)
    harness.summary_line(BENCHMARK, rows, **summarize(rows))
    return 0


# --------------------------------------------------------------------------------- CPU cases (tests)


def cpu_cases() -> list[tuple[str, Callable[[], object]]]:
    """One tiny step of each provider (runs and models built on the first call, not at collection)."""
    state: dict = {}

    def build():
        work = Path(tempfile.mkdtemp(prefix="bench_e2e_"))
        images = make_images(work / "images", 16, 64)
        base = run_config(work, images, teacher="clipdistill-tiny-teacher", student="clipdistill-tiny-student",
                          learner="vpt", batch=8, quick=True, classes=10, device="cpu", workers=None)
        live = build_run(load_run_config(base, [f"train.out_dir={work / 'live'}"]), log=lambda m: None)
        build_teacher_cache(load_run_config(base, [f"train.out_dir={work / 'build'}"]), views=1,
                            out=work / "cache", batch_size=8, progress=False, log=lambda m: None)
        cached = build_run(load_run_config(base, [f"teacher.cache={work / 'cache'}",
                                                  f"train.out_dir={work / 'cached'}"]), log=lambda m: None)
        state["live"] = EnginePipeline(live).step
        state["cached"] = EnginePipeline(cached).step
        state["reference"] = ReferencePipeline(live, sorted(str(p) for p in images.glob("*.jpg")),
                                               batch_size=8, workers=0).step

    def case(provider: str):
        def run():
            if not state:
                build()
            return state[provider]()

        return run

    return [(f"{p}-tiny", case(p)) for p in ("live", "cached", "reference")]


def cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    return main(add_arguments(parser).parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(cli())
