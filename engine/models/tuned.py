"""The tuned teacher of PromptKD's first stage: its file, and loading it back frozen.

``clipdistill tune-teacher`` (:mod:`clipdistill.engine.training.tune_teacher`) writes one
``.safetensors`` file, no pickle: the PromptSRC learner's state as tensors and, in the
header's metadata, a JSON document with the teacher's name and weights, the learner's kind and
options, the class names and folders, the templates, the shots drawn, the settings and the
versions.

:func:`load_tuned_teacher` rebuilds the teacher CLIP, builds the learner over it, loads the
tuned state and only then computes class vectors (:meth:`TunedTeacher.class_vectors`, once per
list of names, cached). Computing them from the untuned prompts is the mistake PromptKD's
tracker reports; :meth:`TunedTeacher.encode_text` refuses, so the class-vector cache of a plain
teacher cannot be filled from a tuned one by accident.
"""
from __future__ import annotations

import json
import os
from importlib import metadata
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from clipdistill.engine import __version__
from clipdistill.engine.models.clip import _default_precision, freeze, get_tokenizer, load_clip
from clipdistill.engine.prompts.registry import build_learner

FORMAT = "clipdistill-tuned-teacher/1"
LEARNER_KIND = "promptsrc"
_STATE_PREFIX = "learner/"


def _input_dtype(clip: nn.Module) -> torch.dtype:
    return next(clip.visual.conv1.parameters()).dtype


def _versions() -> dict[str, str]:


    versions = {"clipdistill": __version__, "torch": torch.__version__}
    try:
        versions["open_clip"] = metadata.version("open_clip_torch")
    except metadata.PackageNotFoundError:
        versions["open_clip"] = "unknown"
    return versions


# ------------------------------------------------------------------------------ the file


def save_tuned_teacher(path: Union[str, Path], state: Mapping[str, torch.Tensor], header: Mapping[str, Any]) -> Path:
    """Write the learner ``state`` and the JSON ``header`` to one safetensors file, atomically."""

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"--out {str(path)!r}: the tuned teacher is a .safetensors file; name it so")
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

    freeze(module)
    module.train(False)
    return module


def prompt_placement_of(header: Mapping[str, Any]) -> str:
    """The vision prompts' placement a tuned teacher was tuned with; files written before the
    placement was recorded put them after ln_pre."""
    return header["learner"].get("prompt_placement", "after_ln_pre")


def _options_from_header(header: Mapping[str, Any]) -> dict:
    options = dict(header["learner"]["options"])
    options["templates"] = tuple(header.get("frozen_templates") or header["templates"])
    options["prompt_placement"] = prompt_placement_of(header)
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
