"""Out-of-distribution evaluation: one student on every domain of a dataset, zero-shot and few-shot.

    clipdistill eval --domains ROOT [--checkpoint CHECKPOINT_OR_EXPORT] [--class-names FILE] [--templates SPEC]
                     [--few-shot K [--few-shot-domain NAME] [--few-shot-seed S] [--few-shot-epochs E]
                      [--few-shot-lr LR]]

Domain-generalization datasets (PACS, VLCS, ImageCLEF-DA, VisDA; see shared/PAPERS.md, the
data-free method) come as ``ROOT/<domain>/<class>/<images>``: every subfolder of ROOT is a
domain (sorted by name; hidden entries skipped), and every domain holds the same class folders.

- **Classes.** One class-name list serves every domain: the first domain's folder names
  (underscores read as spaces, as :func:`~.evaluate.scan_labeled_folder` reads them) or a
  ``--class-names`` file; each domain is then scanned as a labeled folder with those names, so
  label ``c`` is the same class in every domain. A domain that lacks a class or has an extra one
  is refused, naming the domain and the classes.
- **Zero-shot.** The models of ``clipdistill eval`` (the teacher, the student without prompts,
  the distilled student) are loaded once and their classifiers made once, for the shared names;
  each domain is one labeled folder of :func:`~.evaluate.run_evaluation`'s machinery, and the
  average over domains is its cross-dataset average.
- **Few-shot** (``--few-shot K``): a copy of the distilled student is fine-tuned on K images per
  class of one domain (the source: ``--few-shot-domain``, default the first), drawn as
  ``tune-teacher`` draws its shots (:func:`~clipdistill.engine.training.tune_teacher.draw_shots`:
  per class, seeded by the seed and the class folder's name). Each step: the training views
  (random resized crop, 0.08-1 of the area, and flip: the engine's
  :func:`~clipdistill.engine.training.data.training_transform`) at the student's preprocessing ->
  the student's logits over the domain's classes -> cross-entropy with the labels, through the
  engine's optimizer core (AdamW, cosine to 0, no warm-up). The logits are those the student
  is scored with: a learner that scores against the teacher (PromptKD, the data-free student)
  projects its features (:meth:`project`, with the loader's row mask, so padding rows never
  enter batch statistics) against the teacher's class vectors of the names; the other learners
  (KDPL's) against their own class features, recomputed from their prompts at every step. Only
  ``learner.trainable_parameters()`` move (prompts and projector; for the data-free student its
  whole network), with the torch generator seeded from the seed (deterministic on the CPU), and
  the learner is back in eval mode after. The copy owns its backbone, so the distilled student,
  its checkpoint and the other columns are untouched. The tuned student is scored on every
  domain as ``student_few_shot``; the average over the domains other than the source is the
  out-of-distribution figure, reported for every model.
"""
from __future__ import annotations

import copy
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from clipdistill.engine.config.run import DataConfig
from clipdistill.engine.evaluation.evaluate import (EvalInputError, LabeledFolder, LoaderSettings,
                                                    _cross_dataset_average, _evaluate_dataset, _load_models,
                                                    _models_to_load, _report_header, _templates_for,
                                                    module_classifier, scan_labeled_folder)
from clipdistill.engine.evaluation.export import StudentClassifier, read_distilled, student_class_vectors
from clipdistill.engine.progress import progress_bar
from clipdistill.engine.training.data import image_loader, training_transform
from clipdistill.engine.training.loop import OptimizerCore, make_optimizer
from clipdistill.engine.training.tune_teacher import ShotSelection, draw_shots
from clipdistill.loaders.loader import OutputSpec

FEW_SHOT_MODEL = "student_few_shot"


# ------------------------------------------------------------------------------ domains


def _subfolders(path: str) -> list[str]:
    return sorted(e.name for e in os.scandir(path) if e.is_dir() and not e.name.startswith("."))


