"""Teacher and student CLIP models from open_clip, and the frozen teacher wrapper.

Every engine module gets open_clip through :func:`import_open_clip`, which applies
the CPU-only torchvision measure first and registers the tiny model configs that
ship with the package (``engine/config/models/*.json``) exactly once.

Weights are named by ``weights``: ``None`` (random init, for tests and demos), an
open_clip pretrained tag (``"openai"``, ``"dfn5b"``, ...) resolved through
open_clip's own cache, or a path to a local checkpoint (``.safetensors``, or a
``.pt``/``.pth``/``.bin`` file read with ``torch.load(weights_only=True)``). A model named
``hf-hub:org/repo`` (or ``local-dir:PATH``) reaches open_clip unchanged; its config and its
weights come from that Hugging Face Hub repository (or folder), so ``weights`` stays None.
"""
from __future__ import annotations

import difflib
import os
import pickle
from pathlib import Path
from types import ModuleType
from typing import Optional, Union

import torch
from torch import nn

from clipdistill.engine._torchvision_compat import ensure_torchvision_importable

CONFIG_DIR = Path(__file__).resolve().parents[1] / "config" / "models"
CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
# The tiny configs shipped in engine/configs (a few million parameters, 32 px images, context
# length 16) for tests and the demo; the teacher's embedding (48) differs from the student's (32).
TINY_TEACHER = "clipdistill-tiny-teacher"
TINY_STUDENT = "clipdistill-tiny-student"

_OPEN_CLIP: Optional[ModuleType] = None


def import_open_clip() -> ModuleType:
    """Import open_clip (after the torchvision compatibility measure) with our configs registered."""
    global _OPEN_CLIP
    if _OPEN_CLIP is None:
        ensure_torchvision_importable()
        import open_clip

        open_clip.add_model_config(CONFIG_DIR)
        _OPEN_CLIP = open_clip
    return _OPEN_CLIP


def list_model_names() -> list[str]:
    """All model names open_clip knows, including the tiny configs shipped here."""
    return list(import_open_clip().list_models())


