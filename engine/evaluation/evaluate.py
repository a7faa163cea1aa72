"""Evaluation: zero-shot top-1, base-to-novel, cross-dataset, teacher-student agreement, model selection.

    clipdistill eval --data FOLDER [--data FOLDER ...] [--class-names FILE ...] [--templates SPEC ...]
                     [--checkpoint CHECKPOINT_OR_EXPORT] [--teacher NAME --teacher-weights W]
                     [--student NAME --student-weights W] [--base-to-novel] [--unlabeled SOURCE]
                     [--out report.json]

Models compared (each is optional but at least one is needed):

- ``teacher``: the frozen teacher, zero-shot: its class vectors of the names and templates;
- ``student_zero_shot``: the student CLIP without prompts, zero-shot with the same templates;
- ``student_distilled``: the distilled student, from a training checkpoint or an export file
  (:mod:`clipdistill.engine.export`). Its learned prompts (shared contexts, vision prompts,
  PromptKD's projector) do not depend on the class names, so the same student is evaluated
  on any dataset's names; PromptKD's logits are against the teacher's class vectors of
  those names (from the export file when names and templates are the ones it holds).

Protocols (see shared/PAPERS.md):

- A *labeled folder* has one subfolder of images per class. Class names come from a file
  (one name per line, in label order; a line ``folder<TAB>name`` maps a folder to a name;
  a plain name matches the folder of that name, spaces written as spaces or underscores),
  or from the folder names (sorted, underscores read as spaces). A class without images,
  a name without a folder and a folder without a name are refused.
- *Top-1*: the fraction of images whose highest logit is their class (ties: the first
  class), in percent. Images are center-cropped (the whole shorter side) and resized with
  bicubic interpolation to each model's input size and normalized with its mean and std.
- *Base-to-novel* (CoOp/CoCoOp/KDPL/PromptKD): the first ceil(C/2) classes in name order are
  *base*, the rest *novel*; each half is evaluated among its own classes only (its images,
  its columns of the logits), and HM = 2·base·novel / (base + novel).
- *Cross-dataset*: one student on several labeled folders, one table, and the average.
- *Out-of-distribution domains* (``--domains``, :mod:`.domains`): the folders of one dataset's
  domains, with one class list, on this machinery; optionally after few-shot fine-tuning.
- *Agreement and KL on unlabeled images*: the fraction of images where teacher and student
  pick the same class (percent) and the mean KL(p_teacher‖p_student) in nats. The
  teacher's logits use the recipe's scale: the student's logit scale for KDPL (as KDPL
  trains), the teacher's own for PromptKD and when no distilled student is given.

Model selection (:func:`heldout_agreement_kl`) never sees a label: the training loop holds
out part of the unlabeled images (:func:`holdout_split`) and keeps the checkpoint with the
lowest held-out KL (or highest agreement, :func:`is_better`); without a held-out set, the
last checkpoint.
"""
from __future__ import annotations

import difflib
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from clipdistill.engine.datafree.student import KIND as DATAFREE_KIND
from clipdistill.engine.datafree.student import module_device, timm_image_spec
from clipdistill.engine.datafree.synthesize import load_teacher
from clipdistill.engine.distill.metrics import AgreementTally, TopOneTally, base_novel_split
from clipdistill.engine.distill.step import TEACHER_SPACE_RECIPES
from clipdistill.engine.evaluation.export import (TEACHER_SPACE_KINDS, ExportError, StudentClassifier, build_backbone,
                                                  distilled_teacher_vectors, fresh_samples,
                                                  load_distilled_from_teacher, read_distilled, rebuild_learner,
                                                  student_class_vectors, teacher_class_vectors_for, versions)
from clipdistill.engine.io import image_spec, read_class_names, read_templates
from clipdistill.engine.models.class_vectors import encode_class_names
from clipdistill.engine.models.clip import build_student, build_teacher, get_tokenizer
from clipdistill.engine.progress import progress_bar
from clipdistill.loaders.loader import ImageLoader, OutputSpec
from clipdistill.loaders.sources import SampleList, scan_folder
from clipdistill.loaders.views import CenterCrop, counter_hash

REPORT_FORMAT = "clipdistill-eval/1"
MODEL_LABELS = {"teacher": "teacher", "student_zero_shot": "zero-shot student",
                "student_distilled": "distilled student", "student_few_shot": "few-shot student"}


class EvalInputError(ValueError):
    """A labeled folder, class names or models that cannot be evaluated as asked."""


# ------------------------------------------------------------------------------ labeled folders


@dataclass
class LabeledFolder:
    """A folder of class subfolders, as samples and labels.

    ``samples`` is a :class:`clipdistill.loaders.sources.SampleList` (ids in sorted path order);
    ``labels`` (N,) int64 gives each sample's index into ``class_names``.
    """

    root: str
    class_names: list[str]
    folders: list[str]
    samples: Any
    labels: np.ndarray

    @property
    def name(self) -> str:
        return os.path.basename(os.path.normpath(self.root))