def scan_domains(root: Union[str, Path], class_names: Union[str, Path, None] = None) -> list[LabeledFolder]:
    """Every domain of ``root`` (``ROOT/<domain>/<class>/<images>``) as a labeled folder, sorted by name.

    All domains share one list of class names (a class-name file, or the first domain's folder
    names), so label ``c`` is the same class everywhere.

    Raises:
        EvalInputError: no domain, a domain without class folders, a domain whose classes differ
            from the first domain's (named, with the classes), or a class without images.
        FileNotFoundError: ``root`` is not a folder.
    """
    root = os.path.abspath(os.fspath(root))
    if not os.path.isdir(root):
        raise FileNotFoundError(f"--domains: folder {root!r} does not exist")
    names = _subfolders(root)
    if not names:
        raise EvalInputError(f"--domains: {root} has no domain subfolders (expected ROOT/<domain>/<class>/<images>)")
    for name in names:
        if not _subfolders(os.path.join(root, name)):
            raise EvalInputError(f"--domains: domain {name!r} ({os.path.join(root, name)}) has no class subfolders "
                                 f"(expected ROOT/<domain>/<class>/<images>)")
    if class_names is None:  # the first domain's folders name the classes; spaces and underscores are alike
        classes = {name: {f.replace("_", " ") for f in _subfolders(os.path.join(root, name))} for name in names}
        first = classes[names[0]]
        for name in names[1:]:
            lacks, extra = sorted(first - classes[name]), sorted(classes[name] - first)
            if lacks or extra:
                raise EvalInputError(
                    f"--domains: domain {name!r} does not have the classes of domain {names[0]!r}: "
                    + "; ".join(([f"it lacks {lacks}"] if lacks else []) + ([f"it has extra {extra}"] if extra else []))
                    + ". Every domain is scored over the same classes: give each domain the same class folders "
                    "(no flag leaves a class out), or evaluate that domain alone with --data")
    folders: list[LabeledFolder] = []
    for name in names:
        # the first domain's names for the others: the labels follow one order in every domain
        spec = class_names if class_names is not None or not folders else folders[0].class_names
        try:
            folders.append(scan_labeled_folder(os.path.join(root, name), spec))
        except EvalInputError as exc:
            raise EvalInputError(f"--domains: domain {name!r}: {exc}") from exc
    return folders


def source_domain(folders: Sequence[LabeledFolder], name: Optional[str]) -> LabeledFolder:
    """The few-shot source: the domain called ``name`` (None: the first); an unknown name lists the domains."""
    if name is None:
        return folders[0]
    for folder in folders:
        if folder.name == name:
            return folder
    raise EvalInputError(f"--few-shot-domain {name!r} is not a domain of {os.path.dirname(folders[0].root)}; "
                         f"the domains: {', '.join(f.name for f in folders)}")


# ------------------------------------------------------------------------------ few-shot fine-tuning


@dataclass(frozen=True)
class FewShot:
    """Few-shot fine-tuning of the distilled student: ``shots`` images per class of ``domain``
    (None: the first), ``epochs`` of AdamW at ``lr`` (cosine to 0), batches of ``batch_size``
    (None: the evaluation's), draws and views seeded by ``seed``.

    ``lr`` 1e-4: AdamW's usual rate for fine-tuning a whole pretrained network (the data-free
    student trains all of it) without wrecking it; prompt learners, whose prompts and projector
    move little at that rate in a few steps, may want 1e-3."""

    shots: int
    domain: Optional[str] = None
    seed: int = 1
    epochs: int = 10
    lr: float = 1e-4
    weight_decay: float = 0.01  # torch's AdamW default
    batch_size: Optional[int] = None

    def check(self) -> None:
        problems = []
        if self.shots < 1:
            problems.append(f"--few-shot must be at least 1 image per class (got {self.shots})")
        if self.epochs < 1:
            problems.append(f"--few-shot-epochs must be at least 1 (got {self.epochs})")
        if not (math.isfinite(self.lr) and self.lr > 0):
            problems.append(f"--few-shot-lr must be a finite rate > 0 (got {self.lr})")
        if self.batch_size is not None and self.batch_size < 1:
            problems.append(f"the batch size must be at least 1 (got {self.batch_size})")
        if problems:
            raise EvalInputError("; ".join(problems))


def draw_domain_shots(source: LabeledFolder, class_names: Union[str, Path, None], few_shot: FewShot) -> ShotSelection:
    """``few_shot.shots`` images per class of the source domain (tune-teacher's draw); a class with
    fewer images is refused, naming it."""
    counts = np.bincount(source.labels, minlength=len(source.class_names))
    short = [f"{name!r} has {int(n)}" for name, n in zip(source.class_names, counts) if n < few_shot.shots]
    if short:
        raise EvalInputError(
            f"--few-shot {few_shot.shots}: {len(short)} class(es) of domain {source.name!r} hold fewer images: "
            f"{', '.join(short[:8])}{' ...' if len(short) > 8 else ''}. Lower --few-shot, or choose another "
            f"--few-shot-domain")
    shots = draw_shots(source.root, class_names if class_names is not None else source.class_names,
                       few_shot.shots, few_shot.seed)
    if shots.class_names != source.class_names:  # the draw scans the folder again: it must be the same one
        raise EvalInputError(f"domain {source.name!r} changed while it was read; run again")
    return shots