def shipped_model_names() -> list[str]:
    """Names of the configs shipped with clipdistill (tiny models for tests and the demo)."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


# open_clip's prefixes of a model whose config and weights come with it: a Hugging Face Hub
# repository (hf-hub:org/repo) or a local folder (local-dir:/path).
HF_HUB_PREFIX = "hf-hub:"
LOCAL_DIR_PREFIX = "local-dir:"


def _schema(model_name: str) -> Optional[str]:
    return next((p for p in (HF_HUB_PREFIX, LOCAL_DIR_PREFIX) if model_name.startswith(p)), None)


def _check_model_name(model_name: str) -> str:
    """The name open_clip receives: OpenAI's spelling ``ViT-B/32`` becomes ``ViT-B-32``; an
    ``hf-hub:org/repo`` or ``local-dir:PATH`` name passes through unchanged (open_clip reads its
    config, and weights, from there)."""
    open_clip = import_open_clip()
    schema = _schema(model_name)
    if schema is not None:
        where = model_name[len(schema):]
        if not where.strip("/"):
            raise ValueError(f"model name {model_name!r} names nothing after {schema!r}; write hf-hub:org/repo "
                             f"or local-dir:/path/to/folder")
        if schema == LOCAL_DIR_PREFIX and not os.path.isdir(where):
            raise FileNotFoundError(f"model folder {where!r} of {model_name!r} does not exist")
        return model_name
    cleaned = model_name.replace("/", "-")
    if open_clip.get_model_config(cleaned) is None:
        known = open_clip.list_models()
        close = difflib.get_close_matches(cleaned, known, n=5, cutoff=0.5)
        hint = f" Did you mean one of {close}?" if close else ""
        raise ValueError(
            f"unknown model name {model_name!r}.{hint} Known names come from open_clip's configs "
            f"and clipdistill's own ({', '.join(shipped_model_names())}); to use another "
            f"architecture, register its JSON config with open_clip.add_model_config(path) first."
        )
    return cleaned


def check_model(model_name: str, weights: Optional[str] = None) -> None:
    """Check a model name and its weights without building, reading or downloading anything.

    Raises what :func:`load_clip` would raise for them, before any weights are read: ValueError
    (an unknown name, a tag the model does not have), FileNotFoundError (a missing checkpoint file).
    """
    _resolve_weights(model_name, _check_model_name(model_name), None if weights is None else str(weights))


def _looks_like_path(weights: str) -> bool:
    return (
        weights.lower().endswith(CHECKPOINT_SUFFIXES)
        or os.sep in weights
        or (os.altsep is not None and os.altsep in weights)
        or weights.startswith(".")
    )


def _default_precision(device: torch.device) -> str:
    return "fp32" if device.type == "cpu" else "bf16"


def load_clip(
    model_name: str,
    weights: Optional[str] = None,
    *,
    device: Union[str, torch.device] = "cpu",
    precision: str = "fp32",
    cache_dir: Optional[str] = None,
) -> nn.Module:
    """Build an open_clip model and load its weights.

    Args:
        model_name: an open_clip architecture name (``"ViT-B-32"``, ``"clipdistill-tiny-student"``).
        weights: ``None`` for random init, a pretrained tag known to open_clip for this model,
            or a path to a local ``.safetensors`` / ``.pt`` checkpoint (read with weights_only).
        device: where the model lives.
        precision: open_clip precision: ``"fp32"``, ``"bf16"`` (weights in bf16, LayerNorm in
            fp32, as open_clip does for OpenAI's models), ``"fp16"``, ``"pure_bf16"``.
        cache_dir: open_clip's download cache for pretrained tags.

    Returns:
        the open_clip model (``CLIP`` or ``CustomTextCLIP``), in eval mode.

    Raises:
        ValueError: unknown model name or unknown pretrained tag.
        FileNotFoundError: a checkpoint path that does not exist.
        RuntimeError: weights for a tag are neither cached nor downloadable, or a checkpoint
            that does not fit the architecture or holds more than tensors.
    """
    name = _check_model_name(model_name)
    device = torch.device(device)
    weights = None if weights is None else str(weights)
    pretrained = _resolve_weights(model_name, name, weights)
    model = _create_model(model_name, name, weights, pretrained, device=device, precision=precision,
                          cache_dir=cache_dir)
    model.eval()
    return model


def _resolve_weights(model_name: str, name: str, weights: Optional[str]) -> Optional[str]:
    """What open_clip's ``pretrained`` receives: None (random init), an existing checkpoint path, or a
    pretrained tag of ``name``. Checked here so that a typo fails before any weights are read."""
    if weights is None:
        return None
    if _schema(name) is not None:  # open_clip would ignore them
        raise ValueError(f"{model_name!r} brings its own weights (open_clip reads them from there); give no "
                         f"weights for it, not {weights!r}")
    if os.path.isfile(weights):
        return weights
    if _looks_like_path(weights):
        raise FileNotFoundError(
            f"checkpoint file {weights!r} for model {model_name!r} does not exist. Pass the path "
            f"of a .safetensors or .pt state dict, a pretrained tag of this model, or "
            f"weights=None for a random-init model."
        )
    tags = import_open_clip().list_pretrained_tags_by_model(name)
    if weights not in tags:
        raise ValueError(
            f"{weights!r} is neither a checkpoint file nor a pretrained tag of {model_name!r}. "
            f"Tags open_clip knows for it: {tags or 'none'}."
        )
    return weights


def _create_model(model_name: str, name: str, weights: Optional[str], pretrained: Optional[str], *,
                  device: torch.device, precision: str, cache_dir: Optional[str]) -> nn.Module:
    """open_clip's model with its weights read (local files with weights_only), open_clip's
    errors turned into ones that say what to do."""
    try:
        return import_open_clip().create_model(
            name,
            pretrained=pretrained,
            precision=precision,
            device=device,
            cache_dir=cache_dir,
            weights_only=True,
        )
    except pickle.UnpicklingError as error:
        raise RuntimeError(
            f"{weights!r} holds Python objects besides tensors, and clipdistill reads .pt files "
            f"with torch.load(weights_only=True) only. Re-save just the state dict "
            f"(torch.save(model.state_dict(), path)) or convert it to .safetensors."
        ) from error
    except (RuntimeError, AssertionError) as error:
        # open_clip reports a shape mismatch as a RuntimeError or, while resizing position
        # embeddings, an AssertionError.
        if pretrained is not None and not os.path.isfile(pretrained) and "download" in str(error).lower():
            raise RuntimeError(
                f"weights {weights!r} for {model_name!r} are not in the local cache and could not be "
                f"downloaded (no network?). Either run once where the network is reachable to fill "
                f"the cache (cache_dir={cache_dir or 'default HF/open_clip cache'}), or download the "
                f"checkpoint elsewhere and pass its local path as weights."
            ) from error
        if pretrained is not None and os.path.isfile(pretrained):
            raise RuntimeError(
                f"checkpoint {pretrained!r} does not fit model {model_name!r}: {error}. Check that "
                f"the file was saved from this architecture."
            ) from error
        raise


def freeze(module: nn.Module) -> nn.Module:
    """Turn off requires_grad for every parameter of ``module`` (in place) and return it."""
    for parameter in module.parameters():
        parameter.requires_grad_(False)
    return module


class Teacher(nn.Module):
    """A frozen CLIP: no parameter requires grad, eval mode survives ``train()``, runs under no_grad.

    The wrapped model keeps whatever precision it was loaded in (bf16 on a GPU by
    :func:`build_teacher`); features come back in float32 so that losses are computed in
    full precision.
    """

    def __init__(self, model: nn.Module, *, model_name: Optional[str] = None, weights: Optional[str] = None):
        super().__init__()
        self.model = freeze(model)
        self.model.eval()
        # What it was built from (set by build_teacher): the class-vector cache's key.
        self.model_name = model_name
        self.weights = weights

    def train(self, mode: bool = True) -> "Teacher":
        # A teacher in train mode would apply patch dropout or dropout; refuse quietly.
        return super().train(False)

    @property
    def input_dtype(self) -> torch.dtype:
        """The dtype images are cast to: that of the first layer's weights (bf16 under open_clip's
        mixed scheme, where embeddings and norms stay float32)."""
        visual = self.model.visual
        first_layer = visual.conv1 if hasattr(visual, "conv1") else next(visual.modules())
        return next(first_layer.parameters()).dtype

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.model.logit_scale.detach().float().exp()

    @torch.no_grad()
    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """images (B, 3, H, W) -> features (B, D) float32, L2-normalized unless asked otherwise."""
        features = self.model.encode_image(images.to(self.input_dtype)).float()
        return nn.functional.normalize(features, dim=-1) if normalize else features

    @torch.no_grad()
    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """tokens (N, L) int64 -> features (N, D) float32, L2-normalized unless asked otherwise."""
        features = self.model.encode_text(tokens).float()
        return nn.functional.normalize(features, dim=-1) if normalize else features

    @torch.no_grad()
    def logits(self, images: torch.Tensor, class_vectors: torch.Tensor, logit_scale: torch.Tensor | float) -> torch.Tensor:
        """images (B, 3, H, W), class_vectors (C, D) normalized -> logits (B, C) float32.

        KDPL scores the teacher with the student's logit scale, so the scale is an argument.
        """
        return float(logit_scale) * self.encode_image(images) @ class_vectors.float().t()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.encode_image(images)


def build_teacher(
    model_name: str,
    weights: Optional[str],
    *,
    device: Union[str, torch.device] = "cpu",
    precision: Optional[str] = None,
    cache_dir: Optional[str] = None,
) -> Teacher:
    """Load a teacher and freeze it: bf16 (open_clip's mixed scheme) on a GPU, fp32 on the CPU."""
    device = torch.device(device)
    model = load_clip(
        model_name, weights, device=device, precision=precision or _default_precision(device), cache_dir=cache_dir
    )
    return Teacher(model, model_name=model_name, weights=None if weights is None else str(weights))


def build_student(
    model_name: str,
    weights: Optional[str],
    *,
    device: Union[str, torch.device] = "cpu",
    precision: str = "fp32",
    cache_dir: Optional[str] = None,
) -> nn.Module:
    """Load a student backbone with every weight frozen; a prompt learner adds what trains."""
    return freeze(load_clip(model_name, weights, device=device, precision=precision, cache_dir=cache_dir))


def get_tokenizer(model_name: str):
    """open_clip's tokenizer for ``model_name`` (works offline: the BPE vocabulary ships with open_clip)."""
    return import_open_clip().get_tokenizer(_check_model_name(model_name))