def read_class_list(path: Union[str, Path]) -> list[tuple[Optional[str], str]]:
    """(folder or None, name) per line of a class-name file; ``folder<TAB>name`` lines map a folder."""
    entries, seen = [], {}
    for line in read_class_names(path):
        folder, name = (part.strip() for part in line.split("\t", 1)) if "\t" in line else (None, line)
        if not name:
            raise EvalInputError(f"{path}: the line for folder {folder!r} has no class name")
        if name in seen:
            raise EvalInputError(f"{path}: class name {name!r} appears twice")
        seen[name] = True
        entries.append((folder, name))
    return entries


def scan_labeled_folder(
    root: Union[str, Path], class_names: Union[str, Path, Sequence[str], None] = None
) -> LabeledFolder:
    """Scan ``root``'s class subfolders; labels follow the order of ``class_names``.

    Args:
        class_names: a class-name file (see the module docstring), a list of names, or None
            (the sorted folder names, underscores read as spaces).

    Raises:
        EvalInputError: a class without images, a name without a folder, a folder without a name.
        FileNotFoundError: ``root`` is not a folder.
    """
    root = os.path.abspath(os.fspath(root))
    if not os.path.isdir(root):
        raise FileNotFoundError(f"labeled folder {root!r} does not exist")
    folders = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not folders:
        raise EvalInputError(f"{root} has no class subfolders (expected one folder of images per class)")
    if class_names is None:
        entries = [(folder, folder.replace("_", " ")) for folder in folders]
    elif isinstance(class_names, (str, Path)):
        entries = read_class_list(class_names)
    else:
        entries = [(None, str(name)) for name in class_names]

    available = set(folders)
    mapping: list[tuple[str, str]] = []
    missing = []
    for folder, name in entries:
        candidates = [folder] if folder is not None else [name, name.replace(" ", "_")]
        found = next((c for c in candidates if c in available), None)
        if found is None:
            missing.append((folder or name, name))
        else:
            mapping.append((found, name))
    used = {f for f, _ in mapping}
    unnamed = [f for f in folders if f not in used]
    if missing or unnamed:
        problems = []
        for folder, name in missing[:5]:
            near = difflib.get_close_matches(folder, unnamed, n=1, cutoff=0.6)
            hint = f" (folder {near[0]!r}?)" if near else ""
            problems.append(f"class {name!r} has no folder {folder!r}{hint}")
        problems += [f"folder {f!r} has no class name" for f in unnamed[:5]]
        more = len(missing) + len(unnamed) - len(problems)
        raise EvalInputError(
            f"the class names do not match the folders of {root}: " + "; ".join(problems)
            + (f"; and {more} more" if more > 0 else "")
            + ". Give one name per class folder (a 'folder<TAB>name' line maps a folder to another name)."
        )
    paths, labels, empty = [], [], []
    for label, (folder, _) in enumerate(mapping):
        found = scan_folder(os.path.join(root, folder))
        if not found:
            empty.append(folder)
        paths += [f"{folder}/{rel}" for rel in found]
        labels += [label] * len(found)
    if empty:
        raise EvalInputError(
            f"{root}: class folder(s) {empty[:5]} hold no images"
            + (f" (and {len(empty) - 5} more)" if len(empty) > 5 else "")
            + "; an empty class would make its accuracy undefined. Add images or drop the class (its folder and name)."
        )
    return LabeledFolder(root, [n for _, n in mapping], [f for f, _ in mapping],
                         SampleList(root=root, paths=paths), np.asarray(labels, dtype=np.int64))


# ------------------------------------------------------------------------------ classifiers


@dataclass
class Classifier:
    """A model that scores images against a fixed list of classes.

    ``logits``: images (B, 3, S, S) from the loader output named ``input`` -> (B, C) float32.
    ``module``: the module behind ``logits`` when there is one (a distilled student's
    :class:`~clipdistill.engine.export.StudentClassifier`), for a caller that copies it.
    """

    name: str
    input: str
    logits: Callable[[torch.Tensor], torch.Tensor]
    module: Optional[torch.nn.Module] = None


def teacher_classifier(teacher, class_vectors: torch.Tensor, *, logit_scale: Optional[float] = None,
                       input: str = "teacher") -> Classifier:
    """The frozen teacher's zero-shot logits: scale · n(f_t) V_tᵀ (scale: the teacher's own by default)."""
    scale = float(teacher.logit_scale if logit_scale is None else logit_scale)
    vectors = class_vectors.float()

    @torch.no_grad()
    def logits(images: torch.Tensor) -> torch.Tensor:
        return teacher.logits(images, vectors, scale)

    return Classifier("teacher", input, logits)


