"""Checkpoints without pickle: one safetensors file per checkpoint, JSON in its header.

A checkpoint holds arbitrary nested state (trainable tensors and buffers, the
optimizer's and scheduler's state dicts, RNG states, the loader's position,
counters, the run's config). :func:`flatten_state` splits such a tree into a
flat ``{name: tensor}`` mapping and a JSON skeleton where each tensor is
replaced by a reference; both go into one ``.safetensors`` file (the skeleton in
the header's metadata), so loading never unpickles anything. The header also holds a
SHA-256 of the tensors, so a file garbled after it was written is refused, not trained on.

Writes are atomic: the file is written under a temporary name in the same
folder, flushed and fsynced, then renamed over the final name and the folder
fsynced. A crash leaves either the previous checkpoints or the new one, never a
torn file. ``keep_last`` prunes older checkpoints only after the new one is in
place, never the new one, and with a ``run_id`` only checkpoints of that run (the id is in
the header's metadata, readable without loading the tensors: :func:`read_checkpoint_run_id`).
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

FORMAT = "clipdistill-checkpoint/1"
CLASS_VECTORS_FORMAT = "clipdistill-run-class-vectors/1"
_NAME = re.compile(r"^step-(\d{9})\.safetensors$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or does not fit the run being resumed."""


def flatten_state(obj: Any, tensors: dict[str, torch.Tensor] | None = None, prefix: str = "s") -> tuple[Any, dict]:
    """Split nested state into a JSON-able skeleton and a flat mapping of tensors."""
    tensors = {} if tensors is None else tensors
    if isinstance(obj, torch.Tensor):
        key = prefix
        tensors[key] = obj.detach().to("cpu").contiguous()
        return {"__tensor__": key}, tensors
    if isinstance(obj, np.ndarray):
        key = prefix
        tensors[key] = torch.from_numpy(np.ascontiguousarray(obj))
        return {"__ndarray__": key}, tensors
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {k: flatten_state(v, tensors, f"{prefix}/{k}")[0] for k, v in obj.items()}, tensors
        items = [[k, flatten_state(v, tensors, f"{prefix}/{i}")[0]] for i, (k, v) in enumerate(obj.items())]
        return {"__dict__": items}, tensors
    if isinstance(obj, tuple):
        return {"__tuple__": [flatten_state(v, tensors, f"{prefix}/{i}")[0] for i, v in enumerate(obj)]}, tensors
    if isinstance(obj, list):
        return [flatten_state(v, tensors, f"{prefix}/{i}")[0] for i, v in enumerate(obj)], tensors
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        if isinstance(obj, float) and not np.isfinite(obj):
            return {"__float__": repr(obj)}, tensors
        return obj, tensors
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item(), tensors
    raise TypeError(f"cannot store {type(obj).__name__} at {prefix!r} in a checkpoint (only tensors and plain data)")


