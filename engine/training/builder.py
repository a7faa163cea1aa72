"""The one builder: a run's config turned into models, class vectors, the step and the loaders.

:func:`build_run` is the only place that reads a :class:`~clipdistill.engine.config.run.RunConfig`
for a training run; everything it builds takes plain arguments. The data config becomes
transforms and loaders in :func:`training_transform` and :func:`image_loader`, which the teacher
cache's builder uses too, so the cache's key (the ``repr`` of the transform) equals the
training run's by construction.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from torch import nn

from clipdistill.engine.config.run import RunConfig, dump_run_config, resume_config
from clipdistill.engine.config.schema import ConfigError
from clipdistill.engine.datafree.student import TimmStudent, build_timm_backbone, student_image_spec
from clipdistill.engine.datafree.synthesize import RANDOM_TEACHER_SEED, load_teacher
from clipdistill.engine.distill.metrics import base_novel_split
from clipdistill.engine.distill.step import DistillStep
from clipdistill.engine.evaluation.evaluate import holdout_split, scan_labeled_folder
from clipdistill.engine.io import image_spec, read_class_names, read_templates, resolve_device
from clipdistill.engine.models.class_vectors import ClassVectorKey, cached_class_vectors, teacher_class_vectors
from clipdistill.engine.models.clip import build_student, build_teacher, get_tokenizer
from clipdistill.engine.models.tuned import load_tuned_teacher, read_tuned_header, tuned_teacher_class_vectors
from clipdistill.engine.parallel import launch, zero
from clipdistill.engine.parallel.batchnorm import sync_batch_norm
from clipdistill.engine.prompts.learners import PromptLearner
from clipdistill.engine.prompts.registry import build_learner
from clipdistill.engine.training.checkpoint import (CheckpointError, latest_checkpoint, list_checkpoints,
                                                    load_checkpoint_config, read_checkpoint_run_id)
from clipdistill.engine.training.data import heldout_transform, image_loader, training_transform
from clipdistill.engine.training.run_dir import read_identity
from clipdistill.engine.training.sources import datafree_config, image_source
from clipdistill.engine.training.teacher_cache import CachedTeacher, TeacherCache, run_key
from clipdistill.engine.training.tune_teacher import draw_shots
from clipdistill.loaders.loader import ImageLoader, OutputSpec
from clipdistill.loaders.sources import SampleList
from clipdistill.loaders.views import ReplayViews

ImageSpec = tuple[int, tuple, tuple]  # (side, mean, std) of a model's input


@dataclass
class Run:
    """Everything a training run is made of (built by :func:`build_run`)."""

    config: RunConfig
    device: torch.device
    teacher: nn.Module  # Teacher, TunedTeacher, ShardedTeacher, or CachedTeacher (features from a cache)
    learner: PromptLearner
    step: DistillStep
    loader: ImageLoader
    class_names: list[str]
    teacher_input: Optional[str]  # name in Batch.images, or None when the features come from a cache
    student_input: str
    autocast_dtype: Optional[torch.dtype]
    heldout_loader: Optional[ImageLoader] = None  # held-out unlabeled images (center views), or None
    feature_cache: Optional[TeacherCache] = None  # set with teacher.cache: teacher features are looked up
    owns_process_group: bool = False  # build_run joined the launcher's process group (distill() leaves it)
    # Where the teacher's class vectors came from: "teacher", "tuned" (teacher.prompts) or "teacher_cache";
    # stored with the run's checkpoints (engine/training/checkpoint.py, save_class_vectors).
    class_vectors_source: str = "teacher"
    templates: Optional[list[str]] = None


@dataclass
class _Placement:
    """Where the run executes: its device, rank and world, DeepSpeed's config, a joined group."""

    device: torch.device
    rank: int
    world: int
    ds_config: Optional[dict]
    owns_group: bool