def zero_shot_classifier(clip, class_vectors: torch.Tensor, *, name: str = "student_zero_shot",
                         input: str = "student") -> Classifier:
    """A CLIP without prompts, zero-shot: its logit scale · n(f) Vᵀ."""
    vectors = class_vectors.float()

    @torch.no_grad()
    def logits(images: torch.Tensor) -> torch.Tensor:
        features = F.normalize(clip.encode_image(images).float(), dim=-1)
        return float(clip.logit_scale.exp()) * features @ vectors.t()

    return Classifier(name, input, logits)


def module_classifier(module: Callable[[torch.Tensor], torch.Tensor], *, name: str = "student_distilled",
                      input: str = "student") -> Classifier:
    return Classifier(name, input, lambda images: module(images).float(), module)


# ------------------------------------------------------------------------------ running over images


@dataclass(frozen=True)
class LoaderSettings:
    """How evaluation reads images: batch size, loader backend, device, decoding workers, and
    where scanned lists of tar shards are kept."""

    batch_size: int = 64
    backend: str = "torch"
    device: Union[str, torch.device] = "cpu"
    workers: Optional[int] = None
    cache_dir: Optional[str] = None


def _batches(samples, outputs, rejected: list, settings: LoaderSettings):
    """(sample ids (R,), {output name: images (R, 3, S, S)}) of the real rows of each batch, one epoch,
    center-cropped; the locations of unreadable images are appended to ``rejected``."""
    loader = ImageLoader(samples, global_batch_size=settings.batch_size, outputs=list(outputs),
                         transform=CenterCrop(), backend=settings.backend, device=settings.device,
                         workers=settings.workers, interpolation="bicubic", cache_dir=settings.cache_dir)
    for batch in progress_bar(loader, total=len(loader), desc="eval", unit="batch", leave=False):
        rejected += [r.location for r in batch.rejects]
        rows = batch.mask.nonzero().squeeze(1)
        if rows.numel():
            yield batch.sample_ids[rows], {k: v[rows.to(v.device)] for k, v in batch.images.items()}


@torch.no_grad()
def evaluate_labeled(
    folder: LabeledFolder,
    classifiers: Sequence[Classifier],
    outputs: Sequence,
    *,
    base_to_novel: bool = False,
    settings: LoaderSettings = LoaderSettings(),
) -> dict[str, Any]:
    """Top-1 (and base/novel/HM) of each classifier on a labeled folder.

    ``outputs``: the loader's :class:`~clipdistill.loaders.loader.OutputSpec` list; each
    classifier reads the one named by its ``input``. Unreadable images are left out and
    listed under ``rejected``.
    """
    tallies = {c.name: TopOneTally(len(folder.class_names), base_to_novel) for c in classifiers}
    labels_all = torch.from_numpy(folder.labels)
    rejected: list[str] = []
    for sample_ids, images in _batches(folder.samples, outputs, rejected, settings):
        labels = labels_all[sample_ids]
        for c in classifiers:
            tallies[c.name].update(c.logits(images[c.input]), labels)
    results = {name: tally.result() for name, tally in tallies.items()}
    return {"results": results, "rejected": rejected}


@torch.no_grad()
def evaluate_agreement(
    samples,
    teacher: Classifier,
    students: Sequence[Classifier],
    outputs: Sequence,
    settings: LoaderSettings = LoaderSettings(),
) -> dict[str, Any]:
    """Agreement (percent) and KL(p_t‖p_s) (nats) of each student with the teacher on unlabeled images."""
    tallies = {s.name: AgreementTally() for s in students}
    rejected: list[str] = []
    for _, images in _batches(samples, outputs, rejected, settings):
        teacher_logits = teacher.logits(images[teacher.input])
        for s in students:
            tallies[s.name].update(teacher_logits, s.logits(images[s.input]))
    return {"results": {name: tally.result() for name, tally in tallies.items()}, "rejected": rejected}


# ------------------------------------------------------------------------------ model selection


SELECTION_METRICS = {"kl": "min", "agreement": "max"}


def is_better(metric: str, candidate: float, best: Optional[float]) -> bool:
    """Whether ``candidate`` beats ``best`` on a selection metric (KL: lower; agreement: higher)."""
    if metric not in SELECTION_METRICS:
        raise ValueError(f"selection metric must be one of {sorted(SELECTION_METRICS)}, got {metric!r}")
    if not math.isfinite(candidate):
        return False
    if best is None or not math.isfinite(best):
        return True
    return candidate < best if SELECTION_METRICS[metric] == "min" else candidate > best


