"""Shipping a distilled student: one safetensors file, and prediction from it without the teacher.

    clipdistill export CHECKPOINT --out student.safetensors [--class-names FILE] [--templates SPEC]
                       [--include-backbone]
    clipdistill predict IMAGES... --checkpoint student.safetensors [--top-k 5] [--device auto]

The export file holds tensors and a JSON header, nothing else (no pickle):

- ``learner.<key>``: the learner's :meth:`~clipdistill.engine.prompts.PromptLearner.state_to_save`
  (prompts, meta-net, PromptKD's projector and its batch-norm statistics);
- ``class_vectors`` (C, D): what the student's logits are taken against, so that prediction
  needs no text encoder pass and never the teacher. PromptKD: the teacher's class vectors
  (D = D_teacher). CoOp, MaPLe, IVLP, PromptSRC, VPT: the student's own class features from
  its learned (or fixed) prompts (D = D_student). CoCoOp conditions its prompts on each
  image, so its class features cannot be stored: none, the text tower runs at prediction;
- ``backbone.<key>`` (only with ``include_backbone``): the student CLIP's weights, for a
  self-contained file (and for random-init or locally pretrained students).

The header (safetensors metadata ``"header"``, JSON) names the student model and its
weights (a pretrained tag, or a local file with its size and SHA-256), the method, the
learner's kind and options, the class names, the templates, the teacher it was distilled
from, the shapes of every backbone tensor, the image preprocessing, and the versions of
clipdistill, open_clip and torch.

Loading (:func:`load_export`) rebuilds the student with the installed open_clip and
refuses, naming what differs, a file made for another student architecture, a backbone
whose tensor shapes changed (another open_clip version), a weights file that is not the
one the export was made from, or learner state that does not fit.

The same module reads a distilled student from a training checkpoint
(:func:`read_distilled`), which evaluation uses too.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from clipdistill.engine import __version__
from clipdistill.engine.config.run import learner_options
from clipdistill.engine.config.schema import ConfigError
from clipdistill.engine.datafree.student import KIND as DATAFREE_KIND
from clipdistill.engine.datafree.student import TimmStudent, build_timm_backbone, module_device, student_image_spec
from clipdistill.engine.io import read_class_names, read_templates
from clipdistill.engine.models.class_vectors import teacher_class_vectors
from clipdistill.engine.models.clip import build_student, build_teacher, get_tokenizer, import_open_clip
from clipdistill.engine.models.tuned import TunedTeacher, load_tuned_teacher, tuned_teacher_class_vectors
from clipdistill.engine.progress import progress_bar
from clipdistill.engine.prompts.learners import PROMPT_PLACEMENTS
from clipdistill.engine.prompts.registry import build_learner as build_prompt_learner
from clipdistill.engine.templates import templates_for
from clipdistill.engine.training.checkpoint import CheckpointError, load_checkpoint, load_class_vectors, tensor_sha256
from clipdistill.loaders.loader import ImageLoader, OutputSpec
from clipdistill.loaders.sources import IMAGE_EXTENSIONS, EmptySourceError, SampleList, resolve_source, scan_folder
from clipdistill.loaders.views import CenterCrop

FORMAT = "clipdistill-export/1"
CHECKPOINT_FORMAT = "clipdistill-checkpoint/1"  # clipdistill.engine.checkpoint.FORMAT
LEARNER_PREFIX = "learner."
BACKBONE_PREFIX = "backbone."
CLASS_VECTORS = "class_vectors"
# Vision prompts of artifacts written before the placement was recorded went in after ln_pre.
LEGACY_PROMPT_PLACEMENT = "after_ln_pre"
# Learner kinds whose logits are against the teacher's class vectors (PromptKD's student, the data-free one).
TEACHER_SPACE_KINDS = ("promptkd", DATAFREE_KIND)
# The checkpoints of the data-free student's own loop (distill-datafree before it joined the engine's trainer).
LEGACY_DATAFREE_KIND = "clipdistill-datafree-student/1"


class ExportError(ValueError):
    """An export file (or a checkpoint) that cannot be used as asked; the message says why."""


# ------------------------------------------------------------------------------ small helpers


def versions() -> dict[str, str]:
    """clipdistill, open_clip and torch versions (open_clip through the engine's importer)."""
    return {"clipdistill": __version__, "open_clip": getattr(import_open_clip(), "__version__", "unknown"),
            "torch": torch.__version__}


def file_sha256(path: Union[str, Path]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _weights_record(weights: Optional[str]) -> dict:
    if weights is None:
        return {"weights": None}
    if os.path.isfile(weights):
        return {"weights": os.path.abspath(weights), "weights_bytes": os.path.getsize(weights),
                "weights_sha256": file_sha256(weights)}
    return {"weights": str(weights)}


def _shapes(state: dict[str, torch.Tensor]) -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in state.items()}


def shape_differences(recorded: dict[str, list[int]], current: dict[str, list[int]], limit: int = 5) -> list[str]:
    """Readable differences between two {tensor name: shape} maps (missing, extra, reshaped)."""
    out = []
    for key in sorted(set(recorded) | set(current)):
        a, b = recorded.get(key), current.get(key)
        if a is None:
            out.append(f"{key}: not in the file, {tuple(b)} now")
        elif b is None:
            out.append(f"{key}: {tuple(a)} in the file, absent now")
        elif list(a) != list(b):
            out.append(f"{key}: {tuple(a)} in the file, {tuple(b)} now")
    if len(out) > limit:
        out = out[:limit] + [f"... and {len(out) - limit} more"]
    return out


def state_differences(found: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> list[str]:
    """:func:`shape_differences` of two states, plus tensors whose kind (floating or integer) differs."""
    out = shape_differences(_shapes(found), _shapes(expected))
    for key in sorted(set(found) & set(expected)):
        if found[key].is_floating_point() != expected[key].is_floating_point():
            out.append(f"{key}: {found[key].dtype} in the file, {expected[key].dtype} expected")
    return out


def _read_safetensors_metadata(path: Path) -> dict:
    try:
        with safe_open(str(path), framework="pt") as fh:
            return dict(fh.metadata() or {})
    except Exception as exc:  # safetensors raises its own types for garbled files
        raise ExportError(f"{path}: not a readable safetensors file ({exc})") from exc


# ------------------------------------------------------------------------------ a distilled student


@dataclass
class DistilledStudent:
    """What a distilled student is made of, from a training checkpoint or an export file.

    ``learner_state`` is the learner's :meth:`state_to_save`; ``class_vectors`` (C, D) and
    ``backbone_state`` exist only in export files; ``class_names`` (``templates``) is None for a
    checkpoint whose class-name (template) file can no longer be read. ``teacher_vectors`` (C, D_t):
    the teacher's class vectors the run trained against, for ``teacher_vector_names``, stored with
    a checkpoint (None for checkpoints written before they were stored). ``teacher["prompts"]``:
    the tuned teacher's file when the run distilled from one.
    """

    path: str
    source: str  # "checkpoint" or "export"
    method: str
    student: dict  # name, weights (+ weights_sha256 for local files), precision
    teacher: dict  # name, weights
    learner_kind: str
    learner_options: dict
    learner_state: dict[str, torch.Tensor]
    class_names: Optional[list[str]]
    templates: Optional[list[str]]  # None: a checkpoint whose template file can no longer be read
    class_vectors: Optional[torch.Tensor] = None
    class_vectors_space: Optional[str] = None  # "teacher", "student" or None
    backbone_state: Optional[dict[str, torch.Tensor]] = None
    header: dict = field(default_factory=dict)
    step: Optional[int] = None
    prompt_placement: str = LEGACY_PROMPT_PLACEMENT
    teacher_vectors: Optional[torch.Tensor] = None
    teacher_vector_names: Optional[list[str]] = None
    teacher_vectors_source: Optional[str] = None  # "teacher", "tuned" or "teacher_cache"

    @property
    def student_name(self) -> str:
        return self.student["name"]


def read_distilled(path: Union[str, Path]) -> DistilledStudent:
    """Read a training checkpoint (``step-*.safetensors``) or an export file; the format is detected."""
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{path} does not exist (expected a training checkpoint or an export file)")
    metadata = _read_safetensors_metadata(path)
    fmt = metadata.get("format")
    if fmt == FORMAT:
        return _read_export(path, metadata)
    if fmt == CHECKPOINT_FORMAT:
        return _read_checkpoint(path)
    raise ExportError(f"{path}: neither a clipdistill export ({FORMAT}) nor a training checkpoint "
                      f"({CHECKPOINT_FORMAT}); its format is {fmt!r}")


def _read_checkpoint(path: Path) -> DistilledStudent:
    state = load_checkpoint(path)
    if state.get("kind") == LEGACY_DATAFREE_KIND:
        return _read_legacy_datafree(path, state)
    config = state.get("config")
    if not isinstance(config, dict) or "learner" not in state:
        raise ExportError(f"{path}: a checkpoint without the run config or the learner state")
    data = config.get("data", {})
    class_names = None
    names_file = data.get("class_names") or ""
    if names_file and os.path.isfile(names_file):
        class_names = read_class_names(names_file)

    try:
        templates = read_templates(data.get("templates") or "imagenet")
    except ConfigError:  # a template file that is gone: the caller must name the templates
        templates = None
    vectors, vector_header = None, {}
    if state.get("class_vectors"):
        try:
            vectors, vector_header = load_class_vectors(path, state["class_vectors"])
        except CheckpointError as exc:
            raise ExportError(str(exc)) from exc
        if class_names is None and not data.get("shots") and not data.get("base_classes_only"):
            class_names = list(vector_header["class_names"])  # the names file is gone; the run's names are here
    student = dict(config["student"])
    return DistilledStudent(
        path=str(path), source="checkpoint", method=config["method"],
        student={"name": student["name"], "weights": student.get("weights"), "precision": student.get("precision")},
        teacher={"name": config["teacher"]["name"], "weights": config["teacher"].get("weights"),
                 "prompts": config["teacher"].get("prompts")},
        learner_kind=config["learner"]["kind"], learner_options=dict(config["learner"].get("options") or {}),
        learner_state={k: v for k, v in state["learner"].items()}, class_names=class_names,
        templates=templates, header={"config": config},
        step=int(state.get("step", 0)),
        prompt_placement=config["learner"].get("prompt_placement", LEGACY_PROMPT_PLACEMENT),
        teacher_vectors=vectors, teacher_vector_names=vector_header.get("class_names"),
        teacher_vectors_source=vector_header.get("source"),
    )


def _read_legacy_datafree(path: Path, state: dict) -> DistilledStudent:
    """A checkpoint of the data-free student's own loop: its network, head and the teacher's class
    vectors it scored against are here; the class names are those of the synthetic set it was
    trained on (recorded as a path), or refused naming what to do when that set is gone."""
    config, model, extra = state.get("config") or {}, state.get("model") or {}, state.get("extra") or {}
    vectors = model.get("class_vectors")
    if not isinstance(vectors, torch.Tensor) or "backbone" not in config:
        raise ExportError(f"{path}: a data-free student checkpoint without its network config or class vectors")
    data = extra.get("data")
    plan = Path(str(data)) / "synthesis.json" if data else None
    if plan is None or not plan.is_file():
        raise ExportError(
            f"{path} is a data-free student checkpoint from before the engine's trainer ran the data-free recipe; "
            f"its class names are those of the synthetic set it was trained on ({data!r}), which cannot be read "
            f"here. Restore that set at that path, or train again with clipdistill distill --recipe datafree")
    names = list(json.loads(plan.read_text(encoding="utf-8"))["class_names"])
    if len(names) != vectors.shape[0]:
        raise ExportError(f"{path}: {vectors.shape[0]} class vectors, but its synthetic set {data} names "
                          f"{len(names)} classes")
    learner_state = {k: v for k, v in model.items() if k != "class_vectors"}
    learner_state["scale"] = torch.tensor(float(config.get("logit_scale", 100.0)))
    return DistilledStudent(
        path=str(path), source="checkpoint", method="datafree",
        student={"name": config["backbone"], "weights": None, "precision": None},
        teacher={"name": extra.get("teacher"), "weights": extra.get("teacher_weights"), "prompts": None},
        learner_kind=DATAFREE_KIND, learner_options={"image_size": int(config.get("image_size", 224))},
        learner_state=learner_state, class_names=names, templates=list(templates_for("generic")),
        header={"legacy": LEGACY_DATAFREE_KIND}, step=int(state.get("step", 0)), prompt_placement=None,
        teacher_vectors=vectors.float(), teacher_vector_names=names, teacher_vectors_source="teacher",
    )


def _read_export(path: Path, metadata: dict) -> DistilledStudent:
    try:
        header = json.loads(metadata["header"])
    except (KeyError, json.JSONDecodeError) as exc:
        raise ExportError(f"{path}: export file without a readable JSON header ({exc})") from exc
    missing = [k for k in ("method", "student", "teacher", "learner", "class_names", "templates") if k not in header]
    if missing:
        raise ExportError(f"{path}: the export header lacks {missing}")
    tensors = load_file(str(path))
    check_export_header(path, header, tensors)
    learner_state = {k[len(LEARNER_PREFIX):]: v for k, v in tensors.items() if k.startswith(LEARNER_PREFIX)}
    backbone = {k[len(BACKBONE_PREFIX):]: v for k, v in tensors.items() if k.startswith(BACKBONE_PREFIX)}
    return DistilledStudent(
        path=str(path), source="export", method=header["method"], student=dict(header["student"]),
        teacher=dict(header["teacher"]), learner_kind=header["learner"]["kind"],
        learner_options=dict(header["learner"].get("options") or {}), learner_state=learner_state,
        class_names=list(header["class_names"]), templates=list(header["templates"]),
        class_vectors=tensors.get(CLASS_VECTORS), class_vectors_space=header.get("class_vectors"),
        backbone_state=backbone or None, header=header, step=(header.get("source") or {}).get("step"),
        prompt_placement=header["learner"].get("prompt_placement", LEGACY_PROMPT_PLACEMENT),
    )


def _is_text(value) -> bool:
    return isinstance(value, str) and bool(value.strip())


def check_export_header(path: Union[str, Path], header: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Refuse an export whose header values have the wrong type, or whose tensors do not fit it.

    ``class_names``: a non-empty list of unique, non-empty strings, as many as the rows of
    ``class_vectors``; ``class_vectors`` (C, D) of a floating dtype, present exactly when the
    header names its space ("student" or "teacher"); learner and backbone tensors floating or
    integer (never bool or complex); the model records (student, teacher, learner, templates)
    of the types :func:`export_student` writes.

    Raises:
        ExportError: naming the first field that is wrong and what it holds.
    """
    def refuse(what: str) -> None:
        raise ExportError(f"{path}: export header: {what}")

    if not isinstance(header, dict):
        refuse(f"a JSON object expected, found {type(header).__name__}")
    if not _is_text(header["method"]):
        refuse(f"'method' must be a non-empty string, found {header['method']!r}")
    for record, required in (("student", ("name",)), ("teacher", ()), ("learner", ("kind",))):
        value = header[record]
        if not isinstance(value, dict):
            refuse(f"'{record}' must be an object, found {type(value).__name__}")
        for key in required:
            if not _is_text(value.get(key)):
                refuse(f"'{record}.{key}' must be a non-empty string, found {value.get(key)!r}")
        for key in ("name", "weights", "weights_sha256", "precision"):
            if value.get(key) is not None and not isinstance(value.get(key), str):
                refuse(f"'{record}.{key}' must be a string or null, found {value.get(key)!r}")
    if not isinstance(header["learner"].get("options") or {}, dict):
        refuse(f"'learner.options' must be an object, found {header['learner']['options']!r}")
    placement = header["learner"].get("prompt_placement", LEGACY_PROMPT_PLACEMENT)
    if placement is not None and (not isinstance(placement, str) or placement not in PROMPT_PLACEMENTS):
        # null: written for a learner without vision prompts, or the published placement (see export())
        refuse(f"'learner.prompt_placement' must be one of {', '.join(PROMPT_PLACEMENTS)} or null, found "
               f"{placement!r:.80}")
    names = header["class_names"]
    if not isinstance(names, list) or not names:
        refuse(f"'class_names' must be a non-empty list of strings, found {names!r:.80}")
    first: dict[str, int] = {}
    for i, name in enumerate(names):
        if not _is_text(name):
            refuse(f"class name {i} must be a non-empty string, found {name!r}")
        if name in first:
            refuse(f"class name {i} repeats {name!r} (first at {first[name]})")
        first[name] = i
    templates = header["templates"]
    if not isinstance(templates, list) or not templates or not all(_is_text(t) for t in templates):
        refuse(f"'templates' must be a non-empty list of non-empty strings, found {templates!r:.80}")
    space = header.get("class_vectors")
    if space not in (None, "student", "teacher"):
        refuse(f"'class_vectors' must be \"student\", \"teacher\" or null, found {space!r}")
    vectors = tensors.get(CLASS_VECTORS)
    if (vectors is None) != (space is None):
        refuse(f"'class_vectors' says {space!r}, but the file {'lacks' if vectors is None else 'holds'} "
               f"the class_vectors tensor")
    if vectors is not None:
        if not vectors.is_floating_point():
            refuse(f"class_vectors must be a floating-point tensor, found {vectors.dtype}")
        if vectors.dim() != 2 or vectors.shape[0] != len(names):
            refuse(f"class_vectors of shape {tuple(vectors.shape)} for {len(names)} class names")
    for key, tensor in tensors.items():
        if tensor.dtype == torch.bool or tensor.is_complex():
            refuse(f"tensor {key!r} has dtype {tensor.dtype}")
    shapes = header.get("backbone_shapes")
    if shapes is not None and not (isinstance(shapes, dict) and all(
            isinstance(v, list) and all(isinstance(d, int) and d >= 0 for d in v) for v in shapes.values())):
        refuse("'backbone_shapes' must map tensor names to lists of sizes")
    for key in ("source", "versions"):
        if header.get(key) is not None and not isinstance(header[key], dict):
            refuse(f"'{key}' must be an object, found {header[key]!r:.80}")


# ------------------------------------------------------------------------------ rebuilding


def build_backbone(
    distilled: DistilledStudent,
    *,
    device: Union[str, torch.device] = "cpu",
    expect_student: Optional[str] = None,
    student_weights: Optional[str] = None,
) -> nn.Module:
    """The frozen student CLIP the prompts were trained on, checked against the file's record
    (the data-free student: its timm network, random-init, which its saved state then fills).

    Args:
        expect_student: the student architecture the caller wants (e.g. ``--student``);
            refused when the prompts were trained on another one.
        student_weights: a local weights file standing in for the recorded one (the export
            moved to another machine); refused unless its SHA-256 is the recorded one.

    Raises:
        ExportError: another architecture, a changed weights file, or backbone tensors whose
            shapes differ from those recorded at export (another open_clip version).
    """
    name = distilled.student_name
    if expect_student is not None and expect_student.replace("/", "-") != name.replace("/", "-"):
        raise ExportError(
            f"{distilled.path} holds prompts trained on student {name!r}, but student {expect_student!r} was "
            f"asked for: prompts do not carry over between architectures. Use student {name!r}, or distill "
            f"{expect_student!r} itself."
        )
    if distilled.learner_kind == DATAFREE_KIND:
        # The data-free student trained its whole network: its weights are all in the learner state.
        if student_weights is not None:
            raise ExportError(f"{distilled.path} is a data-free student, whose whole network is in the file: "
                              f"student weights ({student_weights}) do not apply")
        try:
            return build_timm_backbone(name, None).to(device)
        except ValueError as exc:
            raise ExportError(f"{distilled.path}: {exc}") from exc
    precision = distilled.student.get("precision") or "fp32"
    weights = distilled.student.get("weights")
    if distilled.backbone_state is not None:
        clip = build_student(name, None, device="cpu", precision=precision)
        _check_backbone_shapes(distilled, clip)
        differences = state_differences(distilled.backbone_state, clip.state_dict())
        if differences:
            raise ExportError(f"{distilled.path}: the embedded backbone does not fit the student {name!r} built by "
                              f"open_clip {versions()['open_clip']}: {'; '.join(differences)}")
        clip.load_state_dict(distilled.backbone_state, strict=True)
        return clip.to(device)
    if student_weights is not None:
        weights = _check_weights_file(distilled, student_weights)
    elif distilled.source == "export" and distilled.student.get("weights_sha256"):
        if not os.path.isfile(weights):
            raise ExportError(
                f"{distilled.path} refers to the student weights file {weights!r}, which does not exist here. "
                f"Pass the same file's new location (--student-weights), or export with --include-backbone."
            )
        _check_weights_file(distilled, weights)
    elif weights is None:
        raise ExportError(f"{distilled.path}: the student {name!r} was random-init (weights null) and its "
                          f"backbone is not in the file; its prompts cannot be used with another random init")
    try:
        clip = build_student(name, weights, device=device, precision=precision)
    except RuntimeError as exc:  # weights that do not fit the architecture (open_clip's multi-line message)
        raise ExportError(f"{distilled.path}: the student weights {weights!r} do not build {name!r}: "
                          f"{' '.join(str(exc).split())[:400]}") from exc
    if distilled.source == "export":
        _check_backbone_shapes(distilled, clip)
    return clip


def _check_weights_file(distilled: DistilledStudent, path: str) -> str:
    recorded = distilled.student.get("weights_sha256")
    if recorded is not None:
        if not os.path.isfile(path):
            raise ExportError(f"student weights file {path!r} does not exist")
        found = file_sha256(path)
        if found != recorded:
            raise ExportError(
                f"student weights {path!r} are not those the prompts were trained on: SHA-256 {found[:16]}... "
                f"here, {recorded[:16]}... recorded in {distilled.path} (from {distilled.student.get('weights')!r})"
            )
    return path


def _check_backbone_shapes(distilled: DistilledStudent, clip: nn.Module) -> None:
    recorded = distilled.header.get("backbone_shapes")
    if recorded is None:
        return
    differences = shape_differences(recorded, _shapes(clip.state_dict()))
    if differences:
        made = distilled.header.get("versions", {}).get("open_clip", "unknown")
        now = versions()["open_clip"]
        raise ExportError(
            f"{distilled.path}: the student {distilled.student_name!r} built by open_clip {now} does not have the "
            f"shapes recorded at export (open_clip {made}): {'; '.join(differences)}. Install open_clip {made}, "
            f"or distill and export again with this version."
        )


def _templates(distilled: DistilledStudent, templates: Optional[Sequence[str]]) -> list[str]:
    if templates:
        return list(templates)
    if not distilled.templates:
        raise ExportError(f"{distilled.path}: the run's template file can no longer be read; name the templates")
    return list(distilled.templates)


def _is_class_specific(distilled: DistilledStudent) -> bool:
    ctx = distilled.learner_state.get("prompts.ctx")
    return ctx is not None and ctx.dim() == 3


def construct_learner(kind: str, clip: nn.Module, *, tokenizer, class_names: Sequence[str],
                      templates: Sequence[str], teacher_dim: Optional[int], options: dict,
                      prompt_placement: Optional[str] = None):
    """A fresh learner ``kind`` over ``clip``, as the training run builds it (fixed-prompt learners,
    VPT and PromptSRC, get the templates; PromptKD gets the teacher's dimension; vision prompts go
    where ``prompt_placement`` says, None: the published placement)."""
    return build_prompt_learner(kind, clip, tokenizer=tokenizer, class_names=list(class_names),
                                teacher_dim=teacher_dim, templates=templates, prompt_placement=prompt_placement,
                                **options)


def rebuild_learner(
    distilled: DistilledStudent,
    clip: nn.Module,
    *,
    class_names: Sequence[str],
    templates: Optional[Sequence[str]] = None,
    teacher_dim: Optional[int] = None,
):
    """The distilled learner over ``clip`` for ``class_names``, in eval mode, with its state loaded.

    Shared text contexts, vision prompts and projectors do not depend on the class names,
    so the learner serves any list of names (base-to-novel, cross-dataset); a class-specific
    context (C, n, W) serves its own names only.
    """
    class_names = list(class_names)
    if _is_class_specific(distilled) and distilled.class_names != class_names:
        raise ExportError(
            f"{distilled.path}: its context is class-specific (one per trained class name), so it serves only the "
            f"{len(distilled.class_names or [])} names it was trained with, not these {len(class_names)}"
        )
    if teacher_dim is None:
        projector_out = (distilled.learner_state.get("projector.layers.3.weight")
                         if distilled.learner_kind != DATAFREE_KIND else distilled.learner_state.get("head.weight"))
        teacher_dim = int(projector_out.shape[0]) if projector_out is not None else None
        if teacher_dim is None and distilled.class_vectors is not None:
            teacher_dim = int(distilled.class_vectors.shape[1])
    options = learner_options(distilled.learner_kind, distilled.learner_options)
    device = module_device(clip)
    if distilled.learner_kind == DATAFREE_KIND:
        learner = TimmStudent(clip, teacher_dim, **options).to(device)
    else:
        learner = construct_learner(
            distilled.learner_kind, clip, tokenizer=get_tokenizer(distilled.student_name), class_names=class_names,
            templates=_templates(distilled, templates), teacher_dim=teacher_dim, options=options,
            prompt_placement=distilled.prompt_placement,
        ).to(device)
    differences = state_differences(distilled.learner_state, learner.state_to_save())
    if differences:
        raise ExportError(
            f"{distilled.path}: the saved {distilled.learner_kind} state does not fit a learner built with its "
            f"options {distilled.learner_options} on {distilled.student_name!r}: {'; '.join(differences)}"
        )
    learner.load_saved_state({k: v.to(device) for k, v in distilled.learner_state.items()})
    learner.eval()
    return learner


class StudentClassifier(nn.Module):
    """A distilled learner and the class vectors its logits are taken against.

    ``class_vectors`` (C, D): the teacher's class vectors for PromptKD and the data-free student
    (required), or the student's
    precomputed class features; None for CoCoOp, whose class features depend on the image.
    :meth:`forward`: images (B, 3, S, S) at the student's preprocessing -> logits (B, C) float32.
    """

    def __init__(self, learner: nn.Module, class_vectors: Optional[torch.Tensor], class_names: Sequence[str]):
        super().__init__()

        self.learner = learner
        self.promptkd = learner.scores_against_teacher
        if self.promptkd and class_vectors is None:
            raise ExportError(f"a {type(learner).__name__} scores against the teacher's class vectors: pass them")
        if class_vectors is not None and class_vectors.shape[0] != len(class_names):
            raise ExportError(f"{class_vectors.shape[0]} class vectors for {len(class_names)} class names")
        self.class_names = list(class_names)
        device = module_device(learner)
        self.register_buffer("class_vectors", None if class_vectors is None else class_vectors.float().to(device),
                             persistent=False)

    @property
    def device(self) -> torch.device:
        return module_device(self.learner)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        learner = self.learner
        if self.promptkd:
            return learner(images, self.class_vectors).logits.float()
        if self.class_vectors is None:
            return learner(images).logits.float()
        features = F.normalize(learner.encode_image(images), dim=-1).float()
        return float(learner.logit_scale) * features @ self.class_vectors.t()


@torch.no_grad()
def student_class_vectors(learner: nn.Module) -> Optional[torch.Tensor]:
    """The learner's class features (C, D) computed once, or None when they depend on the image."""
    if learner.class_vectors_per_image or learner.scores_against_teacher:
        return None
    return learner.class_features().float()


# ------------------------------------------------------------------------------ export


def export_student(
    path: Union[str, Path],
    learner: nn.Module,
    *,
    method: str,
    student: dict,
    teacher: dict,
    learner_kind: str,
    learner_options: dict,
    class_names: Sequence[str],
    templates: Sequence[str],
    teacher_class_vectors: Optional[torch.Tensor] = None,
    include_backbone: bool = False,
    source: Optional[dict] = None,
    prompt_placement: Optional[str] = None,
) -> Path:
    """Write a distilled ``learner`` (over its frozen ``learner.clip``) as one export file.

    Args:
        student: ``{"name", "weights", "precision"}`` of the backbone (weights: tag, path or None).
        teacher: ``{"name", "weights"}`` it was distilled from (recorded, never needed to predict).
        teacher_class_vectors: (C, D_teacher) normalized; required for PromptKD.
        include_backbone: store the student CLIP's weights in the file too (required when
            ``student["weights"]`` is None: a random init cannot be rebuilt elsewhere).
        source: where it came from (checkpoint path, step), recorded in the header.
        prompt_placement: where the learner's vision prompts join the image tokens (recorded;
            None: the learner's own, the published placement).

    Returns:
        the path written (atomically: a temporary file renamed into place).
    """
    path = Path(path)
    class_names, templates = list(class_names), list(templates)
    datafree = isinstance(learner, TimmStudent)  # its whole network is learner state: nothing to refer to
    clip = None if datafree else learner.clip
    weights = student.get("weights")
    if weights is None and not include_backbone and not datafree:
        raise ExportError(
            f"student {student['name']!r} has no weights (random init): its prompts are useless without this exact "
            f"backbone. Export with include_backbone (--include-backbone) to store it in the file."
        )
    if learner.scores_against_teacher:
        if teacher_class_vectors is None:
            raise ExportError("a PromptKD student's logits are against the teacher's class vectors: pass them")
        vectors, space = teacher_class_vectors.detach().float().cpu(), "teacher"
    else:
        vectors = student_class_vectors(learner)
        vectors, space = (None, None) if vectors is None else (vectors.cpu(), "student")
    if vectors is not None and vectors.shape[0] != len(class_names):
        raise ExportError(f"{vectors.shape[0]} class vectors for {len(class_names)} class names")

    tensors = {LEARNER_PREFIX + k: v.detach().cpu().contiguous().clone() for k, v in learner.state_to_save().items()}
    if vectors is not None:
        tensors[CLASS_VECTORS] = vectors.contiguous()
    backbone_state = {} if datafree else clip.state_dict()
    if include_backbone:
        tensors.update({BACKBONE_PREFIX + k: v.detach().cpu().contiguous().clone() for k, v in backbone_state.items()})
    size, mean, std = student_image_spec(learner)
    header = {
        "format": FORMAT,
        "method": method,
        "student": {"name": student["name"], **_weights_record(weights), "precision": student.get("precision"),
                    "embed_dim": int(learner.output_dim if datafree else clip.visual.output_dim)},
        "teacher": {"name": teacher.get("name"), "weights": teacher.get("weights"),
                    "prompts": teacher.get("prompts")},
        "learner": {"kind": learner_kind, "options": learner_options,
                    "prompt_placement": prompt_placement or _placement_of(learner)},
        "class_names": class_names,
        "templates": templates,
        "class_vectors": space,
        "class_vectors_sha256": None if vectors is None else tensor_sha256(vectors),
        # the data-free student's network is in its learner tensors ("learner")
        "backbone": "learner" if datafree else "embedded" if include_backbone else "reference",
        "backbone_shapes": None if datafree else _shapes(backbone_state),
        "image": {"size": size, "mean": list(mean), "std": list(std)},
        "versions": versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "source": source or {},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file(tensors, str(tmp), metadata={"format": FORMAT, "header": json.dumps(header, ensure_ascii=False)})
    os.replace(tmp, path)
    return path


def export_from_checkpoint(
    checkpoint: Union[str, Path],
    out: Union[str, Path],
    *,
    class_names: Optional[Sequence[str]] = None,
    templates: Optional[Sequence[str]] = None,
    include_backbone: bool = False,
    device: Union[str, torch.device] = "cpu",
    class_vector_cache: Optional[str] = None,
) -> Path:
    """Export the student of a training checkpoint for ``class_names`` (default: its training names).

    The teacher is loaded only for PromptKD, whose class vectors are the teacher's.
    """
    distilled = read_distilled(checkpoint)
    if distilled.source != "checkpoint":
        raise ExportError(f"{checkpoint} is already an export file")
    names = list(class_names) if class_names is not None else distilled.class_names
    if not names:
        raise ExportError(f"{checkpoint}: its class-name file cannot be read; pass the class names")
    templates = _templates(distilled, templates)
    clip = build_backbone(distilled, device=device)
    teacher_vectors = None
    if distilled.learner_kind in TEACHER_SPACE_KINDS:
        teacher_vectors = distilled_teacher_vectors(distilled, names, templates, device=device,
                                                    cache_dir=class_vector_cache)
    learner = rebuild_learner(distilled, clip, class_names=names, templates=templates,
                            teacher_dim=None if teacher_vectors is None else int(teacher_vectors.shape[1]))
    return export_student(
        out, learner, method=distilled.method, student=distilled.student, teacher=distilled.teacher,
        learner_kind=distilled.learner_kind, learner_options=distilled.learner_options, class_names=names,
        templates=templates, teacher_class_vectors=teacher_vectors, include_backbone=include_backbone,
        source={"checkpoint": os.path.abspath(str(checkpoint)), "step": distilled.step},
        prompt_placement=distilled.prompt_placement,
    )


def _placement_of(learner: nn.Module) -> Optional[str]:
    before = getattr(learner, "before_ln_pre", None)
    return None if before is None else ("before_ln_pre" if before else "after_ln_pre")


def teacher_class_vectors_for(
    teacher: dict, class_names: Sequence[str], templates: Sequence[str], *, device="cpu",
    cache_dir: Optional[str] = None, model=None,
) -> torch.Tensor:
    """The teacher's class vectors (C, D_t); ``model`` reuses an already built Teacher (or TunedTeacher)."""
    if isinstance(model, TunedTeacher):
        return tuned_teacher_class_vectors(model, list(class_names))
    if model is None:
        model = build_teacher(teacher["name"], teacher.get("weights"), device=device)
    return teacher_class_vectors(model, get_tokenizer(teacher["name"]), list(class_names), list(templates),
                                 model_name=teacher["name"], weights=teacher.get("weights"), cache_dir=cache_dir,
                                 device=device)


def load_distilled_from_teacher(distilled: DistilledStudent, *, device="cpu") -> TunedTeacher:
    """The tuned teacher a run distilled from (``teacher.prompts``), refused by name when it is gone."""
    prompts = distilled.teacher.get("prompts")
    if not prompts or not os.path.isfile(prompts):
        raise ExportError(
            f"{distilled.path} was distilled from the tuned teacher teacher.prompts={prompts!r}, which cannot be "
            f"read: its class vectors (the ones the student learned) need it. Restore that file, or export for "
            f"the run's own class names, whose vectors are stored with checkpoints written since they were")
    return load_tuned_teacher(prompts, device=device)


def distilled_teacher_vectors(
    distilled: DistilledStudent, class_names: Sequence[str], templates: Sequence[str], *, device="cpu",
    cache_dir: Optional[str] = None, model=None,
) -> torch.Tensor:
    """The class vectors (C, D_t) of the teacher ``distilled`` was trained against, for these names.

    The vectors stored with the run when they are for these names (and, for a plain teacher,
    these templates); else those of the tuned teacher it distilled from (``teacher.prompts``,
    refused naming it when the file is gone); else the plain teacher's. ``model``: that teacher,
    already loaded.
    """
    names = list(class_names)
    stored = distilled.teacher_vectors
    if stored is not None and distilled.teacher_vector_names == names and (
            distilled.teacher_vectors_source == "tuned" or list(templates) == list(distilled.templates or [])):
        return stored.to(device)
    if distilled.teacher.get("prompts"):
        if not isinstance(model, TunedTeacher):
            model = load_distilled_from_teacher(distilled, device=device)
        return tuned_teacher_class_vectors(model, names)
    return teacher_class_vectors_for(distilled.teacher, names, templates, device=device, cache_dir=cache_dir,
                                     model=model)


# ------------------------------------------------------------------------------ loading an export


@dataclass
class LoadedStudent:
    """A student ready to classify: the classifier, its preprocessing and the export's header."""

    classifier: StudentClassifier
    class_names: list[str]
    image_size: int
    image_mean: tuple
    image_std: tuple
    distilled: DistilledStudent

    @property
    def header(self) -> dict:
        return self.distilled.header


def load_export(
    path: Union[str, Path],
    *,
    device: Union[str, torch.device] = "cpu",
    expect_student: Optional[str] = None,
    student_weights: Optional[str] = None,
) -> LoadedStudent:
    """Load an export file for prediction on ``device`` (no teacher involved).

    Raises:
        ExportError: not an export file, another student architecture than ``expect_student``,
            backbone shapes that differ from the recorded ones (another open_clip version),
            another weights file, or learner state / class vectors that do not fit.
    """
    distilled = read_distilled(path)
    if distilled.source != "export":
        raise ExportError(f"{path} is a training checkpoint; export it first (clipdistill export {path} --out FILE)")
    clip = build_backbone(distilled, device=device, expect_student=expect_student, student_weights=student_weights)
    vectors = distilled.class_vectors
    teacher_dim = int(vectors.shape[1]) if distilled.class_vectors_space == "teacher" else None
    learner = rebuild_learner(distilled, clip, class_names=distilled.class_names, teacher_dim=teacher_dim)
    if vectors is not None:
        expected = teacher_dim if teacher_dim is not None else int(clip.visual.output_dim)
        if vectors.dim() != 2 or vectors.shape != (len(distilled.class_names), expected):
            raise ExportError(f"{path}: class vectors of shape {tuple(vectors.shape)}, expected "
                              f"({len(distilled.class_names)}, {expected})")
    classifier = StudentClassifier(learner, vectors, distilled.class_names)
    size, mean, std = student_image_spec(learner)
    return LoadedStudent(classifier, list(distilled.class_names), size, tuple(mean), tuple(std), distilled)


# ------------------------------------------------------------------------------ prediction


def fresh_samples(source: str, *, cache_dir: Optional[str] = None):
    """A SampleList of a folder scanned now, or of a list file or tar shards (:func:`resolve_source`).

    Folders are not taken from the loader's saved lists: images added since a training run
    must be seen by evaluation and prediction.
    """
    if os.path.isdir(source):
        root = os.path.abspath(source)
        paths = scan_folder(root)
        if not paths:
            raise EmptySourceError(f"no images found in folder {source!r}")
        return SampleList(root=root, paths=paths)
    return resolve_source(source, cache_dir=cache_dir)


def image_samples(inputs: Sequence[str], *, cache_dir: Optional[str] = None):
    """A SampleList for files, folders (scanned) and list files, in the order given."""
    def is_image(item: str) -> bool:
        return os.path.isfile(item) and os.path.splitext(item)[1].lower() in IMAGE_EXTENSIONS

    if len(inputs) == 1 and not is_image(inputs[0]):
        return fresh_samples(inputs[0], cache_dir=cache_dir)  # a folder, a list file or tar shards
    paths: list[str] = []
    for item in inputs:
        if os.path.isdir(item):
            root = os.path.abspath(item)
            paths += [os.path.join(root, rel) for rel in scan_folder(root)]
        elif is_image(item):
            paths.append(os.path.abspath(item))
        elif os.path.isfile(item):
            listed = SampleList.load(item)
            paths += [listed.full_path(i) for i in range(len(listed))]
        else:
            raise FileNotFoundError(f"{item!r} is neither an image file, a folder nor a list file")
    if not paths:
        raise ExportError(f"no images found in {list(inputs)}")
    return SampleList(root=os.path.abspath(os.sep), paths=paths)


def predict(
    student: LoadedStudent,
    inputs: Sequence[str],
    *,
    top_k: int = 5,
    batch_size: int = 64,
    backend: str = "torch",
    workers: Optional[int] = None,
    cache_dir: Optional[str] = None,
):
    """Yield one record per image, in input order: ``{"image", "top": [{"class", "index", "score"}]}``.

    Scores are the softmax probabilities over the export's classes (the student's logit
    scale). An image that cannot be read gives ``{"image", "error"}``.
    """
    samples = image_samples(inputs, cache_dir=cache_dir)
    device = student.classifier.device
    loader = ImageLoader(
        samples, global_batch_size=batch_size,
        outputs=[OutputSpec("student", student.image_size, student.image_mean, student.image_std)],
        transform=CenterCrop(), backend=backend, device=device, workers=workers, interpolation="bicubic",
    )
    k = max(1, min(top_k, len(student.class_names)))
    results: dict[int, dict] = {}
    for batch in progress_bar(loader, total=len(loader), desc="predict", unit="batch"):
        rows = batch.mask.nonzero().squeeze(1)
        for reject in batch.rejects:
            results[reject.sample_id] = {"image": reject.location, "error": f"{reject.reason}: {reject.detail}"}
        if rows.numel() == 0:
            continue
        logits = student.classifier(batch.images["student"][rows.to(device)])
        scores, indices = logits.softmax(dim=-1).topk(k, dim=-1)
        for sid, row_scores, row_indices in zip(batch.sample_ids[rows].tolist(), scores.tolist(), indices.tolist()):
            results[sid] = {"image": samples.location(sid), "top": [
                {"class": student.class_names[i], "index": i, "score": s} for s, i in zip(row_scores, row_indices)]}
    for sid in range(len(samples)):
        yield results.get(sid, {"image": samples.location(sid), "error": "not read"})
