"""Evaluation: zero-shot top-1, base-to-novel, cross-dataset, teacher-student agreement, model selection.

    clipdistill eval --data FOLDER [--data FOLDER ...] [--class-names FILE ...] [--templates SPEC ...]
                     [--distilled CHECKPOINT_OR_EXPORT] [--teacher NAME --teacher-weights W]
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

import argparse
import difflib
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

REPORT_FORMAT = "clipdistill-eval/1"
MODEL_LABELS = {"teacher": "teacher", "student_zero_shot": "zero-shot student",
                "student_distilled": "distilled student"}


class EvalInputError(ValueError):
    """A labeled folder, class names or models that cannot be evaluated as asked."""


# ------------------------------------------------------------------------------ metrics (pure)


def base_novel_split(num_classes: int) -> tuple[list[int], list[int]]:
    """Class indices of the base half (the first ceil(C/2)) and the novel half (the rest)."""
    if num_classes < 2:
        raise EvalInputError(f"base-to-novel needs at least 2 classes, got {num_classes}")
    n_base = math.ceil(num_classes / 2)
    return list(range(n_base)), list(range(n_base, num_classes))


def harmonic_mean(base: float, novel: float) -> float:
    """2·base·novel / (base + novel); 0 when both are 0."""
    return 0.0 if base + novel == 0 else 2.0 * base * novel / (base + novel)


class TopOneTally:
    """Top-1 accuracy accumulated over batches, overall and (optionally) base / novel.

    :meth:`update` takes logits (B, C) over all C classes and labels (B,) int64 in [0, C).
    With ``base_to_novel``, base images (labels < ceil(C/2)) are scored on the base columns
    only and novel images on the novel columns only. Counts stay on the logits' device
    until :meth:`result`.
    """

    def __init__(self, num_classes: int, base_to_novel: bool = False):
        self.num_classes = num_classes
        self.n_base = len(base_novel_split(num_classes)[0]) if base_to_novel else None
        self._counts: Optional[torch.Tensor] = None  # correct, n, base correct, base n, novel correct, novel n

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        if logits.dim() != 2 or logits.shape[1] != self.num_classes:
            raise ValueError(f"logits must be (B, {self.num_classes}), got {tuple(logits.shape)}")
        labels = labels.to(logits.device)
        counts = [(logits.argmax(-1) == labels).sum(), torch.tensor(labels.numel(), device=logits.device)]
        if self.n_base is not None:
            m = self.n_base
            base = labels < m
            novel = ~base
            counts += [(logits[base, :m].argmax(-1) == labels[base]).sum(), base.sum(),
                       (logits[novel, m:].argmax(-1) + m == labels[novel]).sum(), novel.sum()]
        counts = torch.stack(counts).to(torch.int64)
        self._counts = counts if self._counts is None else self._counts + counts

    def result(self) -> dict[str, Any]:
        """``top1`` (percent) and ``images``; with base-to-novel also ``base``, ``novel``, ``hm``
        (percent) and ``base_images``, ``novel_images``."""
        counts = [0] * (6 if self.n_base is not None else 2) if self._counts is None else self._counts.tolist()

        def pct(correct: int, n: int) -> float:
            return 100.0 * correct / n if n else float("nan")

        out: dict[str, Any] = {"top1": pct(counts[0], counts[1]), "images": counts[1]}
        if self.n_base is not None:
            base, novel = pct(counts[2], counts[3]), pct(counts[4], counts[5])
            out.update(base=base, novel=novel, hm=harmonic_mean(base, novel), base_images=counts[3],
                       novel_images=counts[5])
        return out


def agreement_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> dict[str, float]:
    """Top-1 agreement (percent) and mean KL(p_t‖p_s) (nats) of (B, C) logits, computed in float32."""
    tally = AgreementTally()
    tally.update(teacher_logits, student_logits)
    return tally.result()


class AgreementTally:
    """Teacher-student top-1 agreement and KL(p_t‖p_s), accumulated over batches of (B, C) logits."""

    def __init__(self):
        self._sums: Optional[torch.Tensor] = None  # agreeing rows, sum of per-row KL, rows

    def update(self, teacher_logits: torch.Tensor, student_logits: torch.Tensor,
               mask: Optional[torch.Tensor] = None) -> None:
        """Add a batch; ``mask`` (B,) bool: only its True rows count (padding is skipped)."""
        if teacher_logits.shape != student_logits.shape or teacher_logits.dim() != 2:
            raise ValueError(f"teacher and student logits must both be (B, C); got {tuple(teacher_logits.shape)} "
                             f"and {tuple(student_logits.shape)}")
        log_t = F.log_softmax(teacher_logits.float(), dim=-1)
        log_s = F.log_softmax(student_logits.float(), dim=-1)
        kl = (log_t.exp() * (log_t - log_s)).sum(-1).double()
        agree = (teacher_logits.argmax(-1) == student_logits.argmax(-1)).double()
        if mask is None:
            rows = torch.full((), float(kl.numel()), dtype=torch.float64, device=kl.device)
        else:
            if tuple(mask.shape) != (kl.numel(),):
                raise ValueError(f"mask must be ({kl.numel()},), got {tuple(mask.shape)}")
            w = mask.to(device=kl.device, dtype=torch.float64)
            agree, kl, rows = agree * w, torch.where(w > 0, kl, torch.zeros_like(kl)), w.sum()
        sums = torch.stack([agree.sum(), kl.sum(), rows])
        self._sums = sums if self._sums is None else self._sums + sums

    def all_reduce(self, device: torch.device) -> None:
        """Sum the tallies of every rank of the initialized process group (a collective; a no-op
        without one)."""
        from .distributed import is_initialized

        if not is_initialized():
            return
        sums = self._sums if self._sums is not None else torch.zeros(3, dtype=torch.float64, device=device)
        sums = sums.to(device)
        torch.distributed.all_reduce(sums)
        self._sums = sums

    def result(self) -> dict[str, float]:
        """``agreement`` (percent), ``kl`` (nats per image), ``images``."""
        if self._sums is None:
            return {"agreement": float("nan"), "kl": float("nan"), "images": 0}
        agree, kl, n = self._sums.tolist()
        return {"agreement": 100.0 * agree / n if n else float("nan"), "kl": kl / n if n else float("nan"),
                "images": int(n)}


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
    from clipdistill.engine.train import read_class_names

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
    from clipdistill.loaders.sources import SampleList, scan_folder

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
    """

    name: str
    input: str
    logits: Callable[[torch.Tensor], torch.Tensor]


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
    return Classifier(name, input, lambda images: module(images).float())


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
    from clipdistill.loaders.loader import ImageLoader
    from clipdistill.loaders.views import CenterCrop

    loader = ImageLoader(samples, global_batch_size=settings.batch_size, outputs=list(outputs),
                         transform=CenterCrop(), backend=settings.backend, device=settings.device,
                         workers=settings.workers, interpolation="bicubic", cache_dir=settings.cache_dir)
    for batch in loader:
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
    from clipdistill.loaders.views import counter_hash

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
    from clipdistill.engine.prompts import PromptKDStudent

    promptkd = isinstance(step.student, PromptKDStudent)
    teacher_scale = step.teacher_logit_scale if step.recipe == "promptkd" else step.student_logit_scale
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
    from clipdistill.engine.export import StudentClassifier, build_learner, student_class_vectors
    from clipdistill.engine.export import teacher_class_vectors_for

    names, templates = list(class_names), list(templates)
    if distilled.learner_kind == "promptkd":
        stored = (distilled.class_vectors is not None and distilled.class_vectors_space == "teacher"
                  and distilled.class_names == names and distilled.templates == templates)
        if stored:
            vectors = distilled.class_vectors
        elif teacher is not None:
            vectors = teacher_class_vectors_for(distilled.teacher, names, templates, model=teacher,
                                                device=clip.logit_scale.device, cache_dir=cache_dir)
        else:
            raise EvalInputError(
                f"the PromptKD student {distilled.path} scores images against the teacher's class vectors, and "
                f"it holds none for these {len(names)} names and templates: evaluate with its teacher "
                f"({distilled.teacher.get('name')!r}), or export for these names first"
            )
        learner = build_learner(distilled, clip, class_names=names, templates=templates,
                                teacher_dim=int(vectors.shape[1]))
    else:
        learner = build_learner(distilled, clip, class_names=names, templates=templates)
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
    from clipdistill.engine.class_vectors import encode_class_names
    from clipdistill.engine.export import (build_backbone, fresh_samples, image_preprocess, read_distilled,
                                           teacher_class_vectors_for, versions)
    from clipdistill.engine.models import build_student, build_teacher, get_tokenizer
    from clipdistill.engine.train import read_class_names, read_templates
    from clipdistill.loaders.loader import OutputSpec

    device = torch.device(settings.device)
    if not datasets and not unlabeled:
        raise EvalInputError("nothing to evaluate: give labeled folders (--data) and/or unlabeled images (--unlabeled)")
    # Folders and names are checked before any model is loaded: a mistake there costs nothing.
    folders = [(scan_labeled_folder(d.folder, d.class_names), d) for d in datasets]
    spec = read_distilled(distilled) if distilled else None
    teacher = dict(teacher or {})
    student = dict(student or {})
    if spec is not None:
        teacher.setdefault("name", spec.teacher.get("name"))
        if teacher.get("name") == spec.teacher.get("name") and teacher.get("weights") is None:
            teacher["weights"] = spec.teacher.get("weights")
        if spec.learner_kind == "promptkd" and use_teacher and teacher["name"] != spec.teacher.get("name"):
            raise EvalInputError(
                f"the PromptKD student {spec.path} was distilled from teacher {spec.teacher.get('name')!r} and scores "
                f"images against that teacher's class vectors; teacher {teacher['name']!r} was given"
            )
    if use_teacher and not teacher.get("name"):
        use_teacher = False
    if spec is None and not student.get("name") and not use_teacher:
        raise EvalInputError("no model to evaluate: name a teacher, a student, or a distilled student")
    if unlabeled and not use_teacher:
        raise EvalInputError("agreement and KL on unlabeled images need the teacher (--teacher)")

    teacher_model = None
    outputs: dict[tuple, str] = {}

    def output_for(clip_model, preferred: str) -> str:
        key = image_preprocess(clip_model)
        if key not in outputs:
            outputs[key] = preferred
        return outputs[key]

    if use_teacher:
        teacher_model = build_teacher(teacher["name"], teacher.get("weights"), device=device)
        teacher_input = output_for(teacher_model.model, "teacher")
        log(f"clipdistill eval: teacher {teacher['name']} ({teacher.get('weights')})")
    clip = None
    if spec is not None:
        clip = build_backbone(spec, device=device, expect_student=student.get("name"),
                              student_weights=student.get("weights"))
        student = {"name": spec.student_name, "weights": student.get("weights") or spec.student.get("weights")}
    elif student.get("name"):
        clip = build_student(student["name"], student.get("weights"), device=device)
    if clip is not None:
        student_input = output_for(clip, "student")
        student_tokenizer = get_tokenizer(student["name"])
        log(f"clipdistill eval: student {student['name']} ({student.get('weights')})"
            + (f", distilled {spec.learner_kind} from {spec.path}" if spec is not None else ""))
    specs = [OutputSpec(name, size, tuple(mean), tuple(std)) for (size, mean, std), name in outputs.items()]
    method = spec.method if spec is not None else None
    teacher_scale = None
    if teacher_model is not None and method == "kdpl" and clip is not None:
        teacher_scale = float(clip.logit_scale.exp())  # KDPL scores the teacher with the student's scale

    def templates_of(given: Optional[str]) -> list[str]:
        if given is None and default_templates is None and spec is not None and spec.templates:
            return list(spec.templates)
        return read_templates(given or default_templates or "imagenet")

    def classifiers_for(names: list[str], templates: list[str]) -> list[Classifier]:
        out = []
        if teacher_model is not None:
            vectors = teacher_class_vectors_for(teacher, names, templates, model=teacher_model, device=device,
                                                cache_dir=class_vector_cache)
            out.append(teacher_classifier(teacher_model, vectors, logit_scale=teacher_scale, input=teacher_input))
        if clip is not None:
            vectors = encode_class_names(clip.encode_text, student_tokenizer, names, templates, device=device)
            out.append(zero_shot_classifier(clip, vectors, input=student_input))
        if spec is not None:
            module = distilled_classifier(spec, clip, names, templates, teacher=teacher_model,
                                          cache_dir=class_vector_cache)
            out.append(module_classifier(module, input=student_input))
        return out

    report: dict[str, Any] = {
        "format": REPORT_FORMAT,
        "units": {"top1": "percent", "base": "percent", "novel": "percent", "hm": "percent",
                  "agreement": "percent", "kl": "nats per image, KL(teacher||student)"},
        "models": {},
        "datasets": [],
        "settings": {"batch_size": settings.batch_size, "backend": settings.backend, "device": str(device),
                     "base_to_novel": base_to_novel, "preprocess": "center crop (shorter side), bicubic"},
        "versions": versions(),
    }
    if teacher_model is not None:
        report["models"]["teacher"] = {"name": teacher["name"], "weights": teacher.get("weights"),
                                       "logit_scale": float(teacher_scale or teacher_model.logit_scale)}
    if clip is not None:
        report["models"]["student_zero_shot"] = {"name": student["name"], "weights": student.get("weights")}
    if spec is not None:
        report["models"]["student_distilled"] = {"path": spec.path, "source": spec.source, "method": spec.method,
                                                 "learner": spec.learner_kind, "options": spec.learner_options,
                                                 "step": spec.step}
    first_names: Optional[list[str]] = None
    first_templates: Optional[list[str]] = None
    for folder, dataset in folders:
        templates = templates_of(dataset.templates)
        first_names, first_templates = first_names or folder.class_names, first_templates or templates
        log(f"clipdistill eval: {folder.name}: {len(folder.class_names)} classes, {len(folder.samples)} images")
        classifiers = classifiers_for(folder.class_names, templates)
        result = evaluate_labeled(folder, classifiers, specs, base_to_novel=base_to_novel, settings=settings)
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
        report["datasets"].append(entry)
    if len(report["datasets"]) > 1:
        models = list(report["datasets"][0]["top1"])
        report["cross_dataset"] = {
            "datasets": [d["name"] for d in report["datasets"]],
            "average": {m: float(np.mean([d["top1"][m] for d in report["datasets"]])) for m in models},
        }
        if base_to_novel:
            report["cross_dataset"]["base_to_novel_average"] = {
                m: {k: float(np.mean([d["base_to_novel"][m][k] for d in report["datasets"]]))
                    for k in ("base", "novel", "hm")} for m in models}
    if unlabeled:
        if unlabeled_class_names:
            names = read_class_names(unlabeled_class_names)
            templates = templates_of(None)
        elif first_names is not None:
            names, templates = first_names, first_templates
        elif spec is not None and spec.class_names:
            names, templates = spec.class_names, templates_of(None)
        else:
            raise EvalInputError("agreement on unlabeled images needs class names (--unlabeled-class-names)")
        samples = fresh_samples(unlabeled, cache_dir=settings.cache_dir)
        classifiers = classifiers_for(names, templates)
        students = [c for c in classifiers if c.name != "teacher"]
        if not students:
            raise EvalInputError("agreement on unlabeled images needs a student (--student or --distilled)")
        result = evaluate_agreement(samples, classifiers[0], students, specs, settings)
        report["unlabeled"] = {"source": str(unlabeled), "classes": len(names),
                               "images": len(samples) - len(result["rejected"]), "rejected": result["rejected"],
                               **{name: {"agreement": r["agreement"], "kl": r["kl"]}
                                  for name, r in result["results"].items()}}
    return report


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
        width = max(len("base / novel / HM (%)"), *(len(d["name"]) for d in datasets))
        cols = [max(10, len(MODEL_LABELS[m])) for m in models]
        lines.append("top-1 accuracy (%)".ljust(width) + "  " + "  ".join(
            MODEL_LABELS[m].rjust(c) for m, c in zip(models, cols)) + "  images")
        for d in datasets:
            lines.append(d["name"].ljust(width) + "  " + "  ".join(
                _fmt(d["top1"].get(m), c) for m, c in zip(models, cols)) + f"  {d['images']}")
        if "cross_dataset" in report:
            avg = report["cross_dataset"]["average"]
            lines.append("average".ljust(width) + "  " + "  ".join(_fmt(avg.get(m), c) for m, c in zip(models, cols)))
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


