"""Teacher cache: run the teacher once per image and view, replay it in every epoch after.

    clipdistill cache-teacher --config FILE --views K --out-dir DIR [key=value ...]
    clipdistill distill --config FILE teacher.cache=DIR

Building: for every image of ``data.train`` and each of K views, the view's
crop and flip come from the loaders' counter-based generator, drawn as in epoch
0 (:class:`clipdistill.loaders.views.ReplayViews`); the teacher's L2-normalized
image features of that view are stored in fp16. Samples are grouped in shards
of ``shard_size`` consecutive sample ids; each shard is three numpy arrays

    shard-NNNNN.features.npy  (n, K, D) float16   normalized teacher features
    shard-NNNNN.views.npy     (n, K, 5) int32     crop x, y, w, h (stored pixels), flip
    shard-NNNNN.valid.npy     (n,)      bool      False: the image was rejected

and a ``shard-NNNNN.json`` with their SHA-256, written last: a shard whose JSON
is missing (a build that was interrupted) is redone, a shard whose JSON is
present is skipped. Ranks take shards round-robin. ``index.json`` (the key,
the shard list, the teacher's logit scale, the rejects) is written once every
shard exists. The teacher's class vectors for the config's class names are
computed in the same run into ``DIR/class_vectors`` (the class-vector cache),
so that training never needs the teacher model.

Storage: per image and view, D·2 bytes of features plus 20 bytes of view
numbers (plus one validity byte per image): at D = 768, 1,556 bytes, so one
million images × 10 views take about 15.6 GB.

Training with ``teacher.cache=DIR``: the cache is opened (all checksums
verified) and its key compared with the run's: teacher name and weights,
feature dimension, image list, seed, views version and transform, the
teacher's input size and normalization. Each epoch the loader shows every
sample one stored view, chosen by a hash of (seed, epoch, sample); the student
sees exactly the pixels the teacher saw (the loader recomputes the crop from
the same numbers, and every batch's crops are checked against the stored
ones). The teacher's logits come from the cached features and the class
vectors inside kd_loss; the teacher model is never loaded.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from clipdistill.engine.config.schema import ConfigError
from clipdistill.engine.datafree.synthesize import load_teacher
from clipdistill.engine.io import image_spec, read_class_names, read_templates, resolve_device
from clipdistill.engine.models.class_vectors import teacher_class_vectors, weights_fingerprint
from clipdistill.engine.models.clip import build_teacher, get_tokenizer
from clipdistill.engine.training.data import image_loader, training_transform
from clipdistill.engine.training.sources import datafree_config, image_source
from clipdistill.loaders.loader import OutputSpec
from clipdistill.loaders.views import VIEWS_VERSION, sample_views

FORMAT = "clipdistill-teacher-cache/1"
ARRAYS = ("features", "views", "valid")


class TeacherCacheError(ValueError):
    """A cache that cannot serve this run; the message says what differs."""


@dataclass(frozen=True)
class CacheKey:
    """Everything that must match between a cache and a run that replays it."""

    teacher: str
    weights: Optional[str]  # a pretrained tag, or "file:<path>:<size>:<mtime>" for a local file
    dim: int
    num_samples: int
    list_digest: str
    seed: int
    num_views: int
    view_epoch: int
    views_version: int
    transform: str
    input_size: int
    mean: tuple
    std: tuple
    interpolation: str

    def difference(self, other: "CacheKey") -> Optional[str]:
        """The first field that differs, said plainly; None when they match."""
        names = {"teacher": "teacher model", "weights": "teacher weights", "dim": "feature dimension",
                 "num_samples": "number of images", "list_digest": "image list", "seed": "seed",
                 "num_views": "number of views", "views_version": "views version",
                 "transform": "transform", "input_size": "teacher input size", "mean": "input mean",
                 "std": "input std", "interpolation": "interpolation"}
        mine, theirs = asdict(self), asdict(other)
        for field, label in names.items():
            a, b = mine[field], theirs[field]
            if isinstance(a, (list, tuple)):
                a, b = list(a), list(b)
            if a != b:
                return f"{label}: cache has {a!r}, this run has {b!r}"
        return None


_KEY_TYPES = {"teacher": str, "weights": (str, type(None)), "dim": int, "num_samples": int, "list_digest": str,
              "seed": int, "num_views": int, "view_epoch": int, "views_version": int, "transform": str,
              "input_size": int, "mean": list, "std": list, "interpolation": str}


def _key_from_json(data: dict, where: str = "the cache key") -> CacheKey:
    """A :class:`CacheKey` from its JSON; fields missing, extra or of another type are a TeacherCacheError."""
    if not isinstance(data, dict) or set(data) != set(_KEY_TYPES):
        got = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise TeacherCacheError(f"{where}: the key's fields are {got}, expected {sorted(_KEY_TYPES)}")
    for name, kind in _KEY_TYPES.items():
        value = data[name]
        if not isinstance(value, kind) or isinstance(value, bool) or (
                kind is list and not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
            raise TeacherCacheError(f"{where}: key field {name!r} holds {value!r:.60}")
    return CacheKey(**{**data, "mean": tuple(data["mean"]), "std": tuple(data["std"])})


def _index_shards(root: Path, index: dict) -> list[dict]:
    """The index's shards, checked to tile the key's samples in order (what :meth:`TeacherCache.lookup` assumes)."""
    def refuse(what: str) -> None:
        raise TeacherCacheError(f"{root / 'index.json'}: {what}; rebuild the index with cache-teacher")

    key = _key_from_json(index.get("key"), str(root / "index.json"))
    size, shards = index.get("shard_size"), index.get("shards")
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        refuse(f"shard_size {size!r} is not a positive integer")
    if not isinstance(shards, list) or len(shards) != -(-key.num_samples // size):
        refuse(f"{key.num_samples} images in shards of {size} need {-(-key.num_samples // size)} shards, "
               f"the index lists {len(shards) if isinstance(shards, list) else shards!r:.40}")
    for j, shard in enumerate(shards):
        expected = {"shard": j, "first": j * size, "count": min(size, key.num_samples - j * size)}
        if not isinstance(shard, dict) or any(shard.get(k) != v for k, v in expected.items()) or \
                not isinstance(shard.get("sha256"), dict) or set(shard["sha256"]) != set(ARRAYS):
            refuse(f"entry {j} of 'shards' is {shard!r:.120}, expected {expected} with a sha256 of {list(ARRAYS)}")
    if not isinstance(index.get("rejects"), list):
        refuse("'rejects' is not a list")
    scale = index.get("logit_scale")
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not np.isfinite(scale):
        refuse(f"logit_scale {scale!r} is not a finite number")
    return shards


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _atomic_write_bytes(path: Path, write: Callable) -> None:
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    with open(tmp, "wb") as fh:
        write(fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _shard_name(index: int) -> str:
    return f"shard-{index:05d}"


# --------------------------------------------------------------------------------- the run's key


def run_key(cfg, *, num_views: int, teacher_dim: int, samples, input_spec) -> CacheKey:
    """The key of a run config (teacher, image list, views), for building or checking a cache."""
    transform = training_transform(cfg.data)
    size, mean, std = input_spec
    return CacheKey(
        teacher=cfg.teacher.name, weights=weights_fingerprint(cfg.teacher.weights), dim=int(teacher_dim),
        num_samples=len(samples), list_digest=samples.digest(), seed=int(cfg.train.seed),
        num_views=int(num_views), view_epoch=0, views_version=VIEWS_VERSION, transform=repr(transform),
        input_size=int(size), mean=tuple(float(m) for m in mean), std=tuple(float(s) for s in std),
        interpolation=cfg.data.interpolation,
    )


# --------------------------------------------------------------------------------- building


def _shard_complete(out: Path, index: int) -> bool:
    meta = out / f"{_shard_name(index)}.json"
    if not meta.is_file():
        return False
    try:
        recorded = json.loads(meta.read_text())["sha256"]
    except (ValueError, KeyError):
        return False
    return all((out / f"{_shard_name(index)}.{a}.npy").is_file() for a in ARRAYS) and set(recorded) == set(ARRAYS)


def build_teacher_cache(cfg, *, views: int, out: str | Path, shard_size: int = 1024, batch_size: int = 256,
                        rank: int = 0, world_size: int = 1, max_shards: Optional[int] = None,
                        log: Callable[[str], None] = print, progress: bool = True) -> dict:
    """Build (or finish) the teacher cache of ``cfg``'s teacher and images in ``out``.

    A builder like :func:`~clipdistill.engine.training.builder.build_run`: it reads the run
    config (teacher, data, seed) and makes views with the same transform and loader settings.
    ``max_shards`` stops after that many new shards (used to test interrupted builds).
    Returns a summary dict (also the command's last line).
    """
    if views < 1:
        raise ConfigError(f"--views must be >= 1, got {views}")
    if shard_size < 1 or not 0 <= rank < world_size:
        raise ConfigError(f"bad sharding: shard_size {shard_size}, rank {rank} of {world_size}")
    started = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.train.device)
    synthetic = None
    if cfg.method == "datafree":  # the synthetic set's teacher and class names, as the run takes them
        cfg, synthetic = datafree_config(cfg, log)
    build = load_teacher if cfg.method == "datafree" else build_teacher
    teacher = build(cfg.teacher.name, cfg.teacher.weights, device=device, precision=cfg.teacher.precision)
    input_spec = image_spec(teacher.model)
    # The cache's own list: an interrupted build continues on it (a changed folder is reported); a
    # synthetic set's is its manifest's, as the run's.
    samples = image_source(cfg.data.train, "data.train", lists=str(out / "lists"), resuming=True, synthetic=synthetic)
    key = run_key(cfg, num_views=views, teacher_dim=teacher.model.visual.output_dim, samples=samples,
                  input_spec=input_spec)
    _claim(out, key)
    names = read_class_names(cfg.data.class_names) if cfg.data.class_names else (
        synthetic.class_names if synthetic is not None else None)
    if names:
        teacher_class_vectors(teacher, get_tokenizer(cfg.teacher.name), names,
                              read_templates(cfg.data.templates), model_name=cfg.teacher.name,
                              weights=cfg.teacher.weights, cache_dir=out / "class_vectors", device=device)
    shards = _ShardWriter(out, teacher, samples, views=views, dim=key.dim, seed=cfg.train.seed,
                          transform=training_transform(cfg.data),
                          renderer=image_loader(samples, cfg.data, batch_size=1,
                                                outputs=[OutputSpec("teacher", *input_spec)],
                                                transform=training_transform(cfg.data), seed=cfg.train.seed,
                                                device=device,
                                                dtype=torch.bfloat16 if device.type == "cuda" else torch.float32),
                          batch_size=batch_size)
    n_shards = -(-len(samples) // shard_size)
    mine = [j for j in range(n_shards) if j % world_size == rank]
    todo = [j for j in mine if not _shard_complete(out, j)]
    log(f"teacher cache: {len(samples)} images x {views} views, {n_shards} shards "
        f"({len(mine) - len(todo)} of this rank's {len(mine)} already done)")
    if max_shards is not None:
        todo = todo[:max_shards]
    for j in tqdm(todo, desc="cache-teacher", unit="shard", file=sys.stderr, disable=not progress):
        shards.write(j, first=j * shard_size, count=min(shard_size, len(samples) - j * shard_size))
    complete = all(_shard_complete(out, j) for j in range(n_shards))
    if complete:
        _write_index(out, key, shard_size, n_shards, logit_scale=float(teacher.logit_scale))
    n_rejected = sum(len(json.loads((out / f"{_shard_name(j)}.json").read_text())["rejects"])
                     for j in range(n_shards) if _shard_complete(out, j))
    return {"images": len(samples), "views": views, "dim": key.dim, "shards": n_shards,
            "shards_built": len(todo), "complete": complete, "rejected": n_rejected,
            "bytes": sum(p.stat().st_size for p in out.glob("shard-*.npy")),
            "seconds": round(time.perf_counter() - started, 2), "out": str(out)}


def _claim(out: Path, key: CacheKey) -> None:
    """Write the cache's key, or check that the folder already holds a cache of this key."""
    key_path = out / "key.json"
    if key_path.is_file():
        diff = _key_from_json(json.loads(key_path.read_text())).difference(key)
        if diff:
            raise TeacherCacheError(f"{out} holds a cache of another configuration ({diff}); "
                                    f"use another --out or remove it")
    else:
        _atomic_write_bytes(key_path, lambda fh: fh.write(json.dumps(asdict(key), indent=2).encode()))


class _ShardWriter:
    """Writes shard ``j``: its views, the teacher's fp16 features, validity, rejects, checksums."""

    def __init__(self, out: Path, teacher, samples, *, views: int, dim: int, seed: int, transform, renderer,
                 batch_size: int):
        self.out, self.teacher, self.samples = out, teacher, samples
        self.views, self.dim, self.seed, self.transform = views, dim, seed, transform
        self.renderer, self.batch_size = renderer, batch_size

    def write(self, j: int, *, first: int, count: int) -> None:
        ids = np.arange(first, first + count, dtype=np.int64)
        valid, sizes, rejects = self._read_headers(ids)
        view_arr = np.zeros((count, self.views, 5), dtype=np.int32)
        feats = np.zeros((count, self.views, self.dim), dtype=np.float16)
        rows_i = np.repeat(np.flatnonzero(valid), self.views)
        rows_v = np.tile(np.arange(self.views, dtype=np.int64), int(valid.sum()))
        if len(rows_i):
            crops, flips = sample_views(self.transform, self.seed, 0, ids[rows_i], rows_v,
                                        sizes[rows_i, 0], sizes[rows_i, 1])
            view_arr[rows_i, rows_v, :4] = crops
            view_arr[rows_i, rows_v, 4] = flips
        for start in range(0, len(rows_i), self.batch_size):
            ri, rv = rows_i[start:start + self.batch_size], rows_v[start:start + self.batch_size]
            for good_i, good_v, features in _render_and_encode(self.renderer, self.teacher, ids, ri, rv, view_arr,
                                                                rejects, self.samples):
                feats[good_i, good_v] = features
        for r in rejects:
            valid[r["sample_id"] - first] = False
        feats[~valid] = 0
        view_arr[~valid] = 0
        name = _shard_name(j)
        digests = {}
        for array_name, array in (("features", feats), ("views", view_arr), ("valid", valid)):
            path = self.out / f"{name}.{array_name}.npy"
            _atomic_write_bytes(path, lambda fh, a=array: np.save(fh, a, allow_pickle=False))
            digests[array_name] = _sha256(path)
        meta = {"shard": j, "first": first, "count": count, "sha256": digests, "rejects": rejects}
        _atomic_write_bytes(self.out / f"{name}.json", lambda fh: fh.write(json.dumps(meta).encode()))

    def _read_headers(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[dict]]:
        """Which samples open, their (width, height), and a reject record for each that does not."""
        valid = np.zeros(len(ids), dtype=bool)
        sizes = np.zeros((len(ids), 2), dtype=np.int64)
        rejects = []
        for i, sid in enumerate(ids.tolist()):
            reason, detail, _, _, wh = self.renderer.planner.read(sid)
            if reason is None:
                valid[i], sizes[i] = True, wh
            else:
                rejects.append({"sample_id": sid, "location": self.samples.location(sid), "reason": reason,
                                "detail": detail[:300]})
        return valid, sizes, rejects


def _write_index(out: Path, key: CacheKey, shard_size: int, n_shards: int, *, logit_scale: float) -> None:
    shards, rejects = [], []
    for j in range(n_shards):
        meta = json.loads((out / f"{_shard_name(j)}.json").read_text())
        shards.append({k: meta[k] for k in ("shard", "first", "count", "sha256")})
        rejects += meta["rejects"]
    index = {"format": FORMAT, "key": asdict(key), "shard_size": shard_size, "shards": shards,
             "logit_scale": logit_scale, "rejects": rejects}
    _atomic_write_bytes(out / "index.json", lambda fh: fh.write(json.dumps(index, indent=1).encode()))


def _render_and_encode(renderer, teacher, ids, rows_i, rows_v, view_arr, rejects, samples):
    """Yield (row ids, view ids, fp16 features) for rows that decode; reject samples that do not."""
    sids = ids[rows_i]
    crops, flips = view_arr[rows_i, rows_v, :4], view_arr[rows_i, rows_v, 4].astype(bool)
    try:
        images = renderer.render(sids, crops, flips)["teacher"]
    except ValueError as exc:
        unique = np.unique(sids).tolist()
        if len(unique) == 1:
            rejects.append({"sample_id": int(unique[0]), "location": samples.location(int(unique[0])),
                            "reason": "decode_error", "detail": str(exc)[:300]})
            return
        # Isolate the file that fails: one sample (all its views) at a time.
        for sid in unique:
            sel = sids == sid
            yield from _render_and_encode(renderer, teacher, ids, rows_i[sel], rows_v[sel], view_arr, rejects,
                                          samples)
        return
    with torch.no_grad():
        features = teacher.encode_image(images).to(torch.float16).cpu().numpy()
    yield rows_i, rows_v, features


# --------------------------------------------------------------------------------- reading


class TeacherCache:
    """A finished cache opened for training: checksums verified, arrays memory-mapped."""

    def __init__(self, root: str | Path, *, verify: bool = True):
        root = Path(root)
        index_path = root / "index.json"
        if not index_path.is_file():
            partial = any(root.glob("shard-*.json"))
            raise TeacherCacheError(
                f"{root}: no index.json: " + ("the cache build is unfinished; run cache-teacher again to finish it"
                                              if partial else "not a teacher cache (run clipdistill cache-teacher)"))
        try:
            index = json.loads(index_path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise TeacherCacheError(f"{index_path}: not readable JSON ({exc})") from exc
        if not isinstance(index, dict) or index.get("format") != FORMAT:
            found = index.get("format") if isinstance(index, dict) else type(index).__name__
            raise TeacherCacheError(f"{root}: unknown cache format {found!r} (expected {FORMAT})")
        shards = _index_shards(root, index)
        self.root = root
        self.key = _key_from_json(index["key"])
        self.logit_scale = float(index["logit_scale"])
        self.shard_size = int(index["shard_size"])
        self.rejects = index["rejects"]
        self._features, self._views, self._valid = [], [], []
        for shard in shards:
            name = _shard_name(shard["shard"])
            for array_name in ARRAYS:
                path = root / f"{name}.{array_name}.npy"
                if not path.is_file():
                    raise TeacherCacheError(f"{path}: missing; rebuild the shard with cache-teacher")
                if verify and _sha256(path) != shard["sha256"][array_name]:
                    raise TeacherCacheError(f"{path}: checksum mismatch (corrupted shard); delete "
                                            f"{root / (name + '.json')} and run cache-teacher again to redo it")
            self._features.append(np.load(root / f"{name}.features.npy", mmap_mode="r", allow_pickle=False))
            self._views.append(np.load(root / f"{name}.views.npy", mmap_mode="r", allow_pickle=False))
            self._valid.append(np.load(root / f"{name}.valid.npy", allow_pickle=False))
        if self._features and self._features[0].shape[-1] != self.key.dim:
            raise TeacherCacheError(f"{root}: features of dimension {self._features[0].shape[-1]}, "
                                    f"index says {self.key.dim}")
        for shard, *arrays in zip(shards, self._features, self._views, self._valid):
            count, k = shard["count"], self.key.num_views
            shapes = tuple(a.shape for a in arrays)
            if shapes != ((count, k, self.key.dim), (count, k, 5), (count,)):
                raise TeacherCacheError(f"{root / _shard_name(shard['shard'])}: arrays of shapes {shapes} do not "
                                        f"hold {count} images x {k} views as the index says")

    @property
    def num_views(self) -> int:
        return self.key.num_views

    def check(self, key: CacheKey) -> None:
        """Refuse to serve a run whose key differs, saying what differs."""
        diff = self.key.difference(key)
        if diff:
            raise TeacherCacheError(f"teacher cache {self.root} was built for another configuration: {diff}")

    def _locate(self, sample_ids: np.ndarray):
        ids = np.asarray(sample_ids, dtype=np.int64)
        return ids // self.shard_size, ids % self.shard_size

    def lookup(self, sample_ids: np.ndarray, view_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Features (R, D) float16, views (R, 5) int32 and validity (R,) of rows; ids < 0 give zeros."""
        sample_ids = np.asarray(sample_ids, dtype=np.int64)
        view_ids = np.asarray(view_ids, dtype=np.int64)
        R = len(sample_ids)
        feats = np.zeros((R, self.key.dim), dtype=np.float16)
        views = np.zeros((R, 5), dtype=np.int32)
        valid = np.zeros(R, dtype=bool)
        real = np.flatnonzero(sample_ids >= 0)
        shard, offset = self._locate(sample_ids[real])
        for s in np.unique(shard).tolist():
            sel = shard == s
            rows, offs, vids = real[sel], offset[sel], view_ids[real][sel]
            feats[rows] = self._features[s][offs, vids]
            views[rows] = self._views[s][offs, vids]
            valid[rows] = self._valid[s][offs]
        return feats, views, valid


class CachedTeacher(nn.Module):
    """Stands in for the teacher when its features come from a cache: never runs a model."""

    def __init__(self, cache: TeacherCache):
        super().__init__()
        self.output_dim = cache.key.dim
        self.register_buffer("_logit_scale", torch.tensor(cache.logit_scale), persistent=False)
        self.cache = cache

    @property
    def logit_scale(self) -> torch.Tensor:
        return self._logit_scale

    def train(self, mode: bool = True) -> "CachedTeacher":
        return super().train(False)

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        raise RuntimeError("this run's teacher features come from the teacher cache; no teacher model is loaded")
