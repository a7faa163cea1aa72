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

- a folder: walked recursively with ``os.scandir`` (no per-file stat), following
  each symbolic link once (:func:`walk_folder`), images recognized by extension,
  sorted by relative path; what is not listed (hidden names, other kinds, loops,
  duplicates, dangling links, unreadable folders) is kept with its reason in
  :attr:`SampleList.skipped`;
- a text list file (``.txt``, ``.list``, ...): used as is;
- WebDataset-style tar shards: a ``.tar`` path, a glob (``"shards/*.tar"``), a
  brace pattern (``"shards-{00000..01023}.tar"``, ``"{train,extra}/*.tar"``; see
  :func:`expand_braces`) or a list of ``.tar`` paths; each shard gets an index
  file ``<shard>.idx`` (member, offset, size of its images) made when missing. A
  shard that is not a tar, or is truncated, is skipped with its reason (its
  complete members are kept); the other shards are used. Non-image members
  (captions, JSON) are not counted.

Folder and shard sources are saved under a cache folder (``cache_dir``, else
``$CLIPDISTILL_CACHE``, else ``~/.cache/clipdistill``) keyed by the source path,
with a record of the source's state beside the list (``<key>.state.json``: the
mtime of every folder walked, the size and mtime of every shard). Before a
saved list is used, that state is compared with the source's (one ``stat`` per
folder): files added, removed or renamed change their folder's mtime, and the
source is scanned again, with a warning that says so. A resumed run passes
``keep_saved=True``: it keeps the list it started with (its checkpoints hold
that list's digest) and the warning says the source changed.
"""
from __future__ import annotations

import errno
import glob
import hashlib
import heapq
import json
import logging
import os
import re
import stat
import tarfile
import time
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from . import formats
from .formats import DUPLICATE, SYMLINK_LOOP, UNSUPPORTED

logger = logging.getLogger("clipdistill.loaders")

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"})
# Image kinds the loaders do not decode: counted as unsupported in tar shards too (other members are captions).
OTHER_IMAGE_EXTENSIONS = frozenset({".gif", ".jp2", ".j2k", ".jpx", ".heic", ".heif", ".avif", ".jxl", ".svg",
                                    ".ico", ".tga", ".psd", ".pbm", ".pgm", ".ppm", ".pnm", ".exr", ".dng"})
LIST_HEADER = "# clipdistill sample list v1"
# A folder whose mtime is this close to the start of its scan may change again within the same
# timestamp tick unseen: its saved list is not trusted (scanned again, quietly) -- git's "racy clean".
_RACY_NS = 2_000_000_000


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
        skipped: (location, reason, detail) of each entry of the scanned source that is not a
            sample (see :func:`walk_folder`); not part of the list's identity (:meth:`digest`).
        other_files: how many other entries of a scanned folder are neither samples nor rejects
            (captions, JSON, hidden folders: :attr:`FolderScan.other`); not part of its identity.
    """

    root: str
    paths: list[str]
    members: list[str] | None = None
    offsets: np.ndarray | None = None
    sizes: np.ndarray | None = None
    skipped: list = field(default_factory=list, compare=False)
    other_files: int = field(default=0, compare=False)
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


@dataclass
class FolderScan:
    """What one walk of a folder found.

    Attributes:
        paths: the image files, relative to the folder, sorted.
        skipped: (relative path, reason, detail) of each entry not listed (see :data:`SKIP_REASONS`), sorted.
        dirs: (relative path, mtime in ns) of every directory listed: the folder's state, to revalidate a saved list.
        other: how many other entries were not listed and not recorded: files of kinds that are not
            images (captions, JSON, ...), hidden folders and links to them.
    """

    paths: list[str]
    skipped: list[tuple[str, str, str]]
    dirs: list[tuple[str, int]]
    other: int = 0


def walk_folder(root: str | os.PathLike, extensions: frozenset[str] = IMAGE_EXTENSIONS) -> FolderScan:
    """Walk ``root`` recursively, following each symbolic link once; never stops at a bad entry.

    Uses ``os.scandir``: directory entries carry their type, so only directories and
    symbolic links are stat'ed, never a plain file. Every real directory is listed once,
    whatever links lead to it: plain directories first, then linked ones in the order of
    their paths (so which path names a folder reached twice does not depend on the
    file system's listing order); a link back to a folder already listed is a
    ``symlink_loop`` (to an enclosing folder) or a ``duplicate``. A file link whose target
    is also listed is a ``duplicate``; a link that loops or points nowhere, a folder that
    cannot be listed, and image-like names that are not samples (other image kinds such as
    GIF, hidden image files, special files with image names) are skipped with their reason
    (``symlink_loop``, ``missing``, ``unreadable``, ``unsupported``). Everything else (captions,
    JSON, hidden folders, ...) is not a reject, as in tar shards: only counted (``other``).
    """
    root = os.fspath(root)
    top = os.stat(root)
    seen_dirs: dict[tuple[int, int], str] = {(top.st_dev, top.st_ino): ""}
    plain: list[tuple[str, os.stat_result]] = [("", top)]  # folders reached by real names: walked first
    linked: list[str] = []  # heap of the relative paths of linked folders, walked in path order
    found: list[str] = []
    skipped: list[tuple[str, str, str]] = []
    dirs: list[tuple[str, int]] = []
    other = 0
    file_links: list[tuple[str, tuple[int, int]]] = []  # (relative path, (st_dev, st_ino) of the target)
    devices, inodes = array("Q"), array("Q")  # of each plain file listed, to find links to them (16 bytes a file)

    def enter(rel: str, st: os.stat_result) -> None:
        ident = (st.st_dev, st.st_ino)
        first = seen_dirs.get(ident)
        if first is None:
            seen_dirs[ident] = rel
            plain.append((rel, st))
        elif first == "" or rel.startswith(first + "/"):
            skipped.append((rel, SYMLINK_LOOP, f"links back to the enclosing folder {first or '.'!r}"))
        else:
            skipped.append((rel, DUPLICATE, f"the same folder as {first!r}, listed there"))

    while plain or linked:
        if not plain:
            rel = heapq.heappop(linked)
            try:
                st = os.stat(os.path.join(root, rel))
            except OSError as exc:
                skipped.append((rel, _link_reason(exc), _os_detail(exc)))
                continue
            enter(rel, st)
            continue
        rel_dir, dir_stat = plain.pop()
        dirs.append((rel_dir, dir_stat.st_mtime_ns))
        try:
            with os.scandir(os.path.join(root, rel_dir) if rel_dir else root) as it:
                entries = list(it)
        except OSError as exc:
            skipped.append((rel_dir or ".", formats.UNREADABLE, f"cannot list this folder: {_os_detail(exc)}"))
            continue
        for entry in entries:
            name = entry.name
            rel = f"{rel_dir}/{name}" if rel_dir else name
            try:
                if not entry.is_symlink() and not entry.is_dir(follow_symlinks=False):
                    # the common case, kept lean: a plain file (d_type from the listing, no stat)
                    if name[0] != "." and name[name.rfind("."):].lower() in extensions \
                            and entry.is_file(follow_symlinks=False) and _listable(rel):
                        found.append(rel)
                        devices.append(dir_stat.st_dev)
                        inodes.append(entry.inode())
                    elif _image_like(name, extensions):
                        mode = stat.S_IFREG if entry.is_file(follow_symlinks=False) else 0
                        skipped.append((rel, UNSUPPORTED, _unlisted(rel, name, mode, extensions)))
                    else:
                        other += 1  # captions, metadata, ...: not rejects, only counted
                    continue
                if name.startswith("."):
                    if _image_like(name, extensions):
                        skipped.append((rel, UNSUPPORTED, _unlisted(rel, name, 0, extensions)))
                    else:
                        other += 1  # a hidden folder (.git, .cache, ...) or link
                    continue
                if not entry.is_symlink():
                    enter(rel, entry.stat(follow_symlinks=False))
                    continue
                target = os.stat(entry.path)
            except OSError as exc:
                skipped.append((rel, _link_reason(exc), _os_detail(exc)))
                continue
            if stat.S_ISDIR(target.st_mode):
                heapq.heappush(linked, rel)
                continue
            why = _unlisted(rel, name, target.st_mode, extensions)
            if why is not None and _image_like(name, extensions):
                skipped.append((rel, UNSUPPORTED, why))
            elif why is not None:
                other += 1
            else:
                file_links.append((rel, (target.st_dev, target.st_ino)))
    if file_links:  # a link to a file listed under its own name (or by an earlier link) is a duplicate
        file_links.sort()
        wanted = {ident for _, ident in file_links}
        plain_files = {ident: found[i] for i, ident in enumerate(zip(devices, inodes)) if ident in wanted}
        targets: dict[tuple[int, int], str] = {}
        for rel, ident in file_links:
            first = plain_files.get(ident) or targets.setdefault(ident, rel)
            if first != rel:
                skipped.append((rel, DUPLICATE, f"links to the same file as {first!r}, listed there"))
            else:
                found.append(rel)
    found.sort()
    skipped.sort()
    dirs.sort()
    return FolderScan(found, skipped, dirs, other)


def scan_folder(root: str | os.PathLike, extensions: frozenset[str] = IMAGE_EXTENSIONS) -> list[str]:
    """Relative paths of the image files under ``root``, sorted (:func:`walk_folder`'s ``paths``).

    What is not listed is logged in one warning line per reason, with a count.
    """
    scan = walk_folder(root, extensions)
    log_skipped(os.fspath(root), scan.skipped)
    return scan.paths


def log_skipped(source: str, skipped: list) -> None:
    """One warning naming how many entries of ``source`` were skipped, by reason, and the first few."""
    if skipped:
        reasons = ", ".join(f"{n} {r}" for r, n in sorted(_count(r for _, r, _ in skipped).items()))
        first = "; ".join(f"{loc}: {r} ({d})" for loc, r, d in skipped[:3])
        logger.warning("clipdistill.loaders: %s: %d entries not used (%s): %s%s", source, len(skipped), reasons,
                       first, "; ..." if len(skipped) > 3 else "")


def _count(items) -> dict:
    counts: dict = {}
    for item in items:
        counts[item] = counts.get(item, 0) + 1
    return counts


def _link_reason(exc: OSError) -> str:
    if exc.errno == errno.ELOOP:
        return SYMLINK_LOOP
    if isinstance(exc, FileNotFoundError):
        return formats.MISSING
    return formats.UNREADABLE


def _os_detail(exc: OSError) -> str:
    if exc.errno == errno.ELOOP:
        return "a symbolic link that leads back to itself"
    if isinstance(exc, FileNotFoundError):
        return "a symbolic link to nothing"
    return f"{type(exc).__name__}: {exc.strerror or exc}"


def _listable(rel: str) -> bool:
    return "\t" not in rel and "\n" not in rel and "\r" not in rel


def _image_like(name: str, extensions: frozenset[str]) -> bool:
    """Whether a name that is not a sample still names an image (a reject worth naming), not a caption or such."""
    ext = name[name.rfind("."):].lower() if name.rfind(".") > 0 else ""
    return ext in extensions or ext in IMAGE_EXTENSIONS or ext in OTHER_IMAGE_EXTENSIONS


def _unlisted(rel: str, name: str, mode: int, extensions: frozenset[str]) -> str | None:
    """Why an entry that is not a folder is not a sample, or None when it is one."""
    if name.startswith("."):
        return "hidden name (starts with '.')"
    if not stat.S_ISREG(mode):
        return "not a regular file"
    ext = os.path.splitext(name)[1].lower()
    if ext not in extensions:
        return f"not an image kind the loaders decode ({ext or 'no extension'})"
    if not _listable(rel):
        return "a tab or newline in its path (the list format cannot hold it)"
    return None


def tar_index(shard: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None) -> list[tuple[str, int, int]]:
    """(member, data offset, size) of the image members of an uncompressed tar shard.

    Read from ``<shard>.idx`` when present and newer than the shard; otherwise
    built by walking the tar headers and written next to the shard (or under
    ``cache_dir`` when the shard's folder is read-only).

    Raises:
        ValueError: the shard is not a plain tar, or is truncated (:func:`tar_members` keeps what is complete).
    """
    entries, skipped = tar_members(shard, cache_dir=cache_dir)
    bad = [detail for _, reason, detail in skipped if reason != UNSUPPORTED]
    if bad:
        raise ValueError(f"{os.fspath(shard)}: {bad[0]}")
    return entries


def tar_members(shard: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None):
    """A shard's image members and what was skipped: (entries, [(location, reason, detail)]).

    A shard that is not a plain tar is skipped whole (``unknown_format``); a truncated one
    (a header or a member's data cut off, or no end-of-archive blocks) keeps the members
    that lie wholly inside the file and is named with ``truncated``. Its index file is not
    written, so the next scan looks again. Members of image kinds the loaders do not decode
    (GIF, ...) are ``unsupported``.
    """
    shard = os.fspath(shard)
    candidates = [shard + ".idx", os.path.join(_cache_dir(cache_dir), "tar", _key(shard) + ".idx")]
    shard_stat = os.stat(shard)
    for idx in candidates:
        if os.path.exists(idx) and os.stat(idx).st_mtime >= shard_stat.st_mtime:
            with open(idx, encoding="utf-8", errors="surrogateescape") as fh:
                rows = [line.rstrip("\n").split("\t") for line in fh if line.strip()]
            return [(name, int(off), int(size)) for name, off, size in rows], []
    entries, skipped, problem = [], [], None
    end = 0
    try:
        with tarfile.open(shard, mode="r:") as tar:
            for member in tar:
                ext = os.path.splitext(member.name)[1].lower()
                if member.isfile() and ext in OTHER_IMAGE_EXTENSIONS:
                    skipped.append((f"{shard}:{member.name}", UNSUPPORTED,
                                    f"not an image kind the loaders decode ({ext})"))
                elif member.isfile() and ext in IMAGE_EXTENSIONS and "\t" not in member.name \
                        and "\n" not in member.name:
                    entries.append((member.name, member.offset_data, member.size))
            end = tar.offset
    except tarfile.ReadError as exc:
        problem = str(exc)
    complete = [e for e in entries if e[1] + e[2] <= shard_stat.st_size]
    if problem is None and shard_stat.st_size - end < tarfile.BLOCKSIZE:
        problem = "no end-of-archive blocks"
    if problem is not None:
        if not entries and "end of data" not in problem and "truncated" not in problem:
            skipped.append((shard, formats.UNKNOWN_FORMAT,
                            f"not an uncompressed tar file ({problem}); shards must be plain .tar"))
        else:
            skipped.append((shard, formats.TRUNCATED,
                            f"truncated tar ({problem}) at {shard_stat.st_size} bytes: {len(complete)} complete "
                            f"image members kept, {len(entries) - len(complete)} cut off, any later ones lost"))
        return complete, skipped
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
    return entries, skipped


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
    keep_saved: bool = False,
) -> SampleList:
    """Resolve a source to its stable, ordered :class:`SampleList`.

    Args:
        source: a folder, a list file, a ``.tar`` shard, a glob of shards, a list
            of shard paths, or an existing SampleList (returned as is).
        cache_dir: where scanned lists are saved (see the module docstring).
        rescan: scan again even if a saved list exists.
        keep_saved: use the saved list even when the source changed since it was
            saved (a resumed run), with a warning that names the change.

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
    what = f"tar shards {source!r}" if shards is not None else f"folder {os.fspath(source)!r}"
    key = _key(repr(sorted(os.path.abspath(s) for s in shards)) if shards is not None else os.path.abspath(source))
    saved = Path(_cache_dir(cache_dir)) / "lists" / f"{key}.list"
    record = saved.with_name(f"{key}.state.json")
    old, change = None, None
    if saved.exists() and not rescan:
        old = SampleList.load(saved)
        state = _read_state(record)
        change = _state_change(state, old.root, shards)
        if change is None or keep_saved:
            if change not in (None, "racy"):
                logger.warning("clipdistill.loaders: %s changed since this run's list was saved (%s); the run keeps "
                               "its list of %d images (%s); start a new run to use the change", what, change,
                               len(old), saved)
            saved_skipped = [tuple(x) for x in (state or {}).get("skipped", [])]
            # an older version recorded every caption as `unsupported`: those are other files now
            old.skipped = [x for x in saved_skipped if x[1] != UNSUPPORTED or _image_like(os.path.basename(x[0]),
                                                                                            IMAGE_EXTENSIONS)]
            old.other_files = int((state or {}).get("other_files", 0)) + len(saved_skipped) - len(old.skipped)
            log_skipped(what, old.skipped)
            logger.info("clipdistill.loaders: %d samples from the saved list %s", len(old), saved)
            _check_not_empty(old, what)
            return old
        if change != "racy":
            logger.warning("clipdistill.loaders: %s changed since its list was saved (%s); scanning it again",
                           what, change)
    samples, state = _scan(source, shards, cache_dir)
    _check_not_empty(samples, what)
    samples.save(saved)
    _write_state(record, dict(state, other_files=samples.other_files), samples.skipped)
    log_skipped(what, samples.skipped)
    if old is not None:
        before = {old.location(i) for i in range(len(old))}
        now = {samples.location(i) for i in range(len(samples))}
        added, gone = len(now - before), len(before - now)
        logger.log(logging.INFO if change == "racy" and not added and not gone else logging.WARNING,
                   "clipdistill.loaders: %s scanned again: %d samples (%d added, %d gone); list saved to %s",
                   what, len(samples), added, gone, saved)
    else:
        logger.info("clipdistill.loaders: scanned %d samples, list saved to %s", len(samples), saved)
    return samples


def _check_not_empty(samples: SampleList, what: str) -> None:
    if len(samples) == 0:
        reasons = ", ".join(f"{n} {r}" for r, n in sorted(_count(r for _, r, _ in samples.skipped).items()))
        raise EmptySourceError(
            f"no images found in {what} (looked for {', '.join(sorted(IMAGE_EXTENSIONS))}"
            + (f"; skipped: {reasons}" if reasons else "")
            + (f"; {samples.other_files} other files" if samples.other_files else "")
            + "); check the path, or pass a list file"
        )


def _read_state(record: Path) -> dict | None:
    try:
        state = json.loads(record.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) and state.get("version") == 1 else None


def _write_state(record: Path, state: dict, skipped: list) -> None:
    tmp = record.with_name(record.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(dict(state, version=1, skipped=[list(x) for x in skipped])), encoding="utf-8")
    os.replace(tmp, record)


def _state_change(state: dict | None, root: str, shards: list[str] | None) -> str | None:
    """How a source differs from its saved state: None (unchanged), "racy" (saved while it
    was being written: not trusted) or a short description of the first difference."""
    if state is None:
        return "no record of its state beside the saved list (saved by an older version, or damaged)"
    try:
        if shards is not None:
            for path, size, mtime_ns in state["shards"]:
                st = os.stat(path)
                if (st.st_size, st.st_mtime_ns) != (size, mtime_ns):
                    return f"shard {path!r} was rewritten"
            return None
        racy = False
        for rel, mtime_ns in state["dirs"]:
            mtime = os.stat(os.path.join(root, rel) if rel else root).st_mtime_ns
            if mtime != mtime_ns:
                return f"files were added, removed or renamed in {rel or '.'!r}"
            racy |= mtime_ns > state["scanned_ns"] - _RACY_NS
    except FileNotFoundError as exc:
        return f"{exc.filename!r} is gone"
    except (OSError, KeyError, TypeError, ValueError) as exc:
        return f"its state cannot be checked ({type(exc).__name__}: {exc})"
    return "racy" if racy else None


def _scan(source, shards: list[str] | None, cache_dir) -> tuple[SampleList, dict]:
    """The source's samples and the state to save beside them."""
    if shards is None:
        root = os.path.abspath(source)
        scanned_ns = time.time_ns()
        scan = walk_folder(root)
        skipped = [(os.path.join(root, rel), reason, detail) for rel, reason, detail in scan.skipped]
        samples = SampleList(root=root, paths=scan.paths, skipped=skipped, other_files=scan.other)
        return samples, {"scanned_ns": scanned_ns, "dirs": scan.dirs}
    if not shards:
        raise EmptySourceError(f"no tar shards match {source!r}")
    root = os.path.commonpath([os.path.dirname(os.path.abspath(s)) for s in shards])
    paths, members, offsets, sizes, skipped, state = [], [], [], [], [], []
    for shard in shards:
        shard = os.path.abspath(shard)
        st = os.stat(shard)
        state.append([shard, st.st_size, st.st_mtime_ns])
        rel = os.path.relpath(shard, root)
        entries, problems = tar_members(shard, cache_dir=cache_dir)
        skipped += problems
        for name, offset, size in entries:
            paths.append(rel)
            members.append(name)
            offsets.append(offset)
            sizes.append(size)
    samples = SampleList(
        root=root,
        paths=paths,
        members=members,
        offsets=np.asarray(offsets, dtype=np.int64),
        sizes=np.asarray(sizes, dtype=np.int64),
        skipped=skipped,
    )
    return samples, {"shards": state}
