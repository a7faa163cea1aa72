"""Class vectors: text features of class names x templates, computed once and cached on disk.

A class vector is the L2-normalized mean over templates of the L2-normalized text features
of ``template.format(name)`` (CLIP's zero-shot recipe). They are computed in batches under
no_grad, in float32, and stored as a pair of files:

- ``<stem>.safetensors``: one tensor ``class_vectors`` (C, D) float32, with the key's digest
  in the file's metadata;
- ``<stem>.json``: the key — model name, weights (for a local file: its path, size and
  modification time), the class names and the templates, in order.

A cache is used only when its key equals the requested one; a file made for other names,
templates or weights is refused with the first difference named, never silently reused.
In a cache directory the stem is derived from the key's digest, so different keys never
share files; with an explicit path the user chose the file, and a mismatch is an error.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from clipdistill.engine.progress import progress_bar
from clipdistill.engine.templates import check_templates

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
TENSOR_NAME = "class_vectors"

Tokenizer = Callable[[Sequence[str]], torch.Tensor]
TextEncoder = Callable[[torch.Tensor], torch.Tensor]


class ClassVectorKeyMismatch(ValueError):
    """A class-vector cache exists but was made for another model, weights, names or templates."""


def weights_fingerprint(weights: Optional[str]) -> Optional[str]:
    """How the key names the weights: a tag as is; a local file by path, size and mtime."""
    if weights is None:
        return None
    if os.path.isfile(weights):
        stat = os.stat(weights)
        return f"file:{os.path.abspath(weights)}:{stat.st_size}:{stat.st_mtime_ns}"
    return str(weights)


@dataclass(frozen=True)
class ClassVectorKey:
    """What a set of class vectors was computed from."""

    model: str
    weights: Optional[str]
    names: tuple[str, ...]
    templates: tuple[str, ...]

    @classmethod
    def make(cls, model: str, weights: Optional[str], names: Sequence[str], templates: Sequence[str]) -> "ClassVectorKey":
        return cls(model, weights_fingerprint(weights), tuple(names), tuple(templates))

    def to_json(self) -> dict:
        return {"format": FORMAT_VERSION, **{k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}}

    @classmethod
    def from_json(cls, data: dict) -> "ClassVectorKey":
        return cls(data["model"], data["weights"], tuple(data["names"]), tuple(data["templates"]))

    def digest(self) -> str:
        canonical = json.dumps(self.to_json(), sort_keys=True, ensure_ascii=False, separators=(",", ":"))
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()

    def difference(self, other: "ClassVectorKey") -> Optional[str]:
        """A readable description of the first field where ``other`` differs, or None."""
        for field in ("model", "weights"):
            if getattr(self, field) != getattr(other, field):
                return f"{field}: cache has {getattr(other, field)!r}, wanted {getattr(self, field)!r}"
        for field in ("names", "templates"):
            mine, theirs = getattr(self, field), getattr(other, field)
            if mine != theirs:
                if len(mine) != len(theirs):
                    return f"{field}: cache has {len(theirs)}, wanted {len(mine)}"
                index = next(i for i, (a, b) in enumerate(zip(mine, theirs)) if a != b)
                return f"{field}[{index}]: cache has {theirs[index]!r}, wanted {mine[index]!r}"
        return None


@torch.no_grad()
def encode_class_names(
    encode_text: TextEncoder,
    tokenizer: Tokenizer,
    class_names: Sequence[str],
    templates: Sequence[str],
    *,
    batch_size: int = 1024,
    device: Union[str, torch.device, None] = None,
) -> torch.Tensor:
    """Class vectors (C, D) float32, L2-normalized, on ``device``.

    ``encode_text`` maps token ids (N, L) to features (N, D) (a model's ``encode_text``,
    or a :class:`~clipdistill.engine.models.Teacher`'s). Texts are encoded ``batch_size``
    at a time, whole classes per batch so that the template average needs no second pass.
    """
    check_templates(templates)
    if not class_names:
        raise ValueError("class_names is empty")
    per_batch = max(1, batch_size // len(templates))
    vectors = []
    starts = range(0, len(class_names), per_batch)
    for start in progress_bar(starts, desc="class vectors", unit="batch", leave=False):
        names = class_names[start : start + per_batch]
        tokens = tokenizer([t.format(name) for name in names for t in templates])
        if device is not None:
            tokens = tokens.to(device)
        features = F.normalize(encode_text(tokens).float(), dim=-1)
        features = features.view(len(names), len(templates), -1).mean(dim=1)
        vectors.append(F.normalize(features, dim=-1))
    return torch.cat(vectors)


def _paths(stem: Union[str, Path]) -> tuple[Path, Path]:
    stem = Path(stem)
    if stem.suffix in (".safetensors", ".json"):
        stem = stem.with_suffix("")
    return stem.with_name(stem.name + ".safetensors"), stem.with_name(stem.name + ".json")


def save_class_vectors(path: Union[str, Path], vectors: torch.Tensor, key: ClassVectorKey) -> None:
    """Write ``vectors`` (C, D) and ``key`` to ``<path>.safetensors`` and ``<path>.json`` atomically."""
    if vectors.dim() != 2 or vectors.shape[0] != len(key.names):
        raise ValueError(f"vectors must be (C={len(key.names)}, D), got {tuple(vectors.shape)}")
    tensor_path, key_path = _paths(path)
    tensor_path.parent.mkdir(parents=True, exist_ok=True)
    digest = key.digest()
    tmp_tensor = tensor_path.with_name(tensor_path.name + f".tmp{os.getpid()}")
    tmp_key = key_path.with_name(key_path.name + f".tmp{os.getpid()}")
    save_file({TENSOR_NAME: vectors.detach().float().cpu().contiguous()}, str(tmp_tensor), metadata={"key_sha256": digest})
    tmp_key.write_text(json.dumps(key.to_json(), ensure_ascii=False, indent=1), encoding="utf-8")
    os.replace(tmp_tensor, tensor_path)
    os.replace(tmp_key, key_path)


def load_class_vectors(path: Union[str, Path], key: ClassVectorKey, device: Union[str, torch.device] = "cpu") -> torch.Tensor:
    """Read class vectors saved for exactly ``key``.

    Raises:
        FileNotFoundError: either file of the pair is missing.
        ClassVectorKeyMismatch: the cache was made for another model, weights, names or templates.
    """
    tensor_path, key_path = _paths(path)
    for p in (tensor_path, key_path):
        if not p.is_file():
            raise FileNotFoundError(f"class-vector cache file {p} does not exist")
    stored = ClassVectorKey.from_json(json.loads(key_path.read_text(encoding="utf-8")))
    difference = key.difference(stored)
    if difference is not None:
        raise ClassVectorKeyMismatch(
            f"class vectors in {tensor_path} were made for something else ({difference}). "
            f"Point to another cache file, or delete this one to recompute it."
        )
    with safe_open(str(tensor_path), framework="pt", device=str(device)) as handle:
        if (handle.metadata() or {}).get("key_sha256") != key.digest():
            raise ClassVectorKeyMismatch(
                f"{tensor_path} does not belong to {key_path} (digests differ); delete both to recompute"
            )
        return handle.get_tensor(TENSOR_NAME)


def cache_path_for(cache_dir: Union[str, Path], key: ClassVectorKey) -> Path:
    """The stem (no suffix) of the cache files for ``key`` in ``cache_dir``."""
    safe_model = "".join(c if c.isalnum() or c in "-_." else "_" for c in key.model)
    return Path(cache_dir) / f"{safe_model}--{len(key.names)}names--{key.digest()[:16]}"


def cached_class_vectors(
    compute: Callable[[], torch.Tensor],
    key: ClassVectorKey,
    *,
    cache_dir: Union[str, Path, None] = None,
    path: Union[str, Path, None] = None,
    device: Union[str, torch.device] = "cpu",
) -> tuple[torch.Tensor, bool]:
    """Load class vectors for ``key`` from the cache, or ``compute()`` and store them.

    ``path`` names the cache files explicitly (a mismatching cache there is refused);
    otherwise they live in ``cache_dir`` under a name derived from the key; with neither,
    nothing is cached. Returns (vectors (C, D), whether the cache was hit).
    """
    if path is None and cache_dir is not None:
        path = cache_path_for(cache_dir, key)
    if path is not None:
        tensor_path, key_path = _paths(path)
        if tensor_path.is_file() and key_path.is_file():
            log.info("class vectors: cache hit %s", tensor_path)
            return load_class_vectors(path, key, device=device), True
    vectors = compute()
    if path is not None:
        save_class_vectors(path, vectors, key)
        log.info("class vectors: computed and cached %s", path)
    return vectors.to(device), False


def teacher_class_vectors(
    teacher,
    tokenizer: Tokenizer,
    class_names: Sequence[str],
    templates: Sequence[str],
    *,
    model_name: Optional[str] = None,
    weights: Optional[str] = None,
    cache_dir: Union[str, Path, None] = None,
    path: Union[str, Path, None] = None,
    batch_size: int = 1024,
    device: Union[str, torch.device, None] = None,
) -> torch.Tensor:
    """The teacher's class vectors (C, D_teacher), from the cache when it holds exactly these.

    ``teacher`` is anything with ``encode_text(tokens)`` (a :class:`Teacher`). What it was built
    from goes into the cache key: a Teacher from ``build_teacher`` knows its ``model_name`` and
    ``weights``; pass them only for another teacher object (or to override). For the
    class-agnostic recipe pass the whole vocabulary once and index the result with the K
    selected ids each step.
    """
    if model_name is None:
        model_name, weights = getattr(teacher, "model_name", None), getattr(teacher, "weights", weights)
    if model_name is None and (cache_dir is not None or path is not None):
        raise ValueError(f"caching class vectors needs the teacher's model name and weights for the cache key: "
                         f"pass model_name= and weights=, or a Teacher made by build_teacher "
                         f"(this {type(teacher).__name__} does not record them)")
    key = ClassVectorKey.make(model_name or type(teacher).__name__, weights, class_names, templates)
    if device is None:
        device = next(iter(teacher.parameters())).device if hasattr(teacher, "parameters") else "cpu"

    def compute() -> torch.Tensor:
        return encode_class_names(teacher.encode_text, tokenizer, list(class_names), list(templates),
                                  batch_size=batch_size, device=device)

    vectors, _ = cached_class_vectors(compute, key, cache_dir=cache_dir, path=path, device=device)
    return vectors