def _training_logits(classifier: StudentClassifier, images: torch.Tensor, row_mask: torch.Tensor) -> torch.Tensor:
    """(B, C) float32 logits with gradients: the student's, as :meth:`StudentClassifier.forward` scores it.

    A learner that scores against the teacher projects (padding rows left out of its batch
    statistics) against the teacher's class vectors; any other against its own class features
    from its current prompts (the classifier's stored ones would not follow the prompts)."""
    learner = classifier.learner
    if learner.scores_against_teacher:
        features = learner.project(images, row_mask).float()
        return float(learner.logit_scale) * features @ classifier.class_vectors.t()
    return learner(images).logits.float()


def fine_tune(
    distilled: StudentClassifier,
    shots: ShotSelection,
    output: OutputSpec,
    few_shot: FewShot,
    settings: LoaderSettings,
    *,
    log: Callable[[str], None] = lambda message: None,
) -> tuple[StudentClassifier, dict[str, Any]]:
    """A fine-tuned copy of ``distilled`` (see the module docstring) and what was done.

    ``distilled`` is not changed: the copy owns its learner and backbone (a second copy of the
    student's weights in memory). ``output`` is the loader output the student reads (its size,
    mean and std).

    Returns:
        (the tuned student in eval mode, ``{"images", "steps", "parameters", "loss"}``: the
        shots' count, optimizer steps, trained parameters, the last epoch's mean cross-entropy).
    """
    few_shot.check()
    device = torch.device(settings.device)
    tuned = copy.deepcopy(distilled)
    learner = tuned.learner
    params = list(learner.trainable_parameters().values())
    if not params:
        raise EvalInputError(f"the distilled student ({type(learner).__name__}) has nothing to fine-tune")
    for p in params:
        p.requires_grad_(True)
    batch_size = few_shot.batch_size or settings.batch_size
    data = DataConfig(batch_size=batch_size, backend=settings.backend, workers=settings.workers)
    loader = image_loader(shots.samples, data, outputs=[output], transform=training_transform(data),
                          seed=few_shot.seed, device=device, dtype=torch.float32, cache_dir=settings.cache_dir)
    labels_all = torch.from_numpy(shots.labels)
    steps = few_shot.epochs * len(loader)
    core = OptimizerCore(make_optimizer(params, name="adamw", lr=few_shot.lr, weight_decay=few_shot.weight_decay),
                         params, base_lr=few_shot.lr, total_steps=steps, schedule="cosine")
    log(f"clipdistill eval: few-shot fine-tuning on {len(shots.labels)} images of {len(shots.class_names)} classes, "
        f"{sum(p.numel() for p in params)} parameters, {steps} steps")
    loss = float("nan")
    bar = progress_bar(total=steps, desc="few-shot", unit="step", leave=False)
    # A seeded generator for what the learner draws in training mode (dropout); the caller's is kept.
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(few_shot.seed)
        learner.train()
        try:
            for epoch in range(1, few_shot.epochs + 1):
                total, batches = torch.zeros((), device=device), 0
                for batch in loader:
                    bar.update()
                    rows = batch.mask.nonzero().squeeze(1)  # the mask is on the CPU: no device sync
                    if not rows.numel():
                        core.skip()  # padding only: the schedule still advances
                        continue
                    labels = labels_all[batch.sample_ids[rows]].to(device)
                    images = batch.images[output.name]  # padding rows too: the row mask keeps them out
                    logits = _training_logits(tuned, images, batch.mask.to(images.device))
                    step_loss = F.cross_entropy(logits[rows.to(logits.device)], labels.to(logits.device))
                    core.backward(step_loss)
                    total, batches = total + step_loss.detach(), batches + 1
                loss = float(total) / max(batches, 1)  # one synchronization per epoch
                if not math.isfinite(loss):
                    raise RuntimeError(f"few-shot fine-tuning: non-finite loss in epoch {epoch}; lower --few-shot-lr")
                log(f"clipdistill eval: few-shot epoch {epoch}/{few_shot.epochs} cross-entropy {loss:.4f}")
        finally:
            learner.eval()
            bar.close()
    # the stored class features of a KDPL learner came from the prompts before tuning: recompute them
    vectors = tuned.class_vectors if learner.scores_against_teacher else student_class_vectors(learner)
    record = {"images": int(len(shots.labels)), "steps": steps, "parameters": int(sum(p.numel() for p in params)),
              "loss": loss}
    return StudentClassifier(learner, vectors, tuned.class_names).eval(), record


