"""The training loop: build a run from its config, distill, checkpoint, resume exactly.

    clipdistill distill --config FILE [--recipe kdpl|promptkd] [--resume] [key=value ...]

What a step does (no host synchronization inside it): the loader's batch (one
view per image, at the teacher's and the student's resolution) -> the frozen
teacher's image features under no_grad -> the student's prompted features and
class vectors -> :func:`clipdistill.kernels.kd_loss` (through
:class:`~clipdistill.engine.step.DistillStep`) -> backward -> every
``grad_accum`` micro-batches: clip, optimizer step, learning rate of the next
step. Loss parts accumulate on the device; every ``log_every`` steps one
synchronization reads them, checks that they are finite, writes a metrics line
(JSON) and advances the progress bar.

Checkpoints (``<out_dir>/checkpoints/step-*.safetensors``) hold the learner's
state, the optimizer's state, every RNG state, the loader's position and the
counters; they are written atomically and only after the losses since the
last check were found finite, so a non-finite loss never overwrites the last
good checkpoint. ``--resume`` continues from the newest one and ends where an
uninterrupted run ends.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from .checkpoint import latest_checkpoint, load_checkpoint, rng_state, save_checkpoint, save_state, set_rng_state
from .config import ConfigError
from .recipes import RunConfig, config_differences, dump_run_config, load_run_config


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the message names the step and the last good checkpoint."""


# --------------------------------------------------------------------------------- inputs


def read_class_names(path: str | Path) -> list[str]:
    """One class name per line; empty lines and duplicates are errors naming their line numbers.

    ``builtin:imagenet21k`` names the shipped concept vocabulary (see :mod:`.vocabulary`).
    """
    from .vocabulary import BUILTIN_PREFIX, builtin_path

    if str(path).startswith(BUILTIN_PREFIX):
        try:
            path = builtin_path(str(path)[len(BUILTIN_PREFIX):])
        except ValueError as exc:
            raise ConfigError(f"data.class_names: {exc}") from exc
    path = Path(path)
    if not str(path) or not path.is_file():
        raise ConfigError(f"data.class_names: class-name file {str(path)!r} does not exist")
    names, seen, problems = [], {}, []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        name = line.strip()
        if not name:
            problems.append(f"line {lineno} is empty")
            continue
        if name in seen:
            problems.append(f"line {lineno} repeats {name!r} (first on line {seen[name]})")
            continue
        seen[name] = lineno
        names.append(name)
    if problems:
        raise ConfigError(f"data.class_names: {path}: " + "; ".join(problems[:5])
                          + (f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""))
    if not names:
        raise ConfigError(f"data.class_names: {path} holds no class names")
    return names


def read_templates(spec: str) -> list[str]:
    """A shipped template set by name, or a file of templates (one per line, each with "{}")."""
    from .templates import check_templates, templates_for

    if os.path.isfile(spec):
        templates = [t.strip() for t in Path(spec).read_text(encoding="utf-8").splitlines() if t.strip()]
    else:
        try:
            templates = list(templates_for(spec))
        except (KeyError, ValueError) as exc:
            raise ConfigError(f"data.templates: {spec!r} is neither a file nor a shipped template set ({exc})")
    try:
        check_templates(templates)
    except ValueError as exc:
        raise ConfigError(f"data.templates: {exc}") from exc
    return templates


def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device={spec!r} but no CUDA device is available")
    return device


def lr_at(step: int, *, base_lr: float, total_steps: int, warmup_steps: int, warmup_lr: Optional[float],
          schedule: str) -> float:
    """Learning rate of optimizer step ``step`` (0-based): warm-up, then cosine to 0 or constant."""
    if step < warmup_steps:
        return warmup_lr if warmup_lr is not None else base_lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return base_lr
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return 0.5 * base_lr * (1.0 + math.cos(math.pi * progress))