def holdout_split(samples, fraction: float, seed: int = 0):
    """Split a SampleList into (train, held-out): a fixed ``fraction`` of the samples, chosen by
    a hash of (seed, sample id), each part in its original order. Deterministic everywhere."""
    n = len(samples)
    if not 0 < fraction < 1:
        raise ValueError(f"held-out fraction must be in (0, 1), got {fraction}")
    n_heldout = max(1, int(round(fraction * n)))
    if n_heldout >= n:
        raise ValueError(f"holding out {n_heldout} of {n} images leaves none to train on")
    keys = counter_hash(int(seed), 0x40D, np.arange(n, dtype=np.int64))
    chosen = np.zeros(n, dtype=bool)
    chosen[np.argsort(keys, kind="stable")[:n_heldout]] = True
    return samples.subset(np.flatnonzero(~chosen)), samples.subset(np.flatnonzero(chosen))


@torch.no_grad()
def heldout_agreement_kl(
    step,
    batches: Iterable,
    *,
    teacher_input: Optional[str] = None,
    student_input: Optional[str] = None,
    autocast_dtype: Optional[torch.dtype] = None,
    max_batches: Optional[int] = None,
    all_reduce: bool = False,
) -> dict[str, float]:
    """Teacher-student top-1 agreement (percent) and KL(p_t‖p_s) (nats) on held-out unlabeled images.

    For model selection inside training: no label is read. The logits are those the
    recipe distills: the student's own (PromptKD: against the teacher's class vectors),
    and the teacher's with the student's logit scale (KDPL) or its own (PromptKD). The
    step runs in eval mode (batch-norm statistics frozen) and gets its mode back after.

    Args:
        step: a :class:`~clipdistill.engine.step.DistillStep` (teacher, student, class vectors, recipe).
        batches: loader :class:`~clipdistill.loaders.loader.Batch` es (padding rows, ``mask`` False,
            are skipped), or tensors (B, 3, S, S) shown to both, or (teacher_images, student_images) pairs.
        teacher_input, student_input: names in ``Batch.images``; default ``"teacher"`` when present
            (else the student's) and ``"student"`` when present (else the only one).
        autocast_dtype: e.g. torch.bfloat16 to run as the training step does.
        max_batches: stop after this many batches.
        all_reduce: ``batches`` are this rank's share of a distributed run's: every rank calls
            this on its own share and gets the totals over all ranks. Loader batches then go
            through the models whole, padding included (a ZeRO-3 teacher is a collective, so no
            rank may skip a batch), and the padding rows are left out of the tally.

    Returns:
        ``{"agreement": percent, "kl": nats per image, "images": count}``.
    """
    promptkd = step.student.scores_against_teacher
    teacher_scale = step.teacher_logit_scale if step.recipe in TEACHER_SPACE_RECIPES else step.student_logit_scale
    vectors = step.teacher_class_vectors
    was_training = step.training
    step.train(False)
    tally = AgreementTally()
    try:
        for index, batch in enumerate(batches):
            if max_batches is not None and index >= max_batches:
                break
            mask = None  # every row counts
            if hasattr(batch, "images"):
                images = batch.images
                s_key = student_input or ("student" if "student" in images else next(iter(images)))
                t_key = teacher_input or ("teacher" if "teacher" in images else s_key)
                if all_reduce:
                    t_images, s_images, mask = images[t_key], images[s_key], batch.mask
                else:
                    rows = batch.mask.nonzero().squeeze(1)
                    if rows.numel() == 0:
                        continue
                    t_images = images[t_key][rows.to(images[t_key].device)]
                    s_images = images[s_key][rows.to(images[s_key].device)]
            elif isinstance(batch, (tuple, list)):
                t_images, s_images = batch
            else:
                t_images = s_images = batch
            device = t_images.device
            with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
                teacher_features = F.normalize(step.teacher.encode_image(t_images).float(), dim=-1)
                teacher_logits = teacher_scale * teacher_features @ vectors.float().t()
                output = step.student(s_images, vectors) if promptkd else step.student(s_images)
            tally.update(teacher_logits.float(), output.logits.float(), mask)
        if all_reduce:
            tally.all_reduce(vectors.device)
    finally:
        step.train(was_training)
    return tally.result()


# ------------------------------------------------------------------------------ the evaluation run


def distilled_classifier(distilled, clip, class_names: Sequence[str], templates: Sequence[str], *,
                         teacher=None, cache_dir: Optional[str] = None):
    """A :class:`~clipdistill.engine.export.StudentClassifier` of a distilled student for these names.

    PromptKD takes the teacher's class vectors from the export file when it holds exactly
    these names and templates, else from ``teacher`` (refused without one).
    """
    names, templates = list(class_names), list(templates)
    if distilled.learner_kind in TEACHER_SPACE_KINDS:
        stored = (distilled.class_vectors is not None and distilled.class_vectors_space == "teacher"
                  and distilled.class_names == names and distilled.templates == templates)
        if stored:
            vectors = distilled.class_vectors
        elif teacher is not None or distilled.teacher_vector_names == names:
            vectors = distilled_teacher_vectors(distilled, names, templates, model=teacher,
                                                device=module_device(clip), cache_dir=cache_dir)
        else:
            raise EvalInputError(
                f"the {distilled.learner_kind} student {distilled.path} scores images against the teacher's class "
                f"vectors, and "
                f"it holds none for these {len(names)} names and templates: evaluate with its teacher "
                f"({distilled.teacher.get('name')!r}), or export for these names first"
            )
        learner = rebuild_learner(distilled, clip, class_names=names, templates=templates,
                                teacher_dim=int(vectors.shape[1]))
    else:
        learner = rebuild_learner(distilled, clip, class_names=names, templates=templates)
        vectors = student_class_vectors(learner)
    return StudentClassifier(learner, vectors, names)


