"""PromptKD's first stage: prompt-tune a frozen teacher with PromptSRC on a few labels.

The file format and loading it back live in :mod:`clipdistill.engine.models.tuned`; the
command line in :mod:`clipdistill.engine.commands.tune_teacher`.

    clipdistill tune-teacher --teacher NAME [--teacher-weights W] --data FOLDER [--class-names FILE]
                             --shots N [--seed S] [--on-short-class error|use-all|skip]
                             [--epochs E] [--lr LR] [--batch-size B] [--n-ctx N] [--depth D]
                             [--eval-data FOLDER] --out FILE

PromptKD (see shared/PAPERS.md) distills from a teacher that was first prompt-tuned,
PromptSRC-style, with the few labels the domain has. This module does that stage:

1. **Shots.** The labeled folder (one subfolder of images per class) is scanned with
   :func:`clipdistill.engine.evaluate.scan_labeled_folder`, so class names, folder mapping
   and refusals are those of ``clipdistill eval``. For each class, ``shots`` images are
   drawn without replacement by a generator seeded with (seed, CRC-32 of the class folder's
   name): a class's draw depends only on the seed, its folder name and its files, never on
   the other classes. A class with fewer images than ``shots`` is refused, trained on all
   its images, or left out, as ``on_short_class`` says.
2. **Tuning.** The teacher CLIP is frozen and :class:`~clipdistill.engine.prompts.PromptSRC`
   (deep text and vision prompts) is built over it. Each step: the loader's views
   (random resized crop and flip, :class:`clipdistill.loaders.loader.ImageLoader`, which
   also rejects unreadable files) -> the learner's logits (B, C) -> cross-entropy with the
   labels, plus PromptSRC's self-regularizing parts weighted by
   :data:`~clipdistill.engine.prompts.PROMPTSRC_LOSS_WEIGHTS`. SGD with momentum, one
   warm-up epoch at a constant small rate, then cosine to 0 (PromptSRC's schedule). At the
   end of every epoch the prompts go into PromptSRC's Gaussian prompt aggregation; the
   aggregate is what is saved.
3. **The file.** One ``.safetensors`` file, no pickle: the learner's state
   (``learner.state_to_save()``) as tensors, and in the header's metadata a JSON document
   with the teacher's name and weights, the learner's kind and options, the class names
   and folders, the templates, the shots drawn, the settings and the versions.

:func:`load_tuned_teacher` rebuilds the teacher CLIP, builds the learner over it, loads
the tuned state and only then computes class vectors (:meth:`TunedTeacher.class_vectors`,
once per list of names, cached). Computing them from the untuned prompts is the mistake
PromptKD's tracker reports; :meth:`TunedTeacher.encode_text` refuses, so the class-vector
cache of a plain teacher cannot be filled from a tuned one by accident.
"""
from __future__ import annotations

import os
import time
import zlib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from clipdistill.engine.evaluation.evaluate import scan_labeled_folder
from clipdistill.engine.io import image_spec, read_templates, resolve_device
from clipdistill.engine.models.clip import Teacher, _default_precision, get_tokenizer, load_clip
from clipdistill.engine.models.towers import TextTower
from clipdistill.engine.models.tuned import (LEARNER_KIND, TunedTeacher, _input_dtype, _versions, load_tuned_teacher,
                                             save_tuned_teacher)
from clipdistill.engine.progress import progress_bar
from clipdistill.engine.prompts.learners import PROMPTSRC_LOSS_WEIGHTS, GaussianPromptAggregator
from clipdistill.engine.prompts.registry import build_learner
from clipdistill.engine.training.loop import OptimizerCore, make_optimizer
from clipdistill.loaders.loader import ImageLoader, OutputSpec
from clipdistill.loaders.views import CenterCrop, RandomResizedCrop

ON_SHORT_CLASS = ("error", "use-all", "skip")


class TuneTeacherInputError(ValueError):
    """Input that tune-teacher refuses: the message says what was wrong and what to do."""


# ------------------------------------------------------------------------------ shots