def _place(cfg: RunConfig) -> _Placement:
    """Resolve the device and, under a launcher, join the process group (engine/parallel/)."""
    device = resolve_device(cfg.train.device)
    ds_config = None
    if cfg.train.deepspeed:
        ds_config = zero.load_deepspeed_config(cfg.train.deepspeed, micro_batch_size=cfg.data.batch_size)
        ds_config = zero.with_teacher_precision(ds_config, cfg.teacher.precision, device)
        zero.require_deepspeed(ds_config)
    launch_env = launch.detect_launch(required=ds_config is not None,
                                      reason="train.deepspeed is set, and DeepSpeed runs one process per device.")
    owns_group = False
    if launch_env is not None:
        device = launch.rank_device(device, launch_env)
        owns_group = launch.init_process_group(launch_env, device)
    rank, world = launch.rank_and_world()
    if world > 1:
        launch.check_world(world, global_batch_size=cfg.data.batch_size, num_samples=None)
    return _Placement(device, rank, world, ds_config, owns_group)


def _cached_teacher(cfg: RunConfig, class_names: list[str], templates: list[str], device: torch.device,
                    samples: SampleList):
    """The teacher cache checked against the run, its stand-in teacher, the class vectors, the image list."""
    cache = TeacherCache(cfg.teacher.cache)
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


def _tuned_teacher(cfg: RunConfig, class_names: list[str], where: _Placement) -> tuple[nn.Module, torch.Tensor]:
    """PromptKD: the tuned teacher and the class vectors of its tuned prompts, computed once after
    loading them (never from the class-vector cache, whose key does not cover the prompts)."""
    tuned_on = read_tuned_header(cfg.teacher.prompts)["teacher"]["name"]
    if tuned_on != cfg.teacher.name:
        raise ConfigError(f"teacher.prompts {cfg.teacher.prompts!r} were tuned on {tuned_on!r}, "
                          f"but teacher.name is {cfg.teacher.name!r}")
    if where.ds_config is not None:
        return zero.build_sharded_tuned_teacher(
            cfg.teacher.prompts, where.ds_config, device=where.device,
            class_vectors=lambda tuned: tuned_teacher_class_vectors(tuned, class_names))
    teacher = load_tuned_teacher(cfg.teacher.prompts, device=where.device, precision=cfg.teacher.precision)
    return teacher, tuned_teacher_class_vectors(teacher, class_names)


def _live_teacher(cfg: RunConfig, class_names: list[str], templates: list[str],
                  where: _Placement) -> tuple[nn.Module, torch.Tensor]:
    """The frozen teacher (sharded with train.deepspeed) and its class vectors (cached on disk)."""
    cache = cfg.train.class_vector_cache or str(Path(cfg.train.out_dir) / "class_vectors")

    def class_vectors(live_teacher) -> torch.Tensor:
        return teacher_class_vectors(live_teacher, get_tokenizer(cfg.teacher.name), class_names, templates,
                                     model_name=cfg.teacher.name, weights=cfg.teacher.weights,
                                     cache_dir=cache, device=where.device)

    # A random-init data-free teacher (smoke tests) is the one `clipdistill synthesize` made the set with.
    datafree = cfg.method == "datafree"
    if where.ds_config is not None:
        return zero.build_sharded_teacher(cfg.teacher.name, cfg.teacher.weights, where.ds_config,
                                          device=where.device, class_vectors=class_vectors,
                                          seed=RANDOM_TEACHER_SEED if datafree else cfg.train.seed)
    build = load_teacher if datafree else build_teacher
    teacher = build(cfg.teacher.name, cfg.teacher.weights, device=where.device, precision=cfg.teacher.precision)
    # Computed (and cached) on rank 0 only, then shared; a plain call in a single process.
    return teacher, launch.broadcast_from_rank0(lambda: class_vectors(teacher), where.device)


