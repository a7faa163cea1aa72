"""``clipdistill tune-teacher``: PromptKD's first stage, and loading the tuned teacher back.

    clipdistill tune-teacher --teacher NAME [--weights W] --data FOLDER [--class-names FILE]
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

import argparse
import json
import os
import sys
import time
import zlib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

FORMAT = "clipdistill-tuned-teacher/1"
ON_SHORT_CLASS = ("error", "use-all", "skip")
LEARNER_KIND = "promptsrc"
_STATE_PREFIX = "learner/"


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
    from clipdistill.engine.evaluate import scan_labeled_folder

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

    ``gpa_mean`` None puts the Gaussian's mean at 0.75 of the epochs (PromptSRC: 15 of 20);
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
    gpa_mean: Optional[float] = None
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
        if not self.gpa_std > 0:
            problems.append(f"gpa_std must be > 0 (got {self.gpa_std})")
        if problems:
            raise TuneTeacherInputError("tune-teacher settings: " + "; ".join(problems))


def _loss_weights(settings: TuneSettings) -> dict[str, float]:
    from clipdistill.engine.prompts import PROMPTSRC_LOSS_WEIGHTS

    weights = dict(PROMPTSRC_LOSS_WEIGHTS if settings.loss_weights is None else settings.loss_weights)
    unknown = set(weights) - set(PROMPTSRC_LOSS_WEIGHTS)
    if unknown:
        raise TuneTeacherInputError(f"loss_weights has unknown parts {sorted(unknown)}; known: "
                                    f"{sorted(PROMPTSRC_LOSS_WEIGHTS)}")
    return weights


def _learner_options(clip: nn.Module, options: Optional[Mapping[str, Any]], templates: Sequence[str]) -> dict:
    """PromptSRC's keyword arguments, with depths checked against the towers (naming the flag)."""
    from clipdistill.engine.towers import TextTower

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


def _input_dtype(clip: nn.Module) -> torch.dtype:
    return next(clip.visual.conv1.parameters()).dtype


def _versions() -> dict[str, str]:
    from importlib import metadata

    from clipdistill.engine import __version__

    versions = {"clipdistill": __version__, "torch": torch.__version__}
    try:
        versions["open_clip"] = metadata.version("open_clip_torch")
    except metadata.PackageNotFoundError:
        versions["open_clip"] = "unknown"
    return versions


# ------------------------------------------------------------------------------ the file


def save_tuned_teacher(path: Union[str, Path], state: Mapping[str, torch.Tensor], header: Mapping[str, Any]) -> Path:
    """Write the learner ``state`` and the JSON ``header`` to one safetensors file, atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise TuneTeacherInputError(f"--out {str(path)!r}: the tuned teacher is a .safetensors file; name it so")
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {_STATE_PREFIX + k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    metadata = {"format": FORMAT, "header": json.dumps(dict(header), ensure_ascii=False, allow_nan=False)}
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)
    return path


def read_tuned_header(path: Union[str, Path]) -> dict:
    """The JSON header of a tuned-teacher file (teacher, learner, class names, ...), no tensors read.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not a tuned teacher written by :func:`tune_teacher`.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"tuned teacher file {str(path)!r} does not exist")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except Exception as exc:  # safetensors raises its own error types on garbled files
        raise ValueError(f"{path} is not a readable safetensors file ({exc})") from exc
    if metadata.get("format") != FORMAT:
        raise ValueError(f"{path} is not a tuned teacher from 'clipdistill tune-teacher' "
                         f"(format {metadata.get('format')!r}, expected {FORMAT!r})")
    return json.loads(metadata["header"])