@dataclass
class ShotSelection:
    """The few labeled images a teacher is tuned on.

    ``samples`` is a :class:`clipdistill.loaders.sources.SampleList` of the drawn images
    (class by class, each class in path order); ``labels`` (N,) int64 index ``class_names``.
    """

    class_names: list[str]
    folders: list[str]
    samples: Any
    labels: np.ndarray
    per_class: list[int]
    skipped: list[str] = field(default_factory=list)
    short: dict[str, int] = field(default_factory=dict)


def _class_seed(seed: int, folder: str) -> np.random.Generator:
    return np.random.default_rng([int(seed), zlib.crc32(folder.encode("utf-8"))])


def draw_shots(
    data: Union[str, Path],
    class_names: Union[str, Path, Sequence[str], None],
    shots: int,
    seed: int,
    on_short_class: str = "error",
) -> ShotSelection:
    """Draw ``shots`` images per class of a labeled folder (see the module docstring).

    Args:
        data: a folder with one subfolder of images per class.
        class_names: a class-name file (one name per line, ``folder<TAB>name`` to map a
            folder), a list of names, or None (the folder names).
        shots: images per class (N >= 1).
        seed: the draw's seed.
        on_short_class: for a class with fewer than N images: ``"error"`` refuses,
            ``"use-all"`` trains on all of them, ``"skip"`` leaves the class out.

    Raises:
        TuneTeacherInputError: empty or duplicate lines in the class-name file, names that do
            not match the folders, an empty class, a short class under ``"error"``, or every
            class skipped.
        FileNotFoundError: ``data`` or the class-name file does not exist.
    """

    if on_short_class not in ON_SHORT_CLASS:
        raise TuneTeacherInputError(f"on_short_class must be one of {ON_SHORT_CLASS}, got {on_short_class!r}")
    if int(shots) < 1:
        raise TuneTeacherInputError(f"--shots must be at least 1, got {shots}")
    if isinstance(class_names, (str, Path)) and not os.path.isfile(class_names):
        raise FileNotFoundError(f"--class-names: class-name file {str(class_names)!r} does not exist")
    try:
        folder = scan_labeled_folder(data, class_names)
    except FileNotFoundError:
        raise
    except ValueError as exc:  # EvalInputError (folders), ConfigError (the name file's lines)
        raise TuneTeacherInputError(f"tune-teacher: {exc}") from exc

    counts = np.bincount(folder.labels, minlength=len(folder.class_names))
    short = {name: int(n) for name, n in zip(folder.class_names, counts) if n < shots}
    if short and on_short_class == "error":
        listed = ", ".join(f"{name!r} has {n}" for name, n in list(short.items())[:8])
        more = f" (and {len(short) - 8} more)" if len(short) > 8 else ""
        raise TuneTeacherInputError(
            f"{len(short)} class(es) of {folder.root} hold fewer than --shots {shots} images: {listed}{more}. "
            f"Add images, lower --shots, or choose --on-short-class use-all (train on all the images a short "
            f"class has) or skip (leave short classes out of the tuning)."
        )
    keep = [c for c, name in enumerate(folder.class_names) if not (name in short and on_short_class == "skip")]
    if not keep:
        raise TuneTeacherInputError(
            f"every class of {folder.root} has fewer than {shots} images and --on-short-class skip leaves none"
        )
    chosen, labels, per_class = [], [], []
    for new_label, c in enumerate(keep):
        members = np.flatnonzero(folder.labels == c)  # in path order
        take = min(int(shots), len(members))
        pick = np.sort(_class_seed(seed, folder.folders[c]).choice(len(members), size=take, replace=False))
        chosen.append(members[pick])
        labels += [new_label] * take
        per_class.append(take)
    indices = np.concatenate(chosen)
    return ShotSelection(
        class_names=[folder.class_names[c] for c in keep],
        folders=[folder.folders[c] for c in keep],
        samples=folder.samples.subset(indices),
        labels=np.asarray(labels, dtype=np.int64),
        per_class=per_class,
        skipped=[folder.class_names[c] for c in range(len(folder.class_names)) if c not in keep],
        short=short,
    )


# ------------------------------------------------------------------------------ settings