def _student(cfg: RunConfig, class_names: list[str], templates: list[str], teacher_dim: int,
             where: _Placement, teacher_logit_scale: float) -> PromptLearner | TimmStudent:
    # Seeded again: the student's random parts (prompts; a random-init backbone in tests) must not
    # depend on whether the teacher was built, loaded from tuned prompts or replaced by a cache.
    torch.manual_seed(cfg.train.seed + 1)
    if cfg.method == "datafree":  # a timm network trained whole, scoring at the teacher's logit scale
        try:
            backbone = build_timm_backbone(cfg.student.name, cfg.student.weights)
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
        # Over several ranks its batch norms keep per-rank statistics, as DDP without SyncBatchNorm:
        # timm's norm layers (BatchNormAct2d: norm, activation, drop) are not plain batch norms that
        # sync_batch_norm could take over. The gradients are still summed over the ranks.
        return TimmStudent(backbone, teacher_dim, logit_scale=teacher_logit_scale,
                           **cfg.learner.options).to(where.device)
    student_clip = build_student(cfg.student.name, cfg.student.weights, device=where.device,
                                 precision=cfg.student.precision or "fp32")
    if cfg.learner.kind == "promptsrc" and cfg.learner.frozen_templates:
        # PromptSRC's templates are its frozen text target (the published 60 by default)
        templates = read_templates(cfg.learner.frozen_templates, what="learner.frozen_templates")
    learner = build_learner(cfg.learner.kind, student_clip, tokenizer=get_tokenizer(cfg.student.name),
                            class_names=class_names, templates=templates, teacher_dim=teacher_dim,
                            prompt_placement=cfg.learner.prompt_placement, **cfg.learner.options).to(where.device)
    if where.world > 1:
        learner = sync_batch_norm(learner)  # PromptKD's projector BN sees the global batch
    return learner


def _outputs(student_spec: ImageSpec, teacher: Optional[nn.Module]) -> tuple[list[OutputSpec], Optional[str]]:
    """The loader's outputs (the student's resolution, the teacher's when it differs) and the teacher's
    input name (None when its features come from a cache)."""
    s_size, s_mean, s_std = student_spec
    outputs = [OutputSpec("student", s_size, s_mean, s_std)]
    if teacher is None:
        return outputs, None
    spec = image_spec(teacher.model)
    if spec == (s_size, s_mean, s_std):
        return outputs, "student"
    return outputs + [OutputSpec("teacher", *spec)], "teacher"


def labeled_selection(cfg: RunConfig, log: Callable[[str], None] = print):
    """Class names and images of a few-shot and/or base-class run (``data.shots``,
    ``data.base_classes_only``): data.train is a folder of class subfolders; the labels only choose
    images and classes, the distillation never sees them. Shots are drawn per class first
    (:func:`~clipdistill.engine.training.tune_teacher.draw_shots`, seeded by ``data.shot_seed``;
    a class with fewer images gives all it has), then the base classes, the first half rounded
    up in class order, are kept, as CoOp and KDPL split base and novel."""
    names_file = cfg.data.class_names or None
    if names_file and ":" in names_file.split("/", 1)[0]:  # builtin:NAME, kdpl-csv:PATH
        raise ConfigError(f"data.class_names={names_file!r} is a vocabulary, while data.shots / "
                          f"data.base_classes_only take the classes of data.train's subfolders: give a "
                          f"class-name file of those folders, or none")
    try:
        if cfg.data.shots is not None:
            drawn = draw_shots(cfg.data.train, names_file, cfg.data.shots, cfg.data.shot_seed, "use-all")
            if drawn.short:
                log(f"clipdistill: {len(drawn.short)} class(es) have fewer than data.shots={cfg.data.shots} "
                    f"images and give all they have: " + ", ".join(list(drawn.short)[:8]))
            names, samples, labels = drawn.class_names, drawn.samples, drawn.labels
        else:
            folder = scan_labeled_folder(cfg.data.train, names_file)
            names, samples, labels = folder.class_names, folder.samples, folder.labels
    except (ValueError, FileNotFoundError) as exc:
        raise ConfigError(f"data.shots / data.base_classes_only need data.train to be a folder with one "
                          f"subfolder of images per class: {exc}") from exc
    if cfg.data.base_classes_only:
        base = len(base_novel_split(len(names))[0])  # the split `clipdistill eval --base-to-novel` scores
        keep = np.flatnonzero(labels < base)
        names, samples = names[:base], samples.subset(keep)
    return list(names), samples