# ------------------------------------------------------------------------------ CLI


def _per_dataset(values: Optional[list[str]], count: int, flag: str) -> list[Optional[str]]:
    if not values:
        return [None] * count
    if len(values) == 1:
        return values * count
    if len(values) != count:
        raise EvalInputError(f"{flag} given {len(values)} times for {count} --data folders: give it once "
                             f"(for all) or once per folder, in the same order")
    return values


def _cmd_eval(args: argparse.Namespace) -> int:
    from clipdistill.engine.checkpoint import CheckpointError
    from clipdistill.engine.train import resolve_device

    try:
        folders = args.data or []
        names = _per_dataset(args.class_names, len(folders), "--class-names") if folders else []
        templates = _per_dataset(args.templates, len(folders), "--templates") if folders else []
        datasets = [Dataset(f, n, t) for f, n, t in zip(folders, names, templates)]
        teacher = {"name": args.teacher, "weights": args.teacher_weights} if args.teacher else None
        student = {k: v for k, v in (("name", args.student), ("weights", args.student_weights)) if v is not None}
        report = run_evaluation(
            datasets, distilled=args.distilled, teacher=teacher, student=student, use_teacher=not args.no_teacher,
            base_to_novel=args.base_to_novel, unlabeled=args.unlabeled,
            unlabeled_class_names=args.unlabeled_class_names,
            default_templates=args.templates[0] if args.templates and not folders else None,
            settings=LoaderSettings(args.batch_size, args.backend, resolve_device(args.device), args.workers,
                                    args.cache_dir),
            class_vector_cache=args.class_vector_cache,
            log=lambda m: print(m, file=sys.stderr),
        )
    except (ValueError, FileNotFoundError, CheckpointError) as exc:  # EvalInputError, ExportError, ConfigError
        print(f"clipdistill eval: error: {exc}", file=sys.stderr)
        return 2
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1, ensure_ascii=False), encoding="utf-8")
    print(format_report(report))
    print(json.dumps(report, ensure_ascii=False))
    return 0