@dataclass
class Dataset:
    """One labeled folder to evaluate, with its class names (file or None) and templates."""

    folder: str
    class_names: Optional[str] = None
    templates: Optional[str] = None


def run_evaluation(
    datasets: Sequence[Dataset],
    *,
    distilled: Optional[str] = None,
    teacher: Optional[dict] = None,
    student: Optional[dict] = None,
    use_teacher: bool = True,
    base_to_novel: bool = False,
    unlabeled: Optional[str] = None,
    unlabeled_class_names: Optional[str] = None,
    default_templates: Optional[str] = None,
    settings: LoaderSettings = LoaderSettings(),
    class_vector_cache: Optional[str] = None,
    log: Callable[[str], None] = lambda message: None,
) -> dict[str, Any]:
    """Evaluate teacher, zero-shot student and distilled student; return the report (see module docstring).

    Args:
        distilled: a training checkpoint or an export file (optional).
        teacher, student: ``{"name", "weights"}``; default: those the distilled student records.
            A ``student`` other than the distilled student's architecture is refused.
        use_teacher: False leaves the teacher out (no agreement, no PromptKD on new names).
        unlabeled: an image source (folder, list file, shards) for agreement and KL; its classes are
            ``unlabeled_class_names`` (a file), else the first dataset's, else the distilled student's.
        default_templates: templates for datasets that name none; default the distilled student's,
            else "imagenet" ("a photo of a {}.").
        settings: how images are read (the models run on ``settings.device``).
        class_vector_cache: a folder caching the teacher's class vectors.
    """
    device = torch.device(settings.device)
    if not datasets and not unlabeled:
        raise EvalInputError("nothing to evaluate: give labeled folders (--data) and/or unlabeled images (--unlabeled)")
    # Folders and names are checked before any model is loaded: a mistake there costs nothing.
    folders = [(scan_labeled_folder(d.folder, d.class_names), d) for d in datasets]
    spec = read_distilled(distilled) if distilled else None
    teacher, student = _models_to_load(spec, teacher, student, use_teacher=use_teacher,
                                       unlabeled=bool(unlabeled))
    models = _load_models(spec, teacher, student, device=device, class_vector_cache=class_vector_cache, log=log)
    report = _report_header(models, settings, base_to_novel)
    first: Optional[tuple[list[str], list[str]]] = None  # the first dataset's names and templates
    for folder, dataset in folders:
        templates = _templates_for(dataset.templates, default_templates, spec)
        first = first or (folder.class_names, templates)
        report["datasets"].append(_evaluate_dataset(folder, templates, models, settings, base_to_novel, log))
    if len(report["datasets"]) > 1:
        report["cross_dataset"] = _cross_dataset_average(report["datasets"], base_to_novel)
    if unlabeled:
        if unlabeled_class_names:
            names, templates = read_class_names(unlabeled_class_names), _templates_for(None, default_templates, spec)
        elif first is not None:
            names, templates = first
        elif spec is not None and spec.class_names:
            names, templates = spec.class_names, _templates_for(None, default_templates, spec)
        else:
            raise EvalInputError("agreement on unlabeled images needs class names (--unlabeled-class-names)")
        report["unlabeled"] = _evaluate_unlabeled(unlabeled, names, templates, models, settings)
    return report


def _models_to_load(spec, teacher: Optional[dict], student: Optional[dict], *, use_teacher: bool,
                    unlabeled: bool) -> tuple[Optional[dict], dict]:
    """The teacher (None when left out) and the student to load, each ``{"name", "weights"}``.

    What is not given comes from the distilled student's records (``spec``). Everything here is
    checked before a model loads, so that a mistake costs nothing.
    """
    teacher = dict(teacher or {})
    student = dict(student or {})
    if spec is not None:
        teacher.setdefault("name", spec.teacher.get("name"))
        if teacher.get("name") == spec.teacher.get("name") and teacher.get("weights") is None:
            teacher["weights"] = spec.teacher.get("weights")
            # the teacher row is the teacher that was distilled from: the tuned one, when it was
            teacher["prompts"] = spec.teacher.get("prompts")
        if spec.learner_kind in TEACHER_SPACE_KINDS and use_teacher and teacher["name"] != spec.teacher.get("name"):
            raise EvalInputError(
                f"the {spec.learner_kind} student {spec.path} was distilled from teacher "
                f"{spec.teacher.get('name')!r} and scores "
                f"images against that teacher's class vectors; teacher {teacher['name']!r} was given"
            )
    if use_teacher and teacher.get("weights") and not teacher.get("name"):
        raise EvalInputError(f"--teacher-weights {teacher['weights']} names no teacher: give --teacher")
    if use_teacher and not teacher.get("name"):
        use_teacher = False
    if spec is None and not student.get("name") and not use_teacher:
        raise EvalInputError("no model to evaluate: name a teacher, a student, or a distilled student")
    if unlabeled and not use_teacher:
        raise EvalInputError("agreement and KL on unlabeled images need the teacher (--teacher)")
    return (teacher if use_teacher else None), student