def build_run(cfg: RunConfig, *, log: Callable[[str], None] = print) -> Run:
    """Turn a config into models, class vectors, the step and the loaders (the one builder)."""
    if cfg.train.resume:
        cfg = _resumed_config(cfg, log)
    if not cfg.data.train:
        raise ConfigError("data.train: no image source given (a folder, a list file or tar shards)")
    synthetic = None
    if cfg.method == "datafree":
        cfg, synthetic = datafree_config(cfg, log)
    selected = None
    if synthetic is not None and not cfg.data.class_names:
        class_names = synthetic.class_names
    elif cfg.data.shots is not None or cfg.data.base_classes_only:
        class_names, selected = labeled_selection(cfg, log)
        log(f"clipdistill: {len(selected)} images of {len(class_names)} classes"
            + (f" ({cfg.data.shots} shots per class, seed {cfg.data.shot_seed})" if cfg.data.shots else "")
            + (", base classes only" if cfg.data.base_classes_only else ""))
    else:
        class_names = read_class_names(cfg.data.class_names)
    templates = read_templates(cfg.data.templates)
    where = _place(cfg)
    device, rank, world = where.device, where.rank, where.world
    torch.manual_seed(cfg.train.seed)
    feature_cache = None
    lists = str(Path(cfg.train.out_dir) / "lists")
    # The run's own image list: a resumed run keeps the one it started with (its checkpoints hold the
    # list's digest); a folder changed since is reported by resolve_source, not mixed in. A few-shot or
    # base-class run's list is the selection (drawn again, the same, from the seed).
    resuming = cfg.train.resume and latest_checkpoint(Path(cfg.train.out_dir) / "checkpoints") is not None
    if selected is not None:
        source = selected
    else:
        source = image_source(cfg.data.train, "data.train", lists=lists, resuming=resuming, synthetic=synthetic)
    vectors_source = "teacher_cache" if cfg.teacher.cache else "tuned" if cfg.teacher.prompts else "teacher"
    if cfg.method == "promptkd" and vectors_source == "teacher":
        log(f"clipdistill: WARNING: PromptKD is distilling from the untuned teacher {cfg.teacher.name} "
            f"({cfg.teacher.weights}): the published method first prompt-tunes it (clipdistill tune-teacher) and "
            f"passes that file as teacher.prompts, whose class vectors the student then learns and predicts with")
    if cfg.teacher.cache:
        teacher, vectors, feature_cache, source = _cached_teacher(cfg, class_names, templates, device, source)
        if where.ds_config is not None:
            log("clipdistill: teacher.cache holds the teacher's features, so no teacher is loaded and "
                "train.deepspeed has nothing to shard; the ranks train data-parallel")
            where.ds_config = None
    elif cfg.teacher.prompts:
        teacher, vectors = _tuned_teacher(cfg, class_names, where)
    else:
        teacher, vectors = _live_teacher(cfg, class_names, templates, where)
    teacher_dim = int(vectors.shape[1])
    learner = _student(cfg, class_names, templates, teacher_dim, where, float(teacher.logit_scale))
    student_dim = int(learner.clip.visual.output_dim if cfg.method != "datafree" else learner.head.in_features)
    projected = "" if cfg.method == "kdpl" else f" projected to D={teacher_dim}"
    detail = f", learner {cfg.learner.kind}" if cfg.method == "kdpl" else ""
    log(f"clipdistill: teacher {cfg.teacher.name} (D={teacher_dim}) -> student {cfg.student.name} "
        f"(D={student_dim}){projected}{detail}, {len(class_names)} classes")
    if cfg.loss.top_k is not None and cfg.loss.top_k > len(class_names):
        raise ConfigError(f"loss.top_k={cfg.loss.top_k} exceeds the {len(class_names)} names of "
                          f"data.class_names={cfg.data.class_names!r}")
    step = DistillStep(
        teacher, learner, vectors, recipe=cfg.method, top_k=cfg.loss.top_k, temperature=cfg.loss.temperature,
        forward_weight=cfg.loss.forward_weight, reverse_weight=cfg.loss.reverse_weight,
        reduction=cfg.loss.reduction, temperature_squared=cfg.loss.temperature_squared,
        kd_weight=cfg.loss.kd_weight, promptsrc_weights=cfg.loss.promptsrc_weights, loss_backend=cfg.loss.backend,
        feature_weight=cfg.loss.feature_weight,
    )
    precision = cfg.train.precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    autocast_dtype = torch.bfloat16 if precision == "bf16" else None
    dtype = torch.bfloat16 if autocast_dtype is not None else torch.float32
    outputs, teacher_input = _outputs(student_image_spec(learner), None if feature_cache is not None else teacher)
    heldout_loader = heldout = None
    if cfg.data.holdout_fraction > 0:
        source, heldout = holdout_split(source, cfg.data.holdout_fraction,
                                        seed=cfg.train.seed)
    elif cfg.data.heldout:
        heldout = image_source(cfg.data.heldout, "data.heldout", lists=lists, resuming=resuming)
    if heldout is not None:
        heldout_loader = image_loader(heldout, cfg.data, outputs=outputs, transform=heldout_transform(),
                                      seed=cfg.train.seed, device=device, dtype=dtype, rank=rank, world_size=world)
        log(f"clipdistill: {len(heldout)} unlabeled images held out for model selection "
            f"(train.select_metric={cfg.train.select_metric})")
    loader = image_loader(source, cfg.data, outputs=outputs, transform=training_transform(cfg.data),
                          seed=cfg.train.seed, device=device, dtype=dtype, cache_dir=lists,
                          replay=ReplayViews(feature_cache.num_views) if feature_cache is not None else None,
                          rank=rank, world_size=world)
    if world > 1:
        launch.check_world(world, global_batch_size=cfg.data.batch_size, num_samples=len(loader.samples))
        log(f"clipdistill: rank {rank} of {world}: {cfg.data.batch_size // world} of every {cfg.data.batch_size} "
            f"images per step" + (f", teacher sharded with ZeRO-3 (offload_param: {teacher.offload_device})"
                                 if where.ds_config is not None else ""))
    log(f"clipdistill: loader backend {loader.backend}, {len(loader.samples)} images, {len(loader)} steps per epoch")
    return Run(config=cfg, device=device, teacher=teacher, learner=learner, step=step, loader=loader,
               class_names=class_names, teacher_input=teacher_input, student_input="student",
               autocast_dtype=autocast_dtype, heldout_loader=heldout_loader, feature_cache=feature_cache,
               owns_process_group=where.owns_group, class_vectors_source=vectors_source, templates=templates)