# ------------------------------------------------------------------------------ the evaluation run


def run_domain_evaluation(
    root: Union[str, Path],
    *,
    class_names: Union[str, Path, None] = None,
    templates: Optional[str] = None,
    distilled: Optional[str] = None,
    teacher: Optional[dict] = None,
    student: Optional[dict] = None,
    use_teacher: bool = True,
    base_to_novel: bool = False,
    few_shot: Optional[FewShot] = None,
    settings: LoaderSettings = LoaderSettings(),
    class_vector_cache: Optional[str] = None,
    log: Callable[[str], None] = lambda message: None,
) -> dict[str, Any]:
    """Evaluate every domain of ``root`` (see the module docstring); the report of ``eval``.

    The report is :func:`~.evaluate.run_evaluation`'s: ``datasets`` holds one entry per domain,
    ``cross_dataset["average"]`` the average over domains; ``domains`` adds the root, the domain
    names, the class names and, with ``few_shot``, ``few_shot``: the source ``domain``, the
    settings, what the fine-tuning did and ``average_other_domains`` (every model's average over
    the other domains; None with one domain).

    Args:
        class_names: a class-name file shared by every domain (None: the first domain's folders).
        templates: a template set name or file (None: the distilled student's, else "imagenet").
        few_shot: fine-tune a copy of the distilled student (``distilled`` required).
        Others: as :func:`~.evaluate.run_evaluation`.
    """
    if few_shot is not None:
        few_shot.check()
        if distilled is None:
            raise EvalInputError("--few-shot fine-tunes the distilled student: give it with --checkpoint")
    # Folders, names and shots are checked before any model is loaded: a mistake there costs nothing.
    folders = scan_domains(root, class_names)
    shots = source = None
    if few_shot is not None:
        source = source_domain(folders, few_shot.domain)
        shots = draw_domain_shots(source, class_names, few_shot)
    spec = read_distilled(distilled) if distilled else None
    teacher, student = _models_to_load(spec, teacher, student, use_teacher=use_teacher, unlabeled=False)
    models = _load_models(spec, teacher, student, device=torch.device(settings.device),
                          class_vector_cache=class_vector_cache, log=log)
    report = _report_header(models, settings, base_to_novel)
    names = folders[0].class_names
    template_list = _templates_for(templates, None, spec)
    classifiers = models.classifiers(names, template_list)  # once, for every domain
    domains: dict[str, Any] = {"root": os.path.dirname(folders[0].root), "names": [f.name for f in folders],
                               "class_names": names}
    if few_shot is not None:
        base = next(c for c in classifiers if c.name == "student_distilled")
        output = next(o for o in models.outputs if o.name == base.input)
        tuned, record = fine_tune(base.module, shots, output, few_shot, settings, log=log)
        classifiers.append(module_classifier(tuned, name=FEW_SHOT_MODEL, input=base.input))
        settings_record = {k: v for k, v in asdict(few_shot).items() if k != "domain"}
        settings_record["batch_size"] = few_shot.batch_size or settings.batch_size
        report["models"][FEW_SHOT_MODEL] = {"from": "student_distilled", "domain": source.name, **settings_record}
        domains["few_shot"] = {"domain": source.name, **settings_record, **record, "files": list(shots.samples.paths)}
    for folder in folders:
        report["datasets"].append(_evaluate_dataset(folder, template_list, models, settings, base_to_novel, log,
                                                    classifiers=classifiers))
    report["cross_dataset"] = _cross_dataset_average(report["datasets"], base_to_novel)
    if few_shot is not None:
        others = [d for d in report["datasets"] if d["name"] != source.name]
        domains["few_shot"]["average_other_domains"] = {
            m: (float(np.mean([d["top1"][m] for d in others])) if others else None) for m in report["models"]}
    report["domains"] = domains
    return report