@dataclass(frozen=True)
class TuneSettings:
    """How the teacher is tuned. Defaults: PromptSRC's published few-shot settings.

    ``gpa_mean`` is the Gaussian's mean as a fraction of the epochs, as ``learner.gpa_mean`` in
    ``distill`` (0.75 of 20 epochs: PromptSRC's published 15); ``gpa_std`` is in epochs;
    ``warmup_epochs`` run at the constant rate ``warmup_lr`` before the cosine schedule.
    ``min_scale`` is the smallest crop area of the random resized crop (torchvision's 0.08).
    """

    shots: int = 16
    seed: int = 1
    on_short_class: str = "error"
    epochs: int = 20
    lr: float = 0.0025
    batch_size: int = 4
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: int = 1
    warmup_lr: float = 1e-5
    gpa_mean: float = 0.75
    gpa_std: float = 1.0
    loss_weights: Optional[Mapping[str, float]] = None
    min_scale: float = 0.08
    interpolation: str = "bicubic"
    backend: str = "auto"
    workers: Optional[int] = None

    def check(self) -> None:
        problems = []
        if self.epochs < 1:
            problems.append(f"epochs must be >= 1 (got {self.epochs})")
        if self.batch_size < 1:
            problems.append(f"batch_size must be >= 1 (got {self.batch_size})")
        if not self.lr > 0:
            problems.append(f"lr must be > 0 (got {self.lr})")
        if not 0 <= self.warmup_epochs < self.epochs:
            problems.append(f"warmup_epochs must be in [0, epochs) (got {self.warmup_epochs} of {self.epochs})")
        if not 0 < self.gpa_mean <= 1:
            problems.append(f"gpa_mean is a fraction of the epochs in (0, 1] (0.75 of 20 epochs is the published "
                            f"15), got {self.gpa_mean}")
        if not self.gpa_std > 0:
            problems.append(f"gpa_std must be > 0 (got {self.gpa_std})")
        if problems:
            raise TuneTeacherInputError("tune-teacher settings: " + "; ".join(problems))


def _loss_weights(settings: TuneSettings) -> dict[str, float]:

    weights = dict(PROMPTSRC_LOSS_WEIGHTS if settings.loss_weights is None else settings.loss_weights)
    unknown = set(weights) - set(PROMPTSRC_LOSS_WEIGHTS)
    if unknown:
        raise TuneTeacherInputError(f"loss_weights has unknown parts {sorted(unknown)}; known: "
                                    f"{sorted(PROMPTSRC_LOSS_WEIGHTS)}")
    return weights


def _learner_options(clip: nn.Module, options: Optional[Mapping[str, Any]], templates: Sequence[str]) -> dict:
    """PromptSRC's keyword arguments, with depths checked against the towers (naming the flag)."""

    options = dict(options or {})
    options.pop("templates", None)  # the templates are a separate argument, stored once
    text_layers = len(TextTower.of(clip).transformer.resblocks)
    vision_layers = len(clip.visual.transformer.resblocks)
    for key, layers, flag in (("text_depth", text_layers, "--depth"),
                              ("vision_depth", vision_layers, "--vision-depth")):
        depth = options.get(key, 9)
        if depth > layers:
            raise TuneTeacherInputError(
                f"{flag} {depth} (learner option {key}) exceeds the teacher's {layers} layers; "
                f"give a depth of at most {layers}"
            )
    return {**options, "templates": tuple(templates)}


# ------------------------------------------------------------------------------ tuning


