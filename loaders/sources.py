"""Sources: a folder, a text file list or tar shards, resolved to a stable sample list.

A :class:`SampleList` is the ordered list every other part of the loader works
on: sample ``i`` (its integer id) is line ``i`` of the list file. It is saved to
disk, so a rerun does not rescan millions of files, and the same file on every
rank gives every rank the same ids.

List file format (UTF-8 text)::

    # clipdistill sample list v1
    # root: /absolute/root
    relative/path/a.jpg
    shards/000.tar<TAB>member.jpg<TAB>offset<TAB>size

A line without tabs is a file (relative to the root, or absolute); a line with
three tabs is a member of an uncompressed tar shard, ``offset`` being where its
data starts. Lines starting with ``#`` are comments. A plain text file of paths
(one per line, relative to the list file's folder) is a valid list.

Sources accepted by :func:`resolve_source`:

- a folder: scanned recursively with ``os.scandir`` (no per-file stat; hidden
  files and folders are skipped), images recognized by extension, sorted by
  relative path;
- a text list file (``.txt``, ``.list``, ...): used as is;
- WebDataset-style tar shards: a ``.tar`` path, a glob (``"shards/*.tar"``), a
  brace pattern (``"shards-{00000..01023}.tar"``, ``"{train,extra}/*.tar"``; see
  :func:`expand_braces`) or a list of ``.tar`` paths; each shard gets an index
  file ``<shard>.idx`` (member, offset, size of its images) made when missing.

Folder and shard sources are saved under a cache folder (``cache_dir``, else
``$CLIPDISTILL_CACHE``, else ``~/.cache/clipdistill``) keyed by the source path.
"""
from __future__ import annotations

import glob
import hashlib
import logging
import os
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

logger = logging.getLogger("clipdistill.loaders")

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"})
LIST_HEADER = "# clipdistill sample list v1"


class EmptySourceError(ValueError):
    """A source resolved to no images at all."""