def _read_tuned(path: Union[str, Path]) -> tuple[dict, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    header = read_tuned_header(path)
    tensors = load_file(str(path))
    state = {k[len(_STATE_PREFIX):]: v for k, v in tensors.items() if k.startswith(_STATE_PREFIX)}
    return header, state


# ------------------------------------------------------------------------------ the tuned teacher


class TunedTeacher(nn.Module):
    """A frozen teacher with its tuned PromptSRC prompts: the interface of
    :class:`clipdistill.engine.models.Teacher`, plus the tuned class vectors.

    Every weight is frozen, eval mode survives ``train()``, features come under no_grad in
    float32. ``model`` is the open_clip model (``model.visual.image_size``, ``output_dim``,
    ``image_mean``/``image_std``). Build it with :func:`load_tuned_teacher`.
    """

    def __init__(self, learner: nn.Module, header: Mapping[str, Any], source: Optional[str] = None):
        super().__init__()
        from clipdistill.engine.models import freeze

        self.learner = freeze(learner)
        self.learner.train(False)
        self.header = dict(header)
        self.source = source
        self._class_vectors: dict[tuple[tuple[str, ...], torch.device], torch.Tensor] = {}

    # -- what the engine reads ---------------------------------------------------------------
    @property
    def model(self) -> nn.Module:
        return self.learner.clip

    @property
    def model_name(self) -> str:
        return self.header["teacher"]["name"]

    @property
    def class_names(self) -> list[str]:
        """The names the teacher was tuned on."""
        return list(self.header["class_names"])

    def train(self, mode: bool = True) -> "TunedTeacher":
        return super().train(False)

    @property
    def input_dtype(self) -> torch.dtype:
        return _input_dtype(self.model)

    @property
    def device(self) -> torch.device:
        return self.model.logit_scale.device

    @property
    def logit_scale(self) -> torch.Tensor:
        """The teacher's own logit scale, exp'd, float32 (prompt tuning does not change it)."""
        return self.model.logit_scale.detach().float().exp()

    @torch.no_grad()
    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """images (B, 3, H, W) -> (B, D) float32 through the tuned vision prompts, L2-normalized
        unless asked otherwise."""
        features = self.learner.encode_image(images.to(self.input_dtype)).float()
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        raise TypeError(
            "a tuned teacher's class vectors come from its learned text prompts, not from token ids: "
            "call tuned_teacher_class_vectors(teacher, class_names) (or teacher.class_vectors(names)); "
            "encoding plain prompts would give the untuned teacher's vectors"
        )

    @torch.no_grad()
    def class_vectors(self, class_names: Optional[Sequence[str]] = None, *, batch_size: int = 1024) -> torch.Tensor:
        """(C, D) float32 L2-normalized class features from the tuned prompts, on the teacher's device.

        ``class_names`` None: the names the teacher was tuned on. Other names work too (the
        learned context is shared by all classes). Computed once per list of names and device,
        then cached; ``batch_size`` names are encoded per call.
        """
        names = tuple(self.class_names if class_names is None else (str(n) for n in class_names))
        if not names:
            raise ValueError("class_names is empty")
        key = (names, self.device)
        if key not in self._class_vectors:
            learner = self.learner if list(names) == self.class_names else self._learner_for(names)
            chunks = []
            for start in range(0, len(names), batch_size):
                index = torch.arange(start, min(start + batch_size, len(names)), device=self.device)
                chunks.append(learner.class_features(index).float())
            self._class_vectors[key] = F.normalize(torch.cat(chunks), dim=-1)
        return self._class_vectors[key]

    def _learner_for(self, names: Sequence[str]) -> nn.Module:
        """A PromptSRC learner over the same frozen CLIP for other names, with the tuned state."""
        from clipdistill.engine.models import get_tokenizer
        from clipdistill.engine.prompts import build_learner

        options = _options_from_header(self.header)
        with torch.random.fork_rng(devices=[]):  # initial prompts are drawn, then overwritten
            learner = build_learner(LEARNER_KIND, self.model, tokenizer=get_tokenizer(self.model_name),
                                    class_names=list(names), **options)
        learner.load_saved_state(self.learner.state_to_save())
        return _freeze_eval(learner)

    @torch.no_grad()
    def logits(self, images: torch.Tensor, class_vectors: torch.Tensor,
               logit_scale: torch.Tensor | float) -> torch.Tensor:
        """images (B, 3, H, W), class_vectors (C, D) normalized -> logits (B, C) float32."""
        return float(logit_scale) * self.encode_image(images) @ class_vectors.float().t()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.encode_image(images)


def _freeze_eval(module: nn.Module) -> nn.Module:
    from clipdistill.engine.models import freeze

    freeze(module)
    module.train(False)
    return module


def _options_from_header(header: Mapping[str, Any]) -> dict:
    options = dict(header["learner"]["options"])
    options["templates"] = tuple(header["templates"])
    return options


def load_tuned_teacher(
    path: Union[str, Path],
    *,
    device: Union[str, torch.device] = "cpu",
    precision: Optional[str] = None,
    weights: Optional[str] = None,
    cache_dir: Optional[str] = None,
) -> TunedTeacher:
    """Rebuild a teacher tuned by :func:`tune_teacher`, frozen, with its prompts loaded.

    Args:
        path: the ``.safetensors`` file ``tune-teacher --out`` wrote.
        device: where the teacher lives.
        precision: open_clip precision of the backbone; None: bf16 on a GPU, fp32 on the CPU
            (as :func:`clipdistill.engine.models.build_teacher`).
        weights: the teacher's weights when they are no longer where the file says (a moved
            checkpoint); None uses the file's.
        cache_dir: open_clip's download cache for pretrained tags.

    Returns:
        a :class:`TunedTeacher`; its class vectors are computed from the loaded prompts on
        first use.

    Raises:
        FileNotFoundError, ValueError: no such file, not a tuned teacher, or a weights file
            that is not the one the prompts were tuned on (its size differs).
    """
    from clipdistill.engine.models import _default_precision, get_tokenizer, load_clip
    from clipdistill.engine.prompts import build_learner

    header, state = _read_tuned(path)
    teacher = header["teacher"]
    weights = teacher.get("weights") if weights is None else weights
    size = teacher.get("weights_size")
    if weights is not None and size is not None and os.path.isfile(weights) and os.path.getsize(weights) != size:
        raise ValueError(
            f"{path}: the prompts were tuned on teacher weights of {size} bytes ({teacher.get('weights')}), "
            f"but {weights} has {os.path.getsize(weights)}; pass the weights the teacher was tuned with"
        )
    device = torch.device(device)
    # Building the learner draws its (overwritten) initial prompts: keep the caller's RNG stream intact.
    with torch.random.fork_rng(devices=[]):
        if weights is None and teacher.get("init_seed") is not None:
            torch.manual_seed(int(teacher["init_seed"]))  # the random-init teacher tune_teacher drew
        clip = load_clip(teacher["name"], weights, device=device,
                         precision=precision or _default_precision(device), cache_dir=cache_dir)
        learner = build_learner(header["learner"]["kind"], clip, tokenizer=get_tokenizer(teacher["name"]),
                                class_names=header["class_names"], **_options_from_header(header))
    learner.load_saved_state(state)
    learner.to(device)
    return TunedTeacher(learner, header, source=str(path))


def tuned_teacher_class_vectors(tuned: TunedTeacher, class_names: Optional[Sequence[str]] = None) -> torch.Tensor:
    """The tuned teacher's class vectors (C, D) float32, normalized, on its device.

    What a builder calls for PromptKD after :func:`load_tuned_teacher` (never the plain
    teacher's class-vector cache: those vectors would ignore the tuned prompts). Computed
    once per list of names and cached in ``tuned``.
    """
    if not isinstance(tuned, TunedTeacher):
        raise TypeError(f"expected a TunedTeacher from load_tuned_teacher, got {type(tuned).__name__}")
    return tuned.class_vectors(class_names)


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
    from clipdistill.engine.evaluate import scan_labeled_folder
    from clipdistill.engine.train import _image_preprocess
    from clipdistill.loaders.loader import ImageLoader, OutputSpec
    from clipdistill.loaders.views import CenterCrop

    folder = scan_labeled_folder(data, class_names)
    if len(folder.class_names) != class_vectors.shape[0]:
        raise ValueError(f"{len(folder.class_names)} classes in {data} but {class_vectors.shape[0]} class vectors")
    size, mean, std = _image_preprocess(teacher.model)
    device = teacher.model.logit_scale.device
    loader = ImageLoader(folder.samples, global_batch_size=batch_size, outputs=[OutputSpec("teacher", size, mean, std)],
                         transform=CenterCrop(), backend=backend, device=device, workers=workers,
                         interpolation="bicubic")
    scale = float(teacher.logit_scale)
    return _top1(lambda x: teacher.logits(x, class_vectors, scale), loader, torch.from_numpy(folder.labels), "teacher")


def tune_teacher(
    teacher: str,
    weights: Optional[str],
    data: Union[str, Path],
    *,
    out: Union[str, Path],
    class_names: Union[str, Path, Sequence[str], None] = None,
    templates: Union[str, Sequence[str]] = "imagenet",
    learner_options: Optional[Mapping[str, Any]] = None,
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
        templates: a shipped template set name, a file, or a list of templates; PromptSRC
            regularizes its class features towards the frozen model's features of these.
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
    from clipdistill.engine.models import _default_precision, get_tokenizer, load_clip
    from clipdistill.engine.prompts import GaussianPromptAggregator, build_learner
    from clipdistill.engine.train import _image_preprocess, lr_at, read_templates, resolve_device
    from clipdistill.loaders.loader import ImageLoader, OutputSpec
    from clipdistill.loaders.views import RandomResizedCrop

    started = time.perf_counter()
    settings.check()
    loss_weights = _loss_weights(settings)
    if Path(out).suffix != ".safetensors":
        raise TuneTeacherInputError(f"--out {str(out)!r}: the tuned teacher is a .safetensors file; name it so")
    template_list = read_templates(templates) if isinstance(templates, (str, Path)) else list(templates)
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
    options = _learner_options(clip, learner_options, template_list)
    learner = build_learner(LEARNER_KIND, clip, tokenizer=get_tokenizer(teacher), class_names=shots.class_names,
                            **options).to(device)
    params = list(learner.trainable_parameters().values())
    if not params:
        raise TuneTeacherInputError("the PromptSRC learner has nothing to train (prompt lengths or depths are 0)")
    log(f"tune-teacher: {teacher} ({weights}), {len(shots.class_names)} classes x {settings.shots} shots "
        f"= {len(shots.labels)} images, {sum(p.numel() for p in params)} prompt parameters, device {device}")

    size, mean, std = _image_preprocess(clip)
    backend = settings.backend
    if backend == "auto" and device.type == "cpu":
        backend = "torch"
    loader = ImageLoader(
        shots.samples, global_batch_size=settings.batch_size, outputs=[OutputSpec("teacher", size, mean, std)],
        transform=RandomResizedCrop(scale=(settings.min_scale, 1.0)), seed=settings.seed, backend=backend,
        device=device, workers=settings.workers, interpolation=settings.interpolation,
    )
    labels_all = torch.from_numpy(shots.labels)
    optimizer = torch.optim.SGD(params, lr=settings.lr, momentum=settings.momentum,
                                weight_decay=settings.weight_decay)
    steps_per_epoch = len(loader)
    total_steps = settings.epochs * steps_per_epoch
    gpa_mean = settings.gpa_mean if settings.gpa_mean is not None else 0.75 * settings.epochs
    aggregator = GaussianPromptAggregator(settings.epochs, mean=gpa_mean, std=settings.gpa_std)
    input_dtype = _input_dtype(clip)

    step, losses = 0, {}
    learner.train()
    for epoch in range(1, settings.epochs + 1):
        sums: dict[str, torch.Tensor] = {}
        batches = 0
        for batch in loader:
            rows = batch.mask.nonzero().squeeze(1)  # the mask is on the CPU: no device sync
            if rows.numel():
                images = batch.images["teacher"][rows.to(device)].to(input_dtype)
                labels = labels_all[batch.sample_ids[rows]].to(device)
                output = learner(images)
                parts = {"ce": F.cross_entropy(output.logits.float(), labels)}
                for name, value in learner.self_regularization(images, output).items():
                    if loss_weights.get(name, 0.0):
                        parts[name] = loss_weights[name] * value.float()
                loss = torch.stack(list(parts.values())).sum()
                for group in optimizer.param_groups:
                    group["lr"] = lr_at(step, base_lr=settings.lr, total_steps=total_steps,
                                        warmup_steps=settings.warmup_epochs * steps_per_epoch,
                                        warmup_lr=settings.warmup_lr, schedule="cosine")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                parts["loss"] = loss
                for name, value in parts.items():
                    sums[name] = sums[name] + value.detach() if name in sums else value.detach().clone()
                batches += 1
            step += 1
        # One synchronization per epoch: the mean losses, checked for NaN/Inf.
        losses = {name: float(value) / max(batches, 1) for name, value in sums.items()}
        if not all(np.isfinite(v) for v in losses.values()):
            raise RuntimeError(f"tune-teacher: non-finite loss in epoch {epoch} ({losses}); lower --lr")
        aggregator.add(learner.state_to_save(), epoch)
        log(f"tune-teacher: epoch {epoch}/{settings.epochs} "
            + " ".join(f"{k} {v:.4f}" for k, v in losses.items()))
    learner.load_saved_state(aggregator.result())
    learner.eval()

    header = {
        "teacher": {"name": teacher, "weights": weights_path, "init_seed": settings.seed if weights is None else None,
                    "weights_size": os.path.getsize(weights_path) if weights_path and os.path.isfile(weights_path)
                    else None},
        "learner": {"kind": LEARNER_KIND, "options": {k: v for k, v in options.items() if k != "templates"}},
        "class_names": shots.class_names,
        "folders": shots.folders,
        "templates": template_list,
        "data": os.path.abspath(os.fspath(data)),
        "shots": {"per_class": shots.per_class, "skipped": shots.skipped, "short": shots.short,
                  "files": list(shots.samples.paths)},
        "settings": {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in asdict(settings).items()},
        "loss_weights": loss_weights,
        "gpa_mean": gpa_mean,
        "precision": precision,
        "losses": losses,
        "versions": _versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
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
    from clipdistill.engine.models import Teacher

    frozen_vectors = learner.frozen.get(learner.clip, None)
    before = labeled_accuracy(Teacher(learner.clip), frozen_vectors, eval_data, class_names)
    tuned = load_tuned_teacher(path, device=device, precision=precision)
    after = labeled_accuracy(tuned, tuned.class_vectors(), eval_data, class_names)
    log(f"tune-teacher: top-1 on {eval_data}: zero-shot {before:.2f}%, tuned {after:.2f}%")
    return {"data": str(eval_data), "zero_shot_top1": before, "tuned_top1": after}


# ------------------------------------------------------------------------------ CLI


def _cmd_tune_teacher(args: argparse.Namespace) -> int:
    learner_options = {"n_text_ctx": args.n_ctx, "text_depth": args.depth,
                       "n_vision_ctx": args.n_ctx if args.n_vision_ctx is None else args.n_vision_ctx,
                       "vision_depth": args.depth if args.vision_depth is None else args.vision_depth}
    if args.init_words is not None:
        learner_options["init_words"] = args.init_words or None
    settings = TuneSettings(
        shots=args.shots, seed=args.seed, on_short_class=args.on_short_class, epochs=args.epochs, lr=args.lr,
        batch_size=args.batch_size, warmup_epochs=args.warmup_epochs, gpa_mean=args.gpa_mean,
        backend=args.backend, workers=args.workers,
    )
    try:
        result = tune_teacher(
            args.teacher, args.weights, args.data, out=args.out, class_names=args.class_names,
            templates=args.templates, learner_options=learner_options, settings=settings, device=args.device,
            precision=args.precision, eval_data=args.eval_data, log=lambda m: print(m, file=sys.stderr, flush=True),
        )
    except (ValueError, FileNotFoundError) as exc:  # TuneTeacherInputError, ConfigError, EvalInputError
        print(f"clipdistill tune-teacher: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result.as_dict()))
    return 0


def register(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "tune-teacher", help="prompt-tune a teacher with PromptSRC on a few labeled images (PromptKD stage 1)",
        description="Prompt-tune a frozen CLIP teacher with PromptSRC (deep text and vision prompts) on N labeled "
                    "images per class, and save the prompts to one .safetensors file that 'distill' can load.",
    )
    parser.add_argument("--teacher", required=True, help="open_clip model name of the teacher")
    parser.add_argument("--weights", default=None, help="pretrained tag or checkpoint file (default: random init)")
    parser.add_argument("--data", required=True, help="labeled folder: one subfolder of images per class")
    parser.add_argument("--class-names", default=None,
                        help="one class name per line, in label order ('folder<TAB>name' maps a folder); "
                             "default: the folder names")
    parser.add_argument("--shots", type=int, default=16, help="images per class (default 16)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the shot draw and the training (default 1)")
    parser.add_argument("--on-short-class", choices=ON_SHORT_CLASS, default="error",
                        help="a class with fewer than --shots images: refuse (default), use all its images, or skip it")
    parser.add_argument("--templates", default="imagenet",
                        help="template set name or file for PromptSRC's frozen class features (default imagenet)")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--lr", type=float, default=0.0025)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--warmup-epochs", type=int, default=1, help="epochs at lr 1e-5 before the cosine schedule")
    parser.add_argument("--gpa-mean", type=float, default=None,
                        help="epoch at the centre of the Gaussian prompt aggregation (default 0.75 x epochs)")
    parser.add_argument("--n-ctx", type=int, default=4, help="text prompt tokens (default 4)")
    parser.add_argument("--n-vision-ctx", type=int, default=None, help="vision prompt tokens (default: --n-ctx)")
    parser.add_argument("--depth", type=int, default=9, help="text prompt depth in layers (default 9)")
    parser.add_argument("--vision-depth", type=int, default=None, help="vision prompt depth (default: --depth)")
    parser.add_argument("--init-words", default=None, help="text context initialization (default 'a photo of a')")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default=None, help="backbone precision (default bf16 on a GPU, fp32 on the CPU)")
    parser.add_argument("--backend", default="auto", help="image loader backend: auto, torch, dali-cpu, dali-gpu")
    parser.add_argument("--workers", type=int, default=None, help="image decoding workers")
    parser.add_argument("--eval-data", default=None,
                        help="held-out labeled folder with the same classes: report top-1 before and after")
    parser.add_argument("--out", required=True, help="the .safetensors file to write")
    parser.set_defaults(func=_cmd_tune_teacher)
    return parser


__all__ = [
    "FORMAT", "ON_SHORT_CLASS", "TuneTeacherInputError", "ShotSelection", "draw_shots", "TuneSettings",
    "TuneResult", "tune_teacher", "TunedTeacher", "load_tuned_teacher", "tuned_teacher_class_vectors",
    "read_tuned_header", "save_tuned_teacher", "labeled_accuracy", "register",
]