@dataclass
class _LoadedModels:
    """The models of one evaluation, loaded once and scored against each dataset's class names.

    ``outputs`` are the loader outputs the models read: one per distinct preprocessing (size,
    mean, std), so that models that preprocess alike read the same decoded images.
    """

    device: torch.device
    spec: Any  # the distilled student (read_distilled), or None
    teacher: Optional[dict]  # {"name", "weights"} of the teacher, or None
    student: dict  # {"name", "weights"} of the student backbone
    class_vector_cache: Optional[str] = None
    teacher_model: Any = None  # a frozen Teacher
    teacher_input: str = "teacher"
    teacher_scale: Optional[float] = None  # None: the teacher's own logit scale
    clip: Any = None  # the student CLIP (zero-shot, and under the distilled prompts)
    distilled_backbone: Any = None  # what the distilled student is rebuilt over: that CLIP, or the data-free timm net
    student_input: str = "student"
    tokenizer: Any = None
    outputs: list = field(default_factory=list)

    def classifiers(self, names: list[str], templates: list[str]) -> list[Classifier]:
        """The teacher's, the zero-shot student's and the distilled student's classifiers for these names."""
        out = []
        if self.teacher_model is not None:
            if self.spec is not None and all(self.teacher.get(key) == self.spec.teacher.get(key)
                                             for key in ("name", "weights", "prompts")):
                # the teacher the run distilled from: its stored vectors (or that teacher's)
                vectors = distilled_teacher_vectors(self.spec, names, templates, model=self.teacher_model,
                                                    device=self.device, cache_dir=self.class_vector_cache)
            else:
                vectors = teacher_class_vectors_for(self.teacher, names, templates, model=self.teacher_model,
                                                    device=self.device, cache_dir=self.class_vector_cache)
            out.append(teacher_classifier(self.teacher_model, vectors, logit_scale=self.teacher_scale,
                                          input=self.teacher_input))
        if self.clip is not None:
            vectors = encode_class_names(self.clip.encode_text, self.tokenizer, names, templates, device=self.device)
            out.append(zero_shot_classifier(self.clip, vectors, input=self.student_input))
        if self.spec is not None:
            module = distilled_classifier(self.spec, self.distilled_backbone, names, templates,
                                          teacher=self.teacher_model, cache_dir=self.class_vector_cache)
            out.append(module_classifier(module, input=self.student_input))
        return out


def _load_models(spec, teacher: Optional[dict], student: dict, *, device: torch.device,
                 class_vector_cache: Optional[str], log: Callable[[str], None]) -> _LoadedModels:
    """Load the teacher (when given), the student backbone (the distilled student's, or ``student``)."""
    models = _LoadedModels(device=device, spec=spec, teacher=teacher, student=student,
                           class_vector_cache=class_vector_cache)
    outputs: dict[tuple, str] = {}  # (size, mean, std) -> loader output name

    def output_for(clip_model, preferred: str) -> str:
        return outputs.setdefault(image_spec(clip_model), preferred)

    if teacher is not None and teacher.get("prompts"):
        try:
            models.teacher_model = load_distilled_from_teacher(spec, device=device)
        except ExportError as exc:
            raise EvalInputError(f"{exc}; or evaluate without the teacher row") from exc
        models.teacher_input = output_for(models.teacher_model.model, "teacher")
        log(f"clipdistill eval: teacher {teacher['name']} tuned ({teacher['prompts']})")
    elif teacher is not None:
        # a data-free run's random-init teacher (smoke tests) is the seeded one its synthetic set was made with
        build = load_teacher if spec is not None and spec.method == "datafree" else build_teacher
        models.teacher_model = build(teacher["name"], teacher.get("weights"), device=device)
        models.teacher_input = output_for(models.teacher_model.model, "teacher")
        log(f"clipdistill eval: teacher {teacher['name']} ({teacher.get('weights')})")
    if spec is not None and spec.learner_kind == DATAFREE_KIND:
        # a timm network, no CLIP: no zero-shot row; its own preprocessing
        models.distilled_backbone = build_backbone(spec, device=device, expect_student=student.get("name"))
        models.student = {"name": spec.student_name, "weights": None}
        models.student_input = outputs.setdefault(
            timm_image_spec(models.distilled_backbone, spec.learner_options.get("image_size")), "student")
        log(f"clipdistill eval: data-free student {spec.student_name} from {spec.path}")
    elif spec is not None:
        models.clip = build_backbone(spec, device=device, expect_student=student.get("name"),
                                     student_weights=student.get("weights"))
        models.student = {"name": spec.student_name, "weights": student.get("weights") or spec.student.get("weights")}
    elif student.get("name"):
        models.clip = build_student(student["name"], student.get("weights"), device=device)
    if models.distilled_backbone is None:
        models.distilled_backbone = models.clip
    if models.clip is not None:
        models.student_input = output_for(models.clip, "student")
        models.tokenizer = get_tokenizer(models.student["name"])
        log(f"clipdistill eval: student {models.student['name']} ({models.student.get('weights')})"
            + (f", distilled {spec.learner_kind} from {spec.path}" if spec is not None else ""))
    models.outputs = [OutputSpec(name, size, tuple(mean), tuple(std)) for (size, mean, std), name in outputs.items()]
    method = spec.method if spec is not None else None
    if models.teacher_model is not None and method == "kdpl" and models.clip is not None:
        models.teacher_scale = float(models.clip.logit_scale.exp())  # KDPL scores the teacher with the student's scale
    return models