@dataclass
class SampleList:
    """An ordered list of encoded images; the position in the list is the sample id.

    Attributes:
        root: folder that relative paths are relative to.
        paths: per sample, the file (or, for a tar member, the shard) path.
        members: per sample, the member name inside its shard ("" for plain files);
            None when no sample is a tar member.
        offsets: int64 (N,), data offset inside the shard (-1 for plain files); or None.
        sizes: int64 (N,), member size in bytes (-1 for plain files); or None.
    """

    root: str
    paths: list[str]
    members: list[str] | None = None
    offsets: np.ndarray | None = None
    sizes: np.ndarray | None = None
    _fds: dict = field(default_factory=dict, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.paths)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_fds"] = {}  # file descriptors do not travel to other processes
        return state

    def full_path(self, i: int) -> str:
        path = self.paths[i]
        return path if os.path.isabs(path) else os.path.join(self.root, path)

    def is_member(self, i: int) -> bool:
        return self.offsets is not None and int(self.offsets[i]) >= 0

    def location(self, i: int) -> str:
        """A human-readable location: the file path, or ``shard.tar:member``."""
        if self.is_member(i):
            return f"{self.full_path(i)}:{self.members[i]}"
        return self.full_path(i)

    def byte_range(self, i: int) -> tuple[str, int, int | None]:
        """(path to open, offset, size or None for a whole file)."""
        if self.is_member(i):
            return self.full_path(i), int(self.offsets[i]), int(self.sizes[i])
        return self.full_path(i), 0, None

    def read(self, i: int) -> bytes:
        """The encoded bytes of sample ``i`` (raises OSError if missing or unreadable)."""
        path, offset, size = self.byte_range(i)
        if size is None:
            with open(path, "rb") as fh:
                return fh.read()
        fd = self._fds.get(path)
        if fd is None:
            if len(self._fds) >= 64:  # keep few shards open per process
                os.close(self._fds.pop(next(iter(self._fds))))
            fd = self._fds[path] = os.open(path, os.O_RDONLY)
        data = os.pread(fd, size, offset)
        if len(data) != size:
            raise OSError(f"short read: {len(data)} of {size} bytes at offset {offset}")
        return data

    def subset(self, indices: Sequence[int] | np.ndarray) -> "SampleList":
        """A new list of the given samples, in the given order (ids renumbered from 0)."""
        idx = np.asarray(indices, dtype=np.int64)
        return SampleList(
            root=self.root,
            paths=[self.paths[i] for i in idx],
            members=None if self.members is None else [self.members[i] for i in idx],
            offsets=None if self.offsets is None else self.offsets[idx],
            sizes=None if self.sizes is None else self.sizes[idx],
        )

    def digest(self) -> str:
        """A short hash of the list's content (stored in checkpoints to catch a changed list)."""
        h = hashlib.sha1()
        for line in self._lines():
            h.update(line.encode("utf-8", "surrogateescape"))
            h.update(b"\n")
        return h.hexdigest()[:16]

    def _lines(self) -> Iterable[str]:
        for i, path in enumerate(self.paths):
            if self.is_member(i):
                yield f"{path}\t{self.members[i]}\t{int(self.offsets[i])}\t{int(self.sizes[i])}"
            else:
                yield path

    def save(self, path: str | os.PathLike) -> None:
        """Write the list file (atomically: a temporary file renamed into place)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        with open(tmp, "w", encoding="utf-8", errors="surrogateescape") as fh:
            fh.write(f"{LIST_HEADER}\n# root: {self.root}\n")
            for line in self._lines():
                fh.write(line + "\n")
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "SampleList":
        """Read a list file (or a plain text file of paths, relative to its folder)."""
        path = Path(path)
        root = str(path.resolve().parent)
        paths: list[str] = []
        members: list[str] = []
        offsets: list[int] = []
        sizes: list[int] = []
        any_member = False
        with open(path, encoding="utf-8", errors="surrogateescape") as fh:
            for lineno, raw in enumerate(fh, 1):
                line = raw.rstrip("\r\n")
                if not line.strip():
                    continue
                if line.startswith("#"):
                    if line.startswith("# root:"):
                        root = line[len("# root:"):].strip()
                    continue
                parts = line.split("\t")
                if len(parts) == 1:
                    paths.append(line)
                    members.append("")
                    offsets.append(-1)
                    sizes.append(-1)
                elif len(parts) == 4:
                    any_member = True
                    paths.append(parts[0])
                    members.append(parts[1])
                    offsets.append(int(parts[2]))
                    sizes.append(int(parts[3]))
                else:
                    raise ValueError(
                        f"{path}:{lineno}: expected a path, or 'shard<TAB>member<TAB>offset<TAB>size'; got {line!r}"
                    )
        if not any_member:
            return cls(root=root, paths=paths)
        return cls(
            root=root,
            paths=paths,
            members=members,
            offsets=np.asarray(offsets, dtype=np.int64),
            sizes=np.asarray(sizes, dtype=np.int64),
        )


def scan_folder(root: str | os.PathLike, extensions: frozenset[str] = IMAGE_EXTENSIONS) -> list[str]:
    """Relative paths of the image files under ``root``, sorted.

    Uses ``os.scandir`` only: directory entries carry their type, so no file is
    stat'ed. Hidden entries (names starting with ".") are skipped; paths with a
    tab or newline (which the list format cannot hold) are skipped with a warning.
    """
    root = os.fspath(root)
    found: list[str] = []
    skipped = 0
    stack = [""]
    while stack:
        rel_dir = stack.pop()
        try:
            with os.scandir(os.path.join(root, rel_dir) if rel_dir else root) as it:
                for entry in it:
                    name = entry.name
                    if name.startswith("."):
                        continue
                    rel = f"{rel_dir}/{name}" if rel_dir else name
                    if entry.is_dir():
                        stack.append(rel)
                    elif os.path.splitext(name)[1].lower() in extensions:
                        if "\t" in rel or "\n" in rel or "\r" in rel:
                            skipped += 1
                            continue
                        found.append(rel)
        except OSError as exc:
            logger.warning("clipdistill.loaders: cannot scan %s: %s", os.path.join(root, rel_dir), exc)
    if skipped:
        logger.warning("clipdistill.loaders: skipped %d files whose names hold a tab or newline", skipped)
    found.sort()
    return found


def tar_index(shard: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None) -> list[tuple[str, int, int]]:
    """(member, data offset, size) of the image members of an uncompressed tar shard.

    Read from ``<shard>.idx`` when present and newer than the shard; otherwise
    built by walking the tar headers and written next to the shard (or under
    ``cache_dir`` when the shard's folder is read-only).
    """
    shard = os.fspath(shard)
    candidates = [shard + ".idx", os.path.join(_cache_dir(cache_dir), "tar", _key(shard) + ".idx")]
    shard_mtime = os.stat(shard).st_mtime
    for idx in candidates:
        if os.path.exists(idx) and os.stat(idx).st_mtime >= shard_mtime:
            with open(idx, encoding="utf-8", errors="surrogateescape") as fh:
                rows = [line.rstrip("\n").split("\t") for line in fh if line.strip()]
            return [(name, int(off), int(size)) for name, off, size in rows]
    entries = []
    try:
        with tarfile.open(shard, mode="r:") as tar:
            for member in tar:
                if member.isfile() and os.path.splitext(member.name)[1].lower() in IMAGE_EXTENSIONS:
                    if "\t" in member.name or "\n" in member.name:
                        continue
                    entries.append((member.name, member.offset_data, member.size))
    except tarfile.ReadError as exc:
        raise ValueError(f"{shard}: not an uncompressed tar file ({exc}); shards must be plain .tar") from exc
    text = "".join(f"{n}\t{o}\t{s}\n" for n, o, s in entries)
    for idx in candidates:
        try:
            os.makedirs(os.path.dirname(idx) or ".", exist_ok=True)
            tmp = f"{idx}.tmp{os.getpid()}"
            with open(tmp, "w", encoding="utf-8", errors="surrogateescape") as fh:
                fh.write(text)
            os.replace(tmp, idx)
            break
        except OSError:
            continue
    return entries


def _cache_dir(cache_dir: str | os.PathLike | None) -> str:
    if cache_dir is not None:
        return os.fspath(cache_dir)
    env = os.environ.get("CLIPDISTILL_CACHE")
    return env if env else os.path.join(os.path.expanduser("~"), ".cache", "clipdistill")


def _key(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8", "surrogateescape")).hexdigest()[:16]


_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")


def expand_braces(pattern: str) -> list[str]:
    """The paths a WebDataset-style brace pattern names, in order.

    ``{a,b}`` is a choice and ``{0..9}`` or ``{00000..01023}`` an inclusive numeric range (zero-padded
    to the width of its bounds when either has a leading zero); several braces give every
    combination, left to right. A pattern without braces is returned as the only item;
    ``"{}"`` or a brace with one item and no ``..`` stay literal (not a pattern).

    Raises:
        ValueError: a range that runs backwards (``{9..0}``).
    """
    match = next((m for m in _BRACE.finditer(pattern) if "," in m.group(1) or _RANGE.match(m.group(1))), None)
    if match is None:
        return [pattern]
    body = match.group(1)
    numeric = _RANGE.match(body)
    if numeric:
        lo, hi = numeric.group(1), numeric.group(2)
        if int(hi) < int(lo):
            raise ValueError(f"brace range {{{body}}} in {pattern!r} runs backwards; write {{{hi}..{lo}}}")
        padded = any(len(b.lstrip("-")) > 1 and b.lstrip("-").startswith("0") for b in (lo, hi))
        width = max(len(lo), len(hi)) if padded else 0
        choices = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
    else:
        choices = body.split(",")
    head, tail = pattern[:match.start()], pattern[match.end():]
    return [path for choice in choices for path in expand_braces(head + choice + tail)]


def _shard_paths(source: str | Sequence[str]) -> list[str] | None:
    """The shard paths a source names, or None when it names no tar shards.

    Brace patterns are expanded first; each expanded path may still be a glob.
    """
    if isinstance(source, (list, tuple)):
        items = [os.fspath(s) for s in source]
        return sorted(items) if items and all(s.endswith(".tar") for s in items) else None
    source = os.fspath(source)
    expanded = expand_braces(source)
    if len(expanded) > 1:
        if not all(p.endswith(".tar") for p in expanded):
            return None
        return sorted({s for p in expanded for s in (glob.glob(p) if any(c in p for c in "*?[") else [p])})
    if any(ch in source for ch in "*?["):
        return sorted(glob.glob(source))
    if source.endswith(".tar"):
        return [source]
    return None


def check_source(source: "str | os.PathLike | Sequence[str] | SampleList") -> list[str] | None:
    """Check, without scanning or reading images, that a source can be resolved; return its shard paths.

    For a command to call before it builds any model: a missing folder or list file, a shard
    pattern that matches nothing, and named shards that do not exist fail here, in one line.

    Returns:
        the tar shard paths the source names (brace patterns and globs expanded), or None for a
        folder, a list file or a :class:`SampleList`.

    Raises:
        FileNotFoundError: the folder, list file or some of the shards do not exist.
        EmptySourceError: a shard pattern that matches no file.
    """
    if isinstance(source, SampleList):
        return None
    shards = _shard_paths(source)
    if shards is None:
        path = Path(source)
        if not path.exists():
            raise FileNotFoundError(f"source {str(path)!r} does not exist (expected a folder, a list file or tar shards)")
        return None
    if not shards:
        raise EmptySourceError(f"no tar shards match {source!r}")
    missing = [s for s in shards if not os.path.isfile(s)]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of the {len(shards)} tar shards {source!r} names do not exist "
                                f"(the first: {missing[0]!r})")
    return shards


def resolve_source(
    source: "str | os.PathLike | Sequence[str] | SampleList",
    *,
    cache_dir: str | os.PathLike | None = None,
    rescan: bool = False,
) -> SampleList:
    """Resolve a source to its stable, ordered :class:`SampleList`.

    Args:
        source: a folder, a list file, a ``.tar`` shard, a glob of shards, a list
            of shard paths, or an existing SampleList (returned as is).
        cache_dir: where scanned lists are saved (see the module docstring).
        rescan: scan again even if a saved list exists.

    Raises:
        EmptySourceError: the source holds no images.
        FileNotFoundError: the source does not exist.
    """
    if isinstance(source, SampleList):
        if len(source) == 0:
            raise EmptySourceError("the sample list is empty: there is nothing to load")
        return source
    shards = check_source(source)
    if shards is None:
        path = Path(source)
        if path.is_file():
            samples = SampleList.load(path)
            if len(samples) == 0:
                raise EmptySourceError(f"list file {str(path)!r} names no images")
            return samples
    key = _key(repr(sorted(os.path.abspath(s) for s in shards)) if shards is not None else os.path.abspath(source))
    saved = Path(_cache_dir(cache_dir)) / "lists" / f"{key}.list"
    if saved.exists() and not rescan:
        samples = SampleList.load(saved)
        logger.info("clipdistill.loaders: %d samples from the saved list %s", len(samples), saved)
    else:
        samples = _scan(source, shards, cache_dir)
        if len(samples) == 0:
            what = f"tar shards {source!r}" if shards is not None else f"folder {os.fspath(source)!r}"
            raise EmptySourceError(
                f"no images found in {what} (looked for {', '.join(sorted(IMAGE_EXTENSIONS))}); "
                "check the path, or pass a list file"
            )
        samples.save(saved)
        logger.info("clipdistill.loaders: scanned %d samples, list saved to %s", len(samples), saved)
    if len(samples) == 0:
        raise EmptySourceError(f"the saved list {saved} is empty; rescan with rescan=True")
    return samples


def _scan(source, shards: list[str] | None, cache_dir) -> SampleList:
    if shards is None:
        root = os.path.abspath(source)
        return SampleList(root=root, paths=scan_folder(root))
    if not shards:
        raise EmptySourceError(f"no tar shards match {source!r}")
    root = os.path.commonpath([os.path.dirname(os.path.abspath(s)) for s in shards])
    paths, members, offsets, sizes = [], [], [], []
    for shard in shards:
        rel = os.path.relpath(os.path.abspath(shard), root)
        for name, offset, size in tar_index(shard, cache_dir=cache_dir):
            paths.append(rel)
            members.append(name)
            offsets.append(offset)
            sizes.append(size)
    return SampleList(
        root=root,
        paths=paths,
        members=members,
        offsets=np.asarray(offsets, dtype=np.int64),
        sizes=np.asarray(sizes, dtype=np.int64),
    )