def _image_preprocess(model: torch.nn.Module) -> tuple[int, tuple, tuple]:
    from .models import import_open_clip

    open_clip = import_open_clip()
    visual = model.visual
    size = visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else int(size)
    mean = tuple(getattr(visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN)
    std = tuple(getattr(visual, "image_std", None) or open_clip.OPENAI_DATASET_STD)
    return size, mean, std


# --------------------------------------------------------------------------------- building


@dataclass
class Run:
    """Everything a training run is made of (built by :func:`build_run`)."""

    config: RunConfig
    device: torch.device
    teacher: Any
    learner: Any
    step: Any  # DistillStep
    loader: Any  # ImageLoader
    class_names: list[str]
    teacher_input: Optional[str]  # name in Batch.images, or None when the features come from a cache
    student_input: str
    autocast_dtype: Optional[torch.dtype]
    heldout_loader: Any = None  # ImageLoader over the held-out unlabeled images (center views), or None
    feature_cache: Any = None  # TeacherCache when teacher.cache is set: teacher features are looked up
    owns_process_group: bool = False  # build_run joined the launcher's process group (distill() leaves it)


def _cached_teacher(cfg: RunConfig, class_names: list[str], templates: list[str], device: torch.device,
                    lists: str):
    """The teacher cache checked against the run, its stand-in teacher, the class vectors, the image list."""
    from clipdistill.loaders.sources import resolve_source

    from .class_vectors import ClassVectorKey, cached_class_vectors
    from .teacher_cache import CachedTeacher, TeacherCache, run_key

    cache = TeacherCache(cfg.teacher.cache)
    samples = resolve_source(cfg.data.train, cache_dir=lists)
    k = cache.key  # the teacher's input spec is the cache's own: the teacher model is not loaded to compare
    cache.check(run_key(cfg, num_views=k.num_views, teacher_dim=k.dim, samples=samples,
                        input_spec=(k.input_size, k.mean, k.std)))

    def missing() -> torch.Tensor:
        raise ConfigError(f"teacher.cache {cfg.teacher.cache!r} holds no class vectors for these class names and "
                          f"templates; run cache-teacher again with this config's data.class_names")

    key = ClassVectorKey.make(cfg.teacher.name, cfg.teacher.weights, class_names, templates)
    vectors, _ = cached_class_vectors(missing, key, cache_dir=Path(cfg.teacher.cache) / "class_vectors",
                                      device=device)
    return CachedTeacher(cache).to(device), vectors, cache, samples


def build_run(cfg: RunConfig, *, log: Callable[[str], None] = print) -> Run:
    """Turn a config into models, class vectors, the step and the loader (the one builder)."""
    from clipdistill.loaders.loader import ImageLoader, OutputSpec
    from clipdistill.loaders.views import RandomResizedCrop, ReplayViews

    from . import distributed
    from .class_vectors import teacher_class_vectors
    from .models import build_student, build_teacher, get_tokenizer
    from .prompts import build_learner
    from .step import DistillStep

    device = resolve_device(cfg.train.device)
    class_names = read_class_names(cfg.data.class_names)
    templates = read_templates(cfg.data.templates)
    if not cfg.data.train:
        raise ConfigError("data.train: no image source given (a folder, a list file or tar shards)")
    # Several processes only under a launcher (engine/distributed.py); without one nothing changes.
    ds_config = None
    if cfg.train.deepspeed:
        ds_config = distributed.load_deepspeed_config(cfg.train.deepspeed, micro_batch_size=cfg.data.batch_size)
        ds_config = distributed.with_teacher_precision(ds_config, cfg.teacher.precision, device)
        distributed.require_deepspeed(ds_config)
    launch = distributed.detect_launch(required=ds_config is not None,
                                       reason="train.deepspeed is set, and DeepSpeed runs one process per device.")
    owns_group = False
    if launch is not None:
        device = distributed.rank_device(device, launch)
        owns_group = distributed.init_process_group(launch, device)
    rank, world = distributed.rank_and_world()
    if world > 1:
        distributed.check_world(world, global_batch_size=cfg.data.batch_size, num_samples=None)

    torch.manual_seed(cfg.train.seed)
    feature_cache = None
    lists = str(Path(cfg.train.out_dir) / "lists")
    source = cfg.data.train
    if cfg.teacher.cache:
        teacher, vectors, feature_cache, source = _cached_teacher(cfg, class_names, templates, device, lists)
        if ds_config is not None:
            log("clipdistill: teacher.cache holds the teacher's features, so no teacher is loaded and "
                "train.deepspeed has nothing to shard; the ranks train data-parallel")
            ds_config = None
    elif cfg.teacher.prompts:
        # PromptKD: the class vectors come from the tuned prompts, computed once after loading them
        # (never from the class-vector cache, whose key does not cover the prompts).
        from .tune_teacher import load_tuned_teacher, read_tuned_header, tuned_teacher_class_vectors

        tuned_on = read_tuned_header(cfg.teacher.prompts)["teacher"]["name"]
        if tuned_on != cfg.teacher.name:
            raise ConfigError(f"teacher.prompts {cfg.teacher.prompts!r} were tuned on {tuned_on!r}, "
                              f"but teacher.name is {cfg.teacher.name!r}")
        if ds_config is not None:
            teacher, vectors = distributed.build_sharded_tuned_teacher(
                cfg.teacher.prompts, ds_config, device=device,
                class_vectors=lambda tuned: tuned_teacher_class_vectors(tuned, class_names))
        else:
            teacher = load_tuned_teacher(cfg.teacher.prompts, device=device, precision=cfg.teacher.precision)
            vectors = tuned_teacher_class_vectors(teacher, class_names)
    else:
        cache = cfg.train.class_vector_cache or str(Path(cfg.train.out_dir) / "class_vectors")

        def class_vectors(live_teacher) -> torch.Tensor:
            return teacher_class_vectors(live_teacher, get_tokenizer(cfg.teacher.name), class_names, templates,
                                         model_name=cfg.teacher.name, weights=cfg.teacher.weights,
                                         cache_dir=cache, device=device)

        if ds_config is not None:
            teacher, vectors = distributed.build_sharded_teacher(
                cfg.teacher.name, cfg.teacher.weights, ds_config, device=device, class_vectors=class_vectors,
                seed=cfg.train.seed)
        else:
            teacher = build_teacher(cfg.teacher.name, cfg.teacher.weights, device=device,
                                    precision=cfg.teacher.precision)
            # Computed (and cached) on rank 0 only, then shared; a plain call in a single process.
            vectors = distributed.broadcast_from_rank0(lambda: class_vectors(teacher), device)
    # Seeded again: the student's random parts (prompts; a random-init backbone in tests) must not
    # depend on whether the teacher was built, loaded from tuned prompts or replaced by a cache.
    torch.manual_seed(cfg.train.seed + 1)
    student_clip = build_student(cfg.student.name, cfg.student.weights, device=device,
                                 precision=cfg.student.precision or "fp32")
    teacher_dim = int(vectors.shape[1])
    student_dim = int(student_clip.visual.output_dim)
    learner = build_learner(cfg.learner.kind, student_clip, tokenizer=get_tokenizer(cfg.student.name),
                            class_names=class_names, templates=templates, teacher_dim=teacher_dim,
                            **cfg.learner.options).to(device)
    if world > 1:
        learner = distributed.sync_batch_norm(learner)  # PromptKD's projector BN sees the global batch
    if cfg.method == "kdpl":
        log(f"clipdistill: teacher {cfg.teacher.name} (D={teacher_dim}) -> student {cfg.student.name} "
            f"(D={student_dim}), learner {cfg.learner.kind}, {len(class_names)} classes")
    else:
        log(f"clipdistill: teacher {cfg.teacher.name} (D={teacher_dim}) -> student {cfg.student.name} "
            f"(D={student_dim}) projected to D={teacher_dim}, {len(class_names)} classes")
    if cfg.loss.top_k is not None and cfg.loss.top_k > len(class_names):
        raise ConfigError(f"loss.top_k={cfg.loss.top_k} exceeds the {len(class_names)} names of "
                          f"data.class_names={cfg.data.class_names!r}")
    step = DistillStep(
        teacher, learner, vectors, recipe=cfg.method, top_k=cfg.loss.top_k, temperature=cfg.loss.temperature,
        forward_weight=cfg.loss.forward_weight, reverse_weight=cfg.loss.reverse_weight,
        reduction=cfg.loss.reduction, temperature_squared=cfg.loss.temperature_squared,
        kd_weight=cfg.loss.kd_weight, promptsrc_weights=cfg.loss.promptsrc_weights, loss_backend=cfg.loss.backend,
    )

    precision = cfg.train.precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    autocast_dtype = torch.bfloat16 if precision == "bf16" else None

    s_size, s_mean, s_std = _image_preprocess(student_clip)
    outputs = [OutputSpec("student", s_size, s_mean, s_std)]
    teacher_input: Optional[str] = "student"
    if feature_cache is not None:
        teacher_input = None  # the teacher's features come from the cache: no teacher-resolution images
    else:
        t_size, t_mean, t_std = _image_preprocess(teacher.model)
        if (t_size, t_mean, t_std) != (s_size, s_mean, s_std):
            outputs.append(OutputSpec("teacher", t_size, t_mean, t_std))
            teacher_input = "teacher"
    heldout_loader = None
    if cfg.data.holdout_fraction > 0:
        from clipdistill.loaders.sources import resolve_source
        from clipdistill.loaders.views import CenterCrop

        from .evaluate import holdout_split

        source, heldout = holdout_split(resolve_source(cfg.data.train, cache_dir=lists), cfg.data.holdout_fraction,
                                        seed=cfg.train.seed)
        heldout_loader = ImageLoader(
            heldout, global_batch_size=cfg.data.batch_size, outputs=outputs, transform=CenterCrop(),
            seed=cfg.train.seed, backend=cfg.data.backend, device=device,
            dtype=torch.bfloat16 if autocast_dtype is not None else torch.float32, workers=cfg.data.workers,
            interpolation=cfg.data.interpolation, precheck=cfg.data.precheck, rank=rank, world_size=world,
        )
        log(f"clipdistill: {len(heldout)} unlabeled images held out for model selection "
            f"(train.select_metric={cfg.train.select_metric})")
    loader = ImageLoader(
        source, global_batch_size=cfg.data.batch_size, outputs=outputs,
        transform=RandomResizedCrop(scale=(cfg.data.min_scale, cfg.data.max_scale), flip=cfg.data.flip),
        seed=cfg.train.seed, backend=cfg.data.backend, device=device,
        dtype=torch.bfloat16 if autocast_dtype is not None else torch.float32, workers=cfg.data.workers,
        interpolation=cfg.data.interpolation, precheck=cfg.data.precheck, cache_dir=lists,
        replay=ReplayViews(feature_cache.num_views) if feature_cache is not None else None,
        rank=rank, world_size=world,
    )
    if world > 1:
        distributed.check_world(world, global_batch_size=cfg.data.batch_size, num_samples=len(loader.samples))
        log(f"clipdistill: rank {rank} of {world}: {cfg.data.batch_size // world} of every {cfg.data.batch_size} "
            f"images per step" + (f", teacher sharded with ZeRO-3 (offload_param: {teacher.offload_device})"
                                 if ds_config is not None else ""))
    log(f"clipdistill: loader backend {loader.backend}, {len(loader.samples)} images, {len(loader)} steps per epoch")
    return Run(cfg, device, teacher, learner, step, loader, class_names, teacher_input, "student", autocast_dtype,
               heldout_loader, feature_cache, owns_group)


# --------------------------------------------------------------------------------- the loop


class Trainer:
    """Runs a built :class:`Run`: the loop, metrics, checkpoints and resume."""

    def __init__(self, run: Run, *, log: Callable[[str], None] = print):
        self.run = run
        self.cfg = run.config
        self.log = log
        self.out_dir = Path(self.cfg.train.out_dir)
        self.ckpt_dir = self.out_dir / "checkpoints"
        params = list(run.step.trainable_parameters().values())
        if not params:
            raise ConfigError("the learner has no trainable tensors (prompt length or depth 0?)")
        self.params = params
        o = self.cfg.optim
        if o.name == "sgd":
            self.optimizer = torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
        else:
            self.optimizer = torch.optim.AdamW(params, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay)
        micro_per_epoch = len(run.loader)
        self.total_steps = (self.cfg.train.max_steps if self.cfg.train.max_steps is not None
                            else (self.cfg.train.epochs * micro_per_epoch) // o.grad_accum)
        if self.total_steps < 1:
            raise ConfigError(f"the run has no optimizer step: {micro_per_epoch} batches per epoch, "
                              f"grad_accum {o.grad_accum}, epochs {self.cfg.train.epochs}")
        self.global_step = 0
        self.images_seen = 0
        self.best: Optional[dict] = None  # {"step", metric: value} of the best held-out evaluation
        self.step_fn = torch.compile(run.step) if self.cfg.train.compile else run.step
        from .distributed import rank_and_world

        # Several ranks: every rank runs the same steps on its slice; rank 0 alone writes files.
        self.rank, self.world = rank_and_world()
        self.is_main = self.rank == 0

    # -- checkpoints --------------------------------------------------------------------------
    def state(self) -> dict:
        return {
            "step": self.global_step,
            "images_seen": self.images_seen,
            "learner": self.run.step.state_to_save(),
            "optimizer": self.optimizer.state_dict(),
            "rng": rng_state(),
            "loader": self.run.loader.state_dict(),
            "config": dump_run_config(self.cfg),
            "best": self.best,
        }

    def save(self) -> Path:
        if self.world > 1:
            self.run.loader.sync_rejects()  # a collective: the checkpoint carries every rank's rejects
            if not self.is_main:
                return self.ckpt_dir / f"step-{self.global_step:09d}.safetensors"
        return save_checkpoint(self.ckpt_dir, self.global_step, self.state(), keep_last=self.cfg.train.keep_last)

    def _cached_features(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch's teacher features from the cache, and its mask less rows the cache rejected.

        The loader replays the stored views; every real row's crop and flip are compared with
        the stored numbers (CPU arrays, no device work), so a changed image or transform can
        never pair a student view with another view's teacher features.
        """
        from .teacher_cache import TeacherCacheError

        ids, views = batch.sample_ids.numpy(), batch.view_ids.numpy()
        features, stored, valid = self.run.feature_cache.lookup(ids, views)
        real = batch.mask.numpy()
        differs = ((stored[real, :4] != batch.crops.numpy()[real]).any(axis=1)
                   | (stored[real, 4].astype(bool) != batch.flips.numpy()[real]))
        if differs.any():
            bad = int(ids[real][np.flatnonzero(differs)[0]])
            raise TeacherCacheError(f"the loader's view of sample {bad} differs from the cached one: the image "
                                    f"or the transform changed since the cache was built; rebuild the cache")
        mask = torch.from_numpy(real & valid)
        return torch.from_numpy(features).to(self.run.device, non_blocking=True), mask

    def select(self) -> dict:
        """Held-out teacher-student agreement and KL (no labels); keep the best learner state.

        Runs at every checkpoint when ``data.holdout_fraction`` > 0. The best state (by
        ``train.select_metric``) is written to ``<out_dir>/best.safetensors``; without a
        held-out set the last checkpoint is the result.
        """
        run = self.run
        if run.heldout_loader is None:
            return {}
        from .evaluate import heldout_agreement_kl, is_better

        run.heldout_loader.set_epoch(0)
        # Several ranks: each scores its slice of every held-out batch; the tallies are summed, so
        # every rank sees the same result, takes the same decision, and rank 0 writes the file.
        result = heldout_agreement_kl(run.step, run.heldout_loader, teacher_input=run.teacher_input,
                                      student_input=run.student_input, autocast_dtype=run.autocast_dtype,
                                      all_reduce=self.world > 1)
        metric = self.cfg.train.select_metric
        out = {"heldout/agreement": result["agreement"], "heldout/kl": result["kl"]}
        if is_better(metric, result[metric], None if self.best is None else self.best[metric]):
            self.best = {"step": self.global_step, "agreement": result["agreement"], "kl": result["kl"]}
            if self.is_main:
                save_state(self.out_dir / "best.safetensors", {"step": self.global_step, "best": self.best,
                                                               "learner": run.step.state_to_save(),
                                                               "config": dump_run_config(self.cfg)})
                self.log(f"clipdistill: step {self.global_step}: best held-out {metric} so far "
                         f"({result[metric]:.4g}); saved {self.out_dir / 'best.safetensors'}")
        return out

    def resume(self) -> bool:
        path = latest_checkpoint(self.ckpt_dir)
        if path is None:
            self.log(f"clipdistill: --resume: no checkpoint in {self.ckpt_dir}; starting from scratch")
            return False
        state = load_checkpoint(path)
        saved, now = state["config"], dump_run_config(self.cfg)
        ignorable = ("train.resume", "train.max_steps", "train.epochs", "train.progress", "train.log_every",
                     "train.checkpoint_every", "train.keep_last", "train.tensorboard",
                     "train.deepspeed")  # how the teacher is sharded does not change the run
        different = [k for k in config_differences(saved, now) if k not in ignorable]
        if different:
            raise ConfigError(f"--resume: the checkpoint {path} was made with a different config: "
                              f"{', '.join(different)} differ")
        self.run.step.load_saved_state(state["learner"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.run.loader.load_state_dict(state["loader"])
        set_rng_state(state["rng"])
        self.global_step = int(state["step"])
        self.images_seen = int(state["images_seen"])
        self.best = state.get("best")
        self.log(f"clipdistill: resumed from {path} (step {self.global_step})")
        return True

    # -- the loop -----------------------------------------------------------------------------
    def _set_lr(self) -> float:
        o = self.cfg.optim
        lr = lr_at(self.global_step, base_lr=o.lr, total_steps=self.total_steps, warmup_steps=o.warmup_steps,
                   warmup_lr=o.warmup_lr, schedule=o.schedule)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def fit(self) -> dict:
        cfg, run = self.cfg, self.run
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if cfg.train.resume:
            self.resume()
        if self.is_main:
            (self.out_dir / "config.json").write_text(json.dumps(dump_run_config(cfg), indent=2))
        metrics_path = self.out_dir / "metrics.jsonl"
        tb = self._tensorboard() if self.is_main else None
        progress = self._progress() if self.is_main else None
        images_logged = self.images_seen  # several ranks: global counts at each log
        device, accum = run.device, cfg.optim.grad_accum
        run.step.train()
        acc: dict[str, torch.Tensor] = {}
        acc_count = 0
        first_bad = torch.full((), -1, dtype=torch.int64, device=device)
        last_good_ckpt = latest_checkpoint(self.ckpt_dir)
        interval_start, interval_images = time.perf_counter(), 0
        micro = 0
        self.optimizer.zero_grad(set_to_none=True)
        lr = self._set_lr()
        summary: dict = {}
        while self.global_step < self.total_steps:
            for batch in run.loader:
                mask = batch.mask
                teacher_images = batch.images[run.teacher_input] if run.teacher_input else None
                student_images = batch.images[run.student_input]
                teacher_features = None
                if run.feature_cache is not None:
                    teacher_features, mask = self._cached_features(batch)
                real_rows = int(mask.sum())  # the mask lives on the CPU: no device sync
                row_weights = row_mask = None  # a batch without padding: plain means and statistics
                if 0 < real_rows < len(mask):
                    row_mask = mask.to(device=device, non_blocking=True)
                    row_weights = row_mask.to(torch.float32)
                elif real_rows == 0:
                    # A rank whose share of the step is all padding still takes it (ranks stay in
                    # step; its batch norm joins the others' statistics with no rows), with a zero
                    # loss instead of 0/0.
                    row_mask = mask.to(device=device, non_blocking=True)
                with torch.autocast(device.type, dtype=run.autocast_dtype or torch.float32,
                                    enabled=run.autocast_dtype is not None):
                    parts = self.step_fn(teacher_images, student_images, row_weights,
                                         teacher_features=teacher_features, row_mask=row_mask)
                if real_rows == 0:
                    parts = {name: value * 0.0 for name, value in parts.items()}
                if self.world > 1:
                    # Scaled by this rank's share of the global batch's real rows, the ranks'
                    # losses sum to the global batch's mean: the summed gradients are the
                    # single-process ones (distributed.sum_gradients), and so are the logged sums.
                    from .distributed import row_share

                    share = row_share(real_rows, device)
                    parts = {name: value * share for name, value in parts.items()}
                (parts["loss"] / accum).backward()
                for name, value in parts.items():
                    value = value.detach()
                    acc[name] = acc[name] + value if name in acc else value.clone()
                acc_count += 1
                self.images_seen += real_rows
                interval_images += real_rows
                micro += 1
                if micro % accum:
                    continue
                bad_now = ~torch.isfinite(parts["loss"].detach())
                first_bad = torch.where((first_bad < 0) & bad_now,
                                        torch.full_like(first_bad, self.global_step), first_bad)
                if self.world > 1:
                    from .distributed import sum_gradients

                    sum_gradients(self.params)
                if cfg.optim.clip_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(self.params, cfg.optim.clip_grad_norm)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.global_step += 1
                lr_used, lr = lr, self._set_lr()
                done = self.global_step >= self.total_steps
                if self.global_step % cfg.train.log_every == 0 or done or \
                        self.global_step % cfg.train.checkpoint_every == 0:
                    # One synchronization per interval: losses, the non-finite check, progress.
                    names = list(acc)
                    values = (torch.stack([acc[n] for n in names]) / acc_count).tolist()
                    bad = int(first_bad)
                    if self.world > 1:
                        # The global batch's losses (the ranks' shares sum to them) and counts;
                        # every rank sees a non-finite loss anywhere, so all stop together.
                        from .distributed import all_reduce_sum

                        summed = all_reduce_sum(values + [interval_images, float(bad >= 0)], device)
                        interval_images = int(summed[len(names)])
                        values = summed[:len(names)]
                        if summed[len(names) + 1] > 0 and bad < 0:
                            bad = max(0, self.global_step - 1)
                        self.images_seen = images_logged + interval_images
                        images_logged = self.images_seen
                    if bad >= 0 or not all(math.isfinite(v) for v in values):
                        where = bad if bad >= 0 else self.global_step - 1
                        good = f"the last good checkpoint, {last_good_ckpt}, is intact" if last_good_ckpt else \
                            "no checkpoint was written before it"
                        raise NonFiniteLossError(f"non-finite loss at step {where}; stopping ({good})")
                    elapsed = time.perf_counter() - interval_start
                    record = {"step": self.global_step, "epoch": run.loader.epoch, "lr": lr_used,
                              **{f"loss/{n}": v for n, v in zip(names, values)},
                              "images_per_s": interval_images / max(elapsed, 1e-9),
                              "images_seen": self.images_seen, "rejected_images": len(run.loader.rejects)}
                    if self.is_main:
                        with open(metrics_path, "a", encoding="utf-8") as fh:
                            fh.write(json.dumps(record) + "\n")
                    if tb is not None:
                        for key, value in record.items():
                            if key != "step":
                                tb.add_scalar(key, value, self.global_step)
                    if progress is not None:
                        progress.update(self.global_step - progress.n)
                        progress.set_postfix(loss=f"{record['loss/loss']:.4g}",
                                             img_s=f"{record['images_per_s']:.0f}")
                    summary = record
                    acc, acc_count = {}, 0
                    interval_start, interval_images = time.perf_counter(), 0
                    if self.global_step % cfg.train.checkpoint_every == 0 or done:
                        selection = self.select()
                        if selection:
                            if self.is_main:
                                with open(metrics_path, "a", encoding="utf-8") as fh:
                                    fh.write(json.dumps({"step": self.global_step, **selection}) + "\n")
                            summary = {**record, **selection}
                        last_good_ckpt = self.save()
                if done:
                    break
        if progress is not None:
            progress.close()
        if tb is not None:
            tb.close()
        summary = {**summary, "checkpoint": str(last_good_ckpt) if last_good_ckpt else None}
        return summary

    def _progress(self):
        if not self.cfg.train.progress:
            return None
        from tqdm import tqdm

        return tqdm(total=self.total_steps, initial=self.global_step, desc="distill", unit="step",
                    dynamic_ncols=True, file=sys.stderr)

    def _tensorboard(self):
        if not self.cfg.train.tensorboard:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise ConfigError(f"train.tensorboard=true needs the tensorboard package ({exc})") from exc
        return SummaryWriter(str(self.out_dir / "tensorboard"))


def distill(cfg: RunConfig, *, log: Callable[[str], None] = print) -> dict:
    """Build and run a distillation; return the last metrics line plus the final checkpoint path."""
    run = build_run(cfg, log=log)
    try:
        summary = Trainer(run, log=log).fit()
        if run.owns_process_group:
            torch.distributed.barrier()  # rank 0's last checkpoint is written before anyone leaves
        return summary
    finally:
        # After the barrier above: with torch 2.13's gloo, a rank that leaves with its group
        # alive, or destroys it while a peer is still in a collective, now and then aborts at exit
        # ("terminate called without an active exception", SIGABRT, after the work is done).
        # Measured on 2 CPU ranks: no destroy 4 of 12 runs, destroy without a barrier 3 of 8,
        # barrier then destroy 0 of 10; 2-rank DeepSpeed `distill` runs: 0 of 18.
        if run.owns_process_group:
            torch.distributed.destroy_process_group()


# --------------------------------------------------------------------------------- CLI


def _cmd_distill(args: argparse.Namespace) -> int:
    # `deepspeed=ds_config.json` is short for train.deepspeed=ds_config.json.
    overrides = [f"train.{o}" if o.startswith("deepspeed=") else o for o in args.overrides]
    if args.resume:
        overrides.append("train.resume=true")
    try:
        cfg = load_run_config(args.config, overrides, recipe=args.recipe)
        summary = distill(cfg, log=lambda m: print(m, file=sys.stderr))
    except NonFiniteLossError as exc:
        print(f"clipdistill distill: error: {exc}", file=sys.stderr)
        return 3
    except (ValueError, FileNotFoundError, KeyError) as exc:  # bad config, data or files: said plainly
        print(f"clipdistill distill: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary))
    if cfg.train.deepspeed:
        # Everything is written (rank 0's checkpoint before the final barrier) and flushed. After
        # a run with DeepSpeed's ZeRO-3 teacher, the interpreter's teardown was seen to abort in a
        # native destructor ("terminate called without an active exception", SIGABRT; CPU/gloo,
        # see ../shared/ENVIRONMENT.md) before distill() destroyed its process group; not seen
        # since, but leaving without the teardown keeps a finished run's exit code 0 regardless.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


def register(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "distill", help="distill a teacher into a prompt-tuned student (KDPL, PromptKD)",
        description="Distill a frozen CLIP teacher into a student's prompts on unlabeled images. "
                    "Settings: a shipped recipe, a YAML file and key=value overrides (e.g. optim.lr=0.01).",
    )
    parser.add_argument("--config", default=None, help="YAML run config (may name its recipe with 'recipe:')")
    parser.add_argument("--recipe", default=None, help="shipped recipe: kdpl or promptkd")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in train.out_dir")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    parser.set_defaults(func=_cmd_distill)
    return parser