def register(subparsers) -> None:
    """Add ``eval`` to the ``clipdistill`` command line."""
    parser = subparsers.add_parser(
        "eval", help="zero-shot top-1 (teacher, student, distilled), base-to-novel, cross-dataset, agreement",
        description="Evaluate the teacher, the student without prompts and a distilled student (training "
                    "checkpoint or export file) on labeled folders (one subfolder per class), and their "
                    "teacher-student agreement and KL on unlabeled images. Prints a table, then the report as "
                    "one line of JSON.",
    )
    parser.add_argument("--data", action="append", default=None, metavar="FOLDER",
                        help="a labeled folder (repeat for a cross-dataset table)")
    parser.add_argument("--class-names", action="append", default=None, metavar="FILE",
                        help="class-name file (once for all folders, or once per --data, in order)")
    parser.add_argument("--templates", action="append", default=None, metavar="SPEC",
                        help="template set name or file (once, or once per --data)")
    parser.add_argument("--distilled", default=None, help="a training checkpoint or an export file")
    parser.add_argument("--teacher", default=None, help="teacher model name (default: the distilled student's)")
    parser.add_argument("--teacher-weights", default=None, help="teacher pretrained tag or file")
    parser.add_argument("--no-teacher", action="store_true", help="leave the teacher out")
    parser.add_argument("--student", default=None, help="student model name (default: the distilled student's)")
    parser.add_argument("--student-weights", default=None, help="student pretrained tag or file")
    parser.add_argument("--base-to-novel", action="store_true",
                        help="also score base (first half of the classes) and novel (second half) and their HM")
    parser.add_argument("--unlabeled", default=None, help="unlabeled images (folder, list file, shards): "
                                                          "teacher-student agreement and KL")
    parser.add_argument("--unlabeled-class-names", default=None, help="class names for --unlabeled "
                                                                      "(default: the first dataset's)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:i]")
    parser.add_argument("--backend", default="torch", help="image loader backend: torch, dali-cpu, dali-gpu, auto")
    parser.add_argument("--workers", type=int, default=None, help="decoding workers (default: all cores)")
    parser.add_argument("--cache-dir", default=None,
                        help="where the image list of tar shards is saved (folders are scanned afresh)")
    parser.add_argument("--class-vector-cache", default=None, help="folder caching the teacher's class vectors")
    parser.add_argument("--out", default=None, help="also write the JSON report to this file")
    parser.set_defaults(func=_cmd_eval)


__all__ = [
    "EvalInputError", "base_novel_split", "harmonic_mean", "TopOneTally", "agreement_kl", "AgreementTally",
    "LabeledFolder", "read_class_list", "scan_labeled_folder", "Classifier", "teacher_classifier",
    "zero_shot_classifier", "module_classifier", "LoaderSettings", "evaluate_labeled", "evaluate_agreement",
    "SELECTION_METRICS", "is_better", "holdout_split", "heldout_agreement_kl", "distilled_classifier", "Dataset",
    "run_evaluation", "format_report", "register",
]