def _templates_for(given: Optional[str], default_templates: Optional[str], spec) -> list[str]:
    """A dataset's templates: its own, else ``default_templates``, else the distilled student's, else "imagenet"."""
    if given is None and default_templates is None and spec is not None and spec.templates:
        return list(spec.templates)
    return read_templates(given or default_templates or "imagenet")


def _report_header(models: _LoadedModels, settings: LoaderSettings, base_to_novel: bool) -> dict[str, Any]:
    """The report before any image is read: format, units, the models compared, settings, versions."""
    report: dict[str, Any] = {
        "format": REPORT_FORMAT,
        "units": {"top1": "percent", "base": "percent", "novel": "percent", "hm": "percent",
                  "agreement": "percent", "kl": "nats per image, KL(teacher||student)"},
        "models": {},
        "datasets": [],
        "settings": {"batch_size": settings.batch_size, "backend": settings.backend, "device": str(models.device),
                     "base_to_novel": base_to_novel, "preprocess": "center crop (shorter side), bicubic"},
        "versions": versions(),
    }
    if models.teacher_model is not None:
        report["models"]["teacher"] = {"name": models.teacher["name"], "weights": models.teacher.get("weights"),
                                       "prompts": models.teacher.get("prompts"),
                                       "logit_scale": float(models.teacher_scale or models.teacher_model.logit_scale)}
    if models.clip is not None:
        report["models"]["student_zero_shot"] = {"name": models.student["name"],
                                                 "weights": models.student.get("weights")}
    spec = models.spec
    if spec is not None:
        report["models"]["student_distilled"] = {"path": spec.path, "source": spec.source, "method": spec.method,
                                                 "learner": spec.learner_kind, "options": spec.learner_options,
                                                 "step": spec.step}
    return report


def _evaluate_dataset(folder: LabeledFolder, templates: list[str], models: _LoadedModels, settings: LoaderSettings,
                      base_to_novel: bool, log: Callable[[str], None],
                      classifiers: Optional[list[Classifier]] = None) -> dict[str, Any]:
    """The report's entry for one labeled folder: top-1 of every model (and base/novel/HM).

    ``classifiers``: made for ``folder.class_names`` already (folders that share their names, the
    domains of :mod:`.domains`, share them); None: made here."""
    log(f"clipdistill eval: {folder.name}: {len(folder.class_names)} classes, {len(folder.samples)} images")
    if classifiers is None:
        classifiers = models.classifiers(folder.class_names, templates)
    result = evaluate_labeled(folder, classifiers, models.outputs, base_to_novel=base_to_novel, settings=settings)
    entry: dict[str, Any] = {
        "name": folder.name, "folder": folder.root, "classes": len(folder.class_names),
        "images": len(folder.samples) - len(result["rejected"]), "rejected": result["rejected"],
        "templates": templates,
        "top1": {name: r["top1"] for name, r in result["results"].items()},
    }
    if base_to_novel:
        base, novel = base_novel_split(len(folder.class_names))
        entry["base_to_novel"] = {
            "base_classes": [folder.class_names[i] for i in base],
            "novel_classes": [folder.class_names[i] for i in novel],
            **{name: {"base": r["base"], "novel": r["novel"], "hm": r["hm"], "base_images": r["base_images"],
                      "novel_images": r["novel_images"]} for name, r in result["results"].items()},
        }
    return entry


