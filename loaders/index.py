"""The validation pass over every file of a source (``clipdistill index``).

Every sample gets the cheap check of :mod:`formats` (magic bytes; JPEG/PNG end
marker in the last 64 KiB); with ``decode=True`` also a full PIL decode. The work
is spread over processes (fork: the sample list is inherited, only rejects travel
back), in chunks, with a progress bar on stderr. Outputs:

- the clean list (a :class:`SampleList` file of the samples that passed, in the
  source's order, ids renumbered from 0);
- the reject list: ``location<TAB>reason<TAB>detail`` per rejected sample, and per
  entry the scan did not list (:attr:`SampleList.skipped`: symlink loops,
  duplicates, unsupported image kinds, unreadable folders, truncated shards);
- a summary ``{"total", "valid", "rejected", "reasons": {reason: count}, "other_files"}``,
  where ``total`` counts both (``valid + rejected == total``); ``other_files`` counts the
  files of a folder that are not images (captions, JSON, ...): not rejects, not in ``total``.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
from tqdm import tqdm

from . import formats
from .sources import SampleList, resolve_source

_WORKER_SAMPLES: SampleList | None = None  # set before forking the pool
_WORKER_DECODE = False
_WORKER_MAX_PIXELS = formats.DEFAULT_MAX_PIXELS
# The cheap check runs at about 50-80k files/s in one process; below this many
# files, forking a pool (~0.1 s) is slower than checking them all here.
_INLINE_BELOW = 8192


def check_sample(samples: SampleList, i: int, decode: bool = False,
                 max_pixels: int = formats.DEFAULT_MAX_PIXELS) -> tuple[str | None, str]:
    """(reason or None, detail) for sample ``i``: the cheap check, then optionally a full decode."""
    path, offset, size = samples.byte_range(i)
    reason, detail = formats.check_file_range(path, offset, size)
    if reason is not None or not decode:
        return reason, detail
    try:
        data = samples.read(i)
    except FileNotFoundError:
        return formats.MISSING, "file not found"
    except OSError as exc:
        return formats.UNREADABLE, f"{type(exc).__name__}: {exc}"
    return formats.full_decode_check(data, max_pixels)


def _check_chunk(bounds: tuple[int, int]) -> tuple[int, list[tuple[int, str, str]]]:
    start, stop = bounds
    samples = _WORKER_SAMPLES
    rejects = []
    for i in range(start, stop):
        reason, detail = check_sample(samples, i, _WORKER_DECODE, _WORKER_MAX_PIXELS)
        if reason is not None:
            rejects.append((i, reason, detail))
    return stop - start, rejects


class _Progress:
    """A tqdm bar when enabled, else nothing."""

    def __init__(self, total: int, enabled: bool, desc: str):
        self.bar = None
        if enabled:
            self.bar = tqdm(total=total, desc=desc, unit="file", unit_scale=True, file=sys.stderr,
                            mininterval=0.5, smoothing=0.1)

    def update(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def validate(
    samples: SampleList,
    *,
    decode: bool = False,
    workers: int | None = None,
    progress: bool = False,
    chunk_size: int | None = None,
    max_pixels: int = formats.DEFAULT_MAX_PIXELS,
) -> list[tuple[int, str, str]]:
    """Check every sample; return the rejects as (sample id, reason, detail), sorted by id.

    Args:
        workers: processes (default: all cores); 1 checks in this process.
        chunk_size: samples per task (default: adapts to the list and worker count).
    """
    global _WORKER_SAMPLES, _WORKER_DECODE, _WORKER_MAX_PIXELS
    n = len(samples)
    workers = max(1, workers or os.cpu_count() or 1)
    if not decode and n < _INLINE_BELOW:
        workers = 1  # starting processes costs more than checking a few thousand files here
    if chunk_size is None:
        chunk_size = max(16 if decode else 256, min(4096, n // (workers * 8) or 1))
    chunks = [(s, min(n, s + chunk_size)) for s in range(0, n, chunk_size)]
    bar = _Progress(n, progress, "clipdistill index")
    rejects: list[tuple[int, str, str]] = []
    _WORKER_SAMPLES, _WORKER_DECODE, _WORKER_MAX_PIXELS = samples, decode, max_pixels
    try:
        if workers == 1 or len(chunks) == 1:
            results = map(_check_chunk, chunks)
            for done, found in results:
                rejects.extend(found)
                bar.update(done)
        else:
            # fork: workers inherit the sample list instead of receiving it pickled.
            ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
            with ctx.Pool(min(workers, len(chunks))) as pool:
                for done, found in pool.imap_unordered(_check_chunk, chunks):
                    rejects.extend(found)
                    bar.update(done)
    finally:
        _WORKER_SAMPLES = None
        bar.close()
    rejects.sort()
    return rejects


def index_source(
    source,
    out: str | os.PathLike,
    *,
    rejects_out: str | os.PathLike | None = None,
    decode: bool = False,
    workers: int | None = None,
    progress: bool = False,
    cache_dir: str | os.PathLike | None = None,
    rescan: bool = False,
    max_pixels: int = formats.DEFAULT_MAX_PIXELS,
) -> dict:
    """Validate a source and write its clean list and reject list.

    Args:
        source: anything :func:`resolve_source` accepts.
        out: path of the clean list file.
        rejects_out: path of the reject list (default: ``<out>.rejects.tsv``).

    Returns:
        the summary: {"total", "valid", "rejected", "reasons", "other_files", "seconds",
        "files_per_s", "out", "rejects"}.
    """
    samples = resolve_source(source, cache_dir=cache_dir, rescan=rescan)
    started = time.perf_counter()
    rejects = validate(samples, decode=decode, workers=workers, progress=progress, max_pixels=max_pixels)
    seconds = time.perf_counter() - started
    rejected = np.zeros(len(samples), dtype=bool)
    for i, _, _ in rejects:
        rejected[i] = True
    out = Path(out)
    samples.subset(np.flatnonzero(~rejected)).save(out)
    rejects_path = Path(rejects_out) if rejects_out is not None else out.with_name(out.name + ".rejects.tsv")
    rejects_path.parent.mkdir(parents=True, exist_ok=True)
    found = [(samples.location(i), reason, detail) for i, reason, detail in rejects] + list(samples.skipped)
    with open(rejects_path, "w", encoding="utf-8", errors="surrogateescape") as fh:
        fh.write("# location\treason\tdetail\n")
        for location, reason, detail in found:
            fh.write(f"{_one_field(location)}\t{reason}\t{_one_field(detail)}\n")
    return {
        "total": len(samples) + len(samples.skipped),
        "valid": int(len(samples) - rejected.sum()),
        "rejected": len(found),
        "reasons": dict(sorted(Counter(r for _, r, _ in found).items())),
        "other_files": samples.other_files,
        "seconds": round(seconds, 3),
        "files_per_s": round(len(samples) / seconds, 1) if seconds > 0 else None,
        "out": str(out),
        "rejects": str(rejects_path),
    }


def _one_field(text: str) -> str:
    """A TSV field: tabs and line breaks (which a file name may hold) written as escapes."""
    return text.replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")