@dataclass
class TuneResult:
    """What :func:`tune_teacher` did: the file, the shots and the losses of the last epoch."""

    path: str
    class_names: list[str]
    per_class: list[int]
    skipped: list[str]
    short: dict[str, int]
    losses: dict[str, float]
    seconds: float
    eval: Optional[dict] = None
    teacher: Optional["TunedTeacher"] = field(default=None, repr=False)  # the in-memory tuned teacher

    def as_dict(self) -> dict:
        """Plain data for JSON (without the teacher)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "teacher"}


def _top1(classify: Callable[[torch.Tensor], torch.Tensor], loader, labels: torch.Tensor, output: str) -> float:
    correct = total = 0
    for batch in loader:
        rows = batch.mask.nonzero().squeeze(1)
        if not rows.numel():
            continue
        images = batch.images[output][rows.to(batch.images[output].device)]
        predicted = classify(images).argmax(-1).cpu()
        correct += int((predicted == labels[batch.sample_ids[rows]]).sum())
        total += int(rows.numel())
    return 100.0 * correct / max(total, 1)


@torch.no_grad()
def labeled_accuracy(
    teacher: nn.Module,
    class_vectors: torch.Tensor,
    data: Union[str, Path],
    class_names: Union[str, Path, Sequence[str], None] = None,
    *,
    batch_size: int = 64,
    backend: str = "torch",
    workers: Optional[int] = 0,
) -> float:
    """Top-1 (percent) of ``teacher`` (a Teacher or TunedTeacher) with ``class_vectors`` (C, D) on
    a labeled folder, centre-cropped and resized bicubically as ``clipdistill eval`` does."""
    folder = scan_labeled_folder(data, class_names)
    if len(folder.class_names) != class_vectors.shape[0]:
        raise ValueError(f"{len(folder.class_names)} classes in {data} but {class_vectors.shape[0]} class vectors")
    size, mean, std = image_spec(teacher.model)
    device = teacher.model.logit_scale.device
    loader = ImageLoader(folder.samples, global_batch_size=batch_size, outputs=[OutputSpec("teacher", size, mean, std)],
                         transform=CenterCrop(), backend=backend, device=device, workers=workers,
                         interpolation="bicubic")
    scale = float(teacher.logit_scale)
    return _top1(lambda x: teacher.logits(x, class_vectors, scale), loader, torch.from_numpy(folder.labels), "teacher")


def _train(learner, params: list[torch.Tensor], loader, labels_all: torch.Tensor, settings: TuneSettings,
           loss_weights: Mapping[str, float], gpa_mean_epoch: float, *, device: torch.device,
           log: Callable[[str], None]) -> dict[str, float]:
    """The epochs: cross-entropy plus PromptSRC's weighted parts, through the engine's optimizer core;
    at the end of each epoch the prompts join the Gaussian aggregation, whose result is loaded last.

    Returns the mean loss parts of the last epoch.
    """
    steps_per_epoch = len(loader)
    core = OptimizerCore(
        make_optimizer(params, name="sgd", lr=settings.lr, momentum=settings.momentum,
                       weight_decay=settings.weight_decay),
        params, base_lr=settings.lr, total_steps=settings.epochs * steps_per_epoch,
        warmup_steps=settings.warmup_epochs * steps_per_epoch, warmup_lr=settings.warmup_lr, schedule="cosine",
    )
    aggregator = GaussianPromptAggregator(settings.epochs, mean=gpa_mean_epoch, std=settings.gpa_std)
    input_dtype = _input_dtype(learner.clip)
    losses: dict[str, float] = {}
    learner.train()
    bar = progress_bar(total=settings.epochs * steps_per_epoch, desc="tune-teacher", unit="step")
    for epoch in range(1, settings.epochs + 1):
        sums: dict[str, torch.Tensor] = {}
        batches = 0
        for batch in loader:
            bar.update()
            rows = batch.mask.nonzero().squeeze(1)  # the mask is on the CPU: no device sync
            if not rows.numel():
                core.skip()  # a step of padding only: the schedule still advances
                continue
            images = batch.images["teacher"][rows.to(device)].to(input_dtype)
            labels = labels_all[batch.sample_ids[rows]].to(device)
            output = learner(images)
            parts = {"ce": F.cross_entropy(output.logits.float(), labels)}
            for name, value in learner.regularization(images, output).items():
                if loss_weights.get(name, 0.0):
                    parts[name] = loss_weights[name] * value.float()
            loss = torch.stack(list(parts.values())).sum()
            core.backward(loss)
            parts["loss"] = loss
            for name, value in parts.items():
                sums[name] = sums[name] + value.detach() if name in sums else value.detach().clone()
            batches += 1
        # One synchronization per epoch: the mean losses, checked for NaN/Inf.
        losses = {name: float(value) / max(batches, 1) for name, value in sums.items()}
        if not all(np.isfinite(v) for v in losses.values()):
            raise RuntimeError(f"tune-teacher: non-finite loss in epoch {epoch} ({losses}); lower --lr")
        aggregator.add(learner.state_to_save(), epoch)
        log(f"tune-teacher: epoch {epoch}/{settings.epochs} "
            + " ".join(f"{k} {v:.4f}" for k, v in losses.items()))
    bar.close()
    learner.load_saved_state(aggregator.result())
    learner.eval()
    return losses


def _header(teacher: str, weights: Optional[str], weights_path: Optional[str], data, shots: ShotSelection,
            templates: list[str], options: Mapping[str, Any], settings: TuneSettings,
            loss_weights: Mapping[str, float], *, gpa_mean_epoch: float, precision: str,
            losses: Mapping[str, float]) -> dict:
    """The tuned-teacher file's JSON header: what :func:`load_tuned_teacher` needs, and provenance."""
    return {
        "teacher": {"name": teacher, "weights": weights_path, "init_seed": settings.seed if weights is None else None,
                    "weights_size": os.path.getsize(weights_path) if weights_path and os.path.isfile(weights_path)
                    else None},
        "learner": {"kind": LEARNER_KIND, "options": {k: v for k, v in options.items() if k != "templates"}},
        "class_names": shots.class_names,
        "folders": shots.folders,
        "templates": templates,
        "data": os.path.abspath(os.fspath(data)),
        "shots": {"per_class": shots.per_class, "skipped": shots.skipped, "short": shots.short,
                  "files": list(shots.samples.paths)},
        "settings": {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in asdict(settings).items()},
        "loss_weights": dict(loss_weights),
        "gpa_mean_epoch": gpa_mean_epoch,  # settings.gpa_mean x epochs (files before it: "gpa_mean", in epochs)
        "precision": precision,
        "losses": dict(losses),
        "versions": _versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


# About 55 lines of code under a 30-line docstring: one linear recipe (shots, learner, loader, the
# epochs in _train, the file via _header, the optional before/after check), each step a call.
def tune_teacher(
    teacher: str,
    weights: Optional[str],
    data: Union[str, Path],
    *,
    out: Union[str, Path],
    class_names: Union[str, Path, Sequence[str], None] = None,
    templates: Union[str, Sequence[str]] = "imagenet",
    learner_options: Optional[Mapping[str, Any]] = None,
    frozen_templates: Union[str, Sequence[str], None] = "imagenet_60",
    prompt_placement: str = "before_ln_pre",
    settings: TuneSettings = TuneSettings(),
    device: Union[str, torch.device] = "auto",
    precision: Optional[str] = None,
    eval_data: Union[str, Path, None] = None,
    log: Callable[[str], None] = print,
) -> TuneResult:
    """Prompt-tune ``teacher`` with PromptSRC on ``shots`` labeled images per class; save it to ``out``.

    Args:
        teacher, weights: the teacher's open_clip name and weights (tag, file or None).
        data: a labeled folder (one subfolder of images per class).
        out: the ``.safetensors`` file to write (read it back with :func:`load_tuned_teacher`).
        class_names: a class-name file, a list, or None (the folder names); see :func:`draw_shots`.
        templates: a shipped template set name, a file, or a list of templates: the zero-shot
            templates recorded with the teacher (and of the before/after check).
        frozen_templates: the templates of PromptSRC's frozen text target (its class features
            are regularized towards the frozen model's features averaged over them); the
            published 60-template set by default; None: ``templates``.
        prompt_placement: where the vision prompts join the image tokens ("before_ln_pre",
            the published placement, or "after_ln_pre").
        learner_options: PromptSRC's options (``n_text_ctx``, ``text_depth``, ``n_vision_ctx``,
            ``vision_depth``, ``init_words``).
        settings: shots, seed and optimization (:class:`TuneSettings`).
        device: "auto", "cpu", "cuda", "cuda:1", ...
        precision: the backbone's open_clip precision (None: bf16 on a GPU, fp32 on the CPU).
        eval_data: an optional held-out labeled folder with the same classes: top-1 before
            (zero-shot with ``templates``) and after tuning (the saved file, loaded back).

    Returns:
        a :class:`TuneResult`.
    """
    started = time.perf_counter()
    settings.check()
    loss_weights = _loss_weights(settings)
    if Path(out).suffix != ".safetensors":
        raise TuneTeacherInputError(f"--out {str(out)!r}: the tuned teacher is a .safetensors file; name it so")
    template_list = read_templates(templates) if isinstance(templates, (str, Path)) else list(templates)
    frozen_list = (template_list if frozen_templates is None else read_templates(frozen_templates)
                   if isinstance(frozen_templates, (str, Path)) else list(frozen_templates))
    shots = draw_shots(data, class_names, settings.shots, settings.seed, settings.on_short_class)
    if shots.short:
        what = {"use-all": "training on all their images", "skip": "leaving them out"}[settings.on_short_class]
        log(f"tune-teacher: {len(shots.short)} class(es) have fewer than {settings.shots} images, {what}: "
            + ", ".join(f"{n} ({c})" for n, c in list(shots.short.items())[:8]))
    device = resolve_device(str(device))
    precision = precision or _default_precision(device)
    weights_path = os.path.abspath(weights) if weights is not None and os.path.isfile(weights) else weights

    # A random-init teacher (weights None, tests and demos) is rebuilt at load time from this seed.
    torch.manual_seed(settings.seed)
    clip = load_clip(teacher, weights_path, device=device, precision=precision)
    options = _learner_options(clip, learner_options, frozen_list)
    learner = build_learner(LEARNER_KIND, clip, tokenizer=get_tokenizer(teacher), class_names=shots.class_names,
                            prompt_placement=prompt_placement, **options).to(device)
    params = list(learner.trainable_parameters().values())
    if not params:
        raise TuneTeacherInputError("the PromptSRC learner has nothing to train (prompt lengths or depths are 0)")
    log(f"tune-teacher: {teacher} ({weights}), {len(shots.class_names)} classes x {settings.shots} shots "
        f"= {len(shots.labels)} images, {sum(p.numel() for p in params)} prompt parameters, device {device}")

    size, mean, std = image_spec(clip)
    backend = settings.backend
    if backend == "auto" and device.type == "cpu":
        backend = "torch"
    loader = ImageLoader(
        shots.samples, global_batch_size=settings.batch_size, outputs=[OutputSpec("teacher", size, mean, std)],
        transform=RandomResizedCrop(scale=(settings.min_scale, 1.0)), seed=settings.seed, backend=backend,
        device=device, workers=settings.workers, interpolation=settings.interpolation,
    )
    gpa_mean_epoch = settings.gpa_mean * settings.epochs
    losses = _train(learner, params, loader, torch.from_numpy(shots.labels), settings, loss_weights, gpa_mean_epoch,
                    device=device, log=log)

    header = _header(teacher, weights, weights_path, data, shots, template_list, options, settings, loss_weights,
                     gpa_mean_epoch=gpa_mean_epoch, precision=precision, losses=losses)
    header["learner"]["prompt_placement"] = prompt_placement
    header["frozen_templates"] = frozen_list
    path = save_tuned_teacher(out, learner.state_to_save(), header)
    log(f"tune-teacher: saved {path}")

    evaluation = None
    if eval_data is not None:
        evaluation = _before_after(learner, path, eval_data, shots.class_names, device=device, precision=precision,
                                   log=log)
    return TuneResult(str(path), shots.class_names, shots.per_class, shots.skipped, shots.short, losses,
                      round(time.perf_counter() - started, 2), evaluation, TunedTeacher(learner, header, str(path)))


def _before_after(learner, path: Path, eval_data, class_names: Sequence[str], *, device, precision, log) -> dict:
    """Top-1 on a held-out labeled folder: zero-shot (templates) vs. the saved tuned teacher."""

    frozen_vectors = learner.frozen.get(learner.clip, None)
    before = labeled_accuracy(Teacher(learner.clip), frozen_vectors, eval_data, class_names)
    tuned = load_tuned_teacher(path, device=device, precision=precision)
    after = labeled_accuracy(tuned, tuned.class_vectors(), eval_data, class_names)
    log(f"tune-teacher: top-1 on {eval_data}: zero-shot {before:.2f}%, tuned {after:.2f}%")
    return {"data": str(eval_data), "zero_shot_top1": before, "tuned_top1": after}