def unflatten_state(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of :func:`flatten_state`."""
    if isinstance(skeleton, dict):
        if "__tensor__" in skeleton:
            return tensors[skeleton["__tensor__"]]
        if "__ndarray__" in skeleton:
            return tensors[skeleton["__ndarray__"]].numpy()
        if "__dict__" in skeleton:
            return {_key(k): unflatten_state(v, tensors) for k, v in skeleton["__dict__"]}
        if "__tuple__" in skeleton:
            return tuple(unflatten_state(v, tensors) for v in skeleton["__tuple__"])
        if "__float__" in skeleton:
            return float(skeleton["__float__"])
        return {k: unflatten_state(v, tensors) for k, v in skeleton.items()}
    if isinstance(skeleton, list):
        return [unflatten_state(v, tensors) for v in skeleton]
    return skeleton


def _key(k: Any) -> Any:
    return tuple(k) if isinstance(k, list) else k


def rng_state() -> dict:
    """Every RNG a run draws from: Python, NumPy's global, torch CPU and each CUDA device."""
    np_state = np.random.get_state()
    version, internal, gauss = random.getstate()
    state = {
        "python": {"version": version, "internal": list(internal), "gauss": gauss},
        "numpy": {"name": np_state[0], "keys": np_state[1].astype(np.int64), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss"]))
    n = state["numpy"]
    np.random.set_state((n["name"], np.asarray(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["cuda"]))


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def checkpoint_path(folder: str | Path, step: int) -> Path:
    return Path(folder) / f"step-{step:09d}.safetensors"


def list_checkpoints(folder: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of the complete checkpoints in ``folder``, oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = []
    for entry in os.scandir(folder):
        m = _NAME.match(entry.name)
        if m:
            found.append((int(m.group(1)), Path(entry.path)))
    return sorted(found)


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the tensors' names, dtypes, shapes and bytes: what the header's checksum covers."""
    digest = hashlib.sha256()
    for key in sorted(tensors):
        tensor = tensors[key].detach().to("cpu").contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def save_state(path: str | Path, state: dict, *, run_id: str | None = None) -> Path:
    """Write ``state`` atomically to ``path`` (temporary file, fsync, rename, fsync of the folder).

    ``run_id``: the run it belongs to, stored in the header's metadata.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    skeleton, tensors = flatten_state(state)
    # safetensors refuses tensors that share memory; each stored tensor gets its own storage.
    tensors = {k: v.clone() for k, v in tensors.items()}
    metadata = {"format": FORMAT, "state": json.dumps(skeleton, allow_nan=False)}
    metadata["tensors_sha256"] = tensors_digest(tensors)
    if run_id is not None:
        metadata["run_id"] = run_id
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    save_file(tensors, str(tmp), metadata=metadata)
    with open(tmp, "rb+") as fh:
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    return final


def save_checkpoint(folder: str | Path, step: int, state: dict, *, keep_last: int | None = None,
                    run_id: str | None = None) -> Path:
    """Write ``state`` atomically as ``folder/step-<step>.safetensors``; prune to ``keep_last``.

    With ``run_id`` the checkpoint records it, and pruning counts and removes only that run's
    checkpoints (another run's, or one whose header cannot be read, are never touched). The
    checkpoint just written is never pruned, whatever the steps of the others.
    """
    if keep_last is not None and keep_last < 1:
        raise ValueError(f"keep_last must be >= 1 or None, got {keep_last}")
    final = save_state(checkpoint_path(folder, step), state, run_id=run_id)
    if keep_last is not None:
        mine = [path for _, path in list_checkpoints(folder)
                if path != final and (run_id is None or read_checkpoint_run_id(path) == run_id)]
        for old in mine[:max(0, len(mine) - (keep_last - 1))]:
            old.unlink(missing_ok=True)
    return final


def read_checkpoint_run_id(path: str | Path) -> str | None:
    """The run id in a checkpoint's header; None for a checkpoint without one or an unreadable file."""
    try:
        with safe_open(str(path), framework="pt") as fh:
            return (fh.metadata() or {}).get("run_id")
    except Exception:  # safetensors raises its own error types for torn/garbled files
        return None


def load_checkpoint(path: str | Path) -> dict:
    """Read a checkpoint written by :func:`save_checkpoint` (no pickle involved)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    try:
        with safe_open(str(path), framework="pt") as fh:
            metadata = fh.metadata() or {}
        tensors = load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types for torn/garbled files
        raise CheckpointError(f"checkpoint {str(path)!r} is unreadable ({exc})") from exc
    if metadata.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a clipdistill checkpoint (format {metadata.get('format')!r})")
    recorded = metadata.get("tensors_sha256")  # absent in checkpoints written before it was recorded
    if recorded is not None and tensors_digest(tensors) != recorded:
        raise CheckpointError(f"checkpoint {str(path)!r} is corrupt: its tensors do not match the checksum in "
                              f"its header")
    return unflatten_state(json.loads(metadata["state"]), tensors)


def latest_checkpoint(folder: str | Path) -> Path | None:
    found = list_checkpoints(folder)
    return found[-1][1] if found else None


def load_checkpoint_config(path: str | Path) -> dict:
    """The run config a checkpoint was written with, read from its header alone (no tensors)."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as fh:
            metadata = fh.metadata() or {}
    except Exception as exc:  # safetensors raises its own error types for torn/garbled files
        raise CheckpointError(f"checkpoint {str(path)!r} is unreadable ({exc})") from exc
    if metadata.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a clipdistill checkpoint (format {metadata.get('format')!r})")
    config = json.loads(metadata["state"]).get("config")
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: a checkpoint without its run config")
    return config


# ------------------------------------------------------------------------------ the run's class vectors


def tensor_sha256(tensor: torch.Tensor) -> str:
    """SHA-256 of a tensor's float32 values (C order): the key of stored class vectors."""
    array = tensor.detach().to("cpu", torch.float32).contiguous().numpy()
    return hashlib.sha256(array.tobytes()).hexdigest()


def save_class_vectors(folder: str | Path, vectors: torch.Tensor, *, class_names: list[str], source: str,
                       templates: list[str] | None = None) -> dict:
    """Store the class vectors (C, D) a run trains against, once, as
    ``folder/class_vectors-<sha256[:16]>.safetensors`` (atomically; an existing file of the same
    checksum is kept). Returns the record a checkpoint holds: file name, SHA-256, shape, source
    ("teacher", "tuned" or "teacher_cache")."""
    if vectors.dim() != 2 or vectors.shape[0] != len(class_names):
        raise ValueError(f"class vectors of shape {tuple(vectors.shape)} for {len(class_names)} class names")
    digest = tensor_sha256(vectors)
    name = f"class_vectors-{digest[:16]}.safetensors"
    final = Path(folder) / name
    if not final.is_file():
        final.parent.mkdir(parents=True, exist_ok=True)
        header = {"sha256": digest, "source": source, "class_names": list(class_names),
                  "templates": None if templates is None else list(templates)}
        tmp = final.parent / f".{name}.tmp-{os.getpid()}"
        save_file({"class_vectors": vectors.detach().to("cpu", torch.float32).contiguous()}, str(tmp),
                  metadata={"format": CLASS_VECTORS_FORMAT, "header": json.dumps(header, ensure_ascii=False)})
        os.replace(tmp, final)
        _fsync_dir(final.parent)
    return {"file": name, "sha256": digest, "shape": [int(n) for n in vectors.shape], "source": source}


def load_class_vectors(checkpoint: str | Path, record: dict) -> tuple[torch.Tensor, dict]:
    """The class vectors a checkpoint's ``record`` names (``record["file"]`` is relative to the
    checkpoint's folder), checked against the recorded SHA-256; and their header (class names,
    templates, source)."""
    path = Path(checkpoint).parent / record["file"]
    if not path.is_file():
        raise CheckpointError(f"{checkpoint}: the class vectors it was trained against, {path}, are missing")
    try:
        with safe_open(str(path), framework="pt") as fh:
            metadata = fh.metadata() or {}
        vectors = load_file(str(path))["class_vectors"]
        header = json.loads(metadata["header"])
    except Exception as exc:
        raise CheckpointError(f"{path}: unreadable class vectors ({exc})") from exc
    if metadata.get("format") != CLASS_VECTORS_FORMAT or tensor_sha256(vectors) != record["sha256"]:
        raise CheckpointError(f"{path}: not the class vectors {checkpoint} was trained against "
                              f"(SHA-256 differs from the recorded {record['sha256'][:16]}...)")
    return vectors, header