def _cross_dataset_average(entries: list[dict], base_to_novel: bool) -> dict[str, Any]:
    """The mean over datasets of each model's top-1 (and base/novel/HM): the cross-dataset table's last row."""
    models = list(entries[0]["top1"])
    cross: dict[str, Any] = {
        "datasets": [d["name"] for d in entries],
        "average": {m: float(np.mean([d["top1"][m] for d in entries])) for m in models},
    }
    if base_to_novel:
        cross["base_to_novel_average"] = {
            m: {k: float(np.mean([d["base_to_novel"][m][k] for d in entries])) for k in ("base", "novel", "hm")}
            for m in models}
    return cross


def _evaluate_unlabeled(unlabeled: str, names: list[str], templates: list[str], models: _LoadedModels,
                        settings: LoaderSettings) -> dict[str, Any]:
    """The report's ``unlabeled`` entry: each student's agreement with the teacher and KL, no label read."""
    samples = fresh_samples(unlabeled, cache_dir=settings.cache_dir)
    classifiers = models.classifiers(names, templates)
    students = [c for c in classifiers if c.name != "teacher"]
    if not students:
        raise EvalInputError("agreement on unlabeled images needs a student (--student or --checkpoint)")
    result = evaluate_agreement(samples, classifiers[0], students, models.outputs, settings)
    return {"source": str(unlabeled), "classes": len(names),
            "images": len(samples) - len(result["rejected"]), "rejected": result["rejected"],
            **{name: {"agreement": r["agreement"], "kl": r["kl"]} for name, r in result["results"].items()}}


# ------------------------------------------------------------------------------ the table


def _fmt(value: Optional[float], width: int) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-".rjust(width)
    return f"{value:.2f}".rjust(width)


def format_report(report: dict) -> str:
    """The report as readable tables: top-1 per dataset (+ average), base-to-novel, agreement."""
    lines: list[str] = []
    models = list(report.get("models", {}))
    datasets = report.get("datasets", [])
    if datasets:
        # --domains --few-shot: the source domain is starred, and the other domains' average is a row
        few_shot = (report.get("domains") or {}).get("few_shot")
        source = few_shot["domain"] if few_shot else None
        names = {d["name"]: d["name"] + (" *" if d["name"] == source else "") for d in datasets}
        other_row = f"average w/o {source}" if few_shot else ""
        width = max(len("base / novel / HM (%)"), len(other_row), *(len(n) for n in names.values()))
        cols = [max(10, len(MODEL_LABELS[m])) for m in models]
        lines.append("top-1 accuracy (%)".ljust(width) + "  " + "  ".join(
            MODEL_LABELS[m].rjust(c) for m, c in zip(models, cols)) + "  images")
        for d in datasets:
            lines.append(names[d["name"]].ljust(width) + "  " + "  ".join(
                _fmt(d["top1"].get(m), c) for m, c in zip(models, cols)) + f"  {d['images']}")
        if "cross_dataset" in report:
            avg = report["cross_dataset"]["average"]
            lines.append("average".ljust(width) + "  " + "  ".join(_fmt(avg.get(m), c) for m, c in zip(models, cols)))
        if few_shot:
            avg = few_shot["average_other_domains"]
            lines.append(other_row.ljust(width) + "  " + "  ".join(_fmt(avg.get(m), c) for m, c in zip(models, cols)))
            lines.append(f"* few-shot source: {few_shot['shots']} images per class of {few_shot['domain']} "
                         f"(seed {few_shot['seed']}), {few_shot['epochs']} epochs of AdamW at lr {few_shot['lr']:g}; "
                         f"the other domains' average is the out-of-distribution figure")
        if datasets[0].get("base_to_novel"):
            lines.append("")
            col = 22
            lines.append("base / novel / HM (%)".ljust(width) + "  " + "  ".join(
                MODEL_LABELS[m].rjust(col) for m in models))
            rows = [(d["name"], d["base_to_novel"]) for d in datasets]
            if "base_to_novel_average" in report.get("cross_dataset", {}):
                rows.append(("average", report["cross_dataset"]["base_to_novel_average"]))
            for name, b2n in rows:
                cells = []
                for m in models:
                    r = b2n.get(m, {})
                    cell = " ".join(_fmt(r.get(k), 6) for k in ("base", "novel", "hm"))
                    cells.append(cell.rjust(col))
                lines.append(name.ljust(width) + "  " + "  ".join(cells))
    unlabeled = report.get("unlabeled")
    if unlabeled:
        if lines:
            lines.append("")
        lines.append(f"teacher-student on {unlabeled['images']} unlabeled images ({unlabeled['source']}):")
        for m in models:
            if m in unlabeled:
                lines.append(f"  {MODEL_LABELS[m]:<18} agreement {unlabeled[m]['agreement']:6.2f} %   "
                             f"KL(teacher||student) {unlabeled[m]['kl']:.4f}")
    return "\n".join(lines)