def _resumed_config(cfg: RunConfig, log: Callable[[str], None]) -> RunConfig:
    """``cfg``, with what the user did not set taken from the checkpoint it resumes
    (:func:`~clipdistill.engine.config.run.resume_config`)."""
    found = _resumable_config(Path(cfg.train.out_dir))
    if found is None:
        return cfg
    path, saved = found
    resumed, taken = resume_config(cfg, saved)
    if taken:
        log(f"clipdistill: --resume: taken from {path.name}, as the run started with them (you did not set "
            f"them): " + ", ".join(f"{k}={_short(v)}" for k, v in ((k, _lookup(dump_run_config(resumed), k))
                                                                     for k in taken)))
    if resumed.method == "datafree" and resumed.explicit_keys is not None:
        # The teacher is now the run's own (from the checkpoint, or as the user set it): the synthetic
        # set's plan must not replace it (training.sources.datafree_config fills unset keys only).
        resumed = copy.copy(resumed)
        resumed.explicit_keys = resumed.explicit_keys | {"teacher.name", "teacher.weights"}
    return resumed


def _resumable_config(out_dir: Path) -> Optional[tuple[Path, dict]]:
    """The newest checkpoint of the run recorded in ``out_dir`` whose header reads, with its config.

    Another run's checkpoints (a run id that is not this folder's) are passed over, and so are
    checkpoints whose header cannot be read: the trainer sets those aside when it resumes and
    falls back to an intact one, so the config must come from the checkpoint it will resume.
    """
    identity = read_identity(out_dir)  # None: a folder without run.json (written before run identities)
    for _, path in reversed(list_checkpoints(out_dir / "checkpoints")):
        if identity is not None and not identity.owns(read_checkpoint_run_id(path)):
            continue
        try:
            return path, load_checkpoint_config(path)
        except CheckpointError:
            continue
    return None


def _lookup(tree: dict, key: str):
    for part in key.split("."):
        tree = tree.get(part) if isinstance(tree, dict) else None
    return tree


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
