"""The one benchmark harness: timing, peak memory, provenance and the results format.

Every benchmark in this folder times its cases with :func:`measure` and writes
its rows with :func:`record`, so that all numbers in ``benchmarks/results/``
share one schema:

    benchmark, provider, shape, dtype, metric, median, p20, p80, unit,
    peak_mem_bytes, repeats, device, device_kind, torch, triton, clipdistill,
    python, commit, dirty, date, quick

plus any extra fields a benchmark adds (images_per_s, cpu_util, ...). Rows are
JSON lines appended to ``benchmarks/results/<benchmark>.jsonl``; plots are
regenerated from those files by ``python -m benchmarks.plot``.

Timing: on CUDA, each repeat is bracketed by CUDA events and the device is
synchronized once at the end (event timing measures device time, not the host's
launch overhead); on CPU, ``time.perf_counter`` around a call. Peak memory is
``torch.cuda.max_memory_allocated`` above what was allocated before the case on
CUDA, and the process's peak RSS growth (ru_maxrss, coarse) on CPU.
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import resource
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch

RESULTS_DIR = Path(os.environ.get("CLIPDISTILL_RESULTS_DIR", Path(__file__).resolve().parent / "results"))

SCHEMA_FIELDS = (
    "benchmark", "provider", "shape", "dtype", "metric", "median", "p20", "p80", "unit",
    "peak_mem_bytes", "repeats", "device", "device_kind", "torch", "triton", "clipdistill",
    "python", "commit", "dirty", "date", "quick",
)
REQUIRED_ROW_FIELDS = ("provider", "shape", "dtype", "metric", "median", "p20", "p80", "unit")


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (q in [0, 100]) of a non-empty sequence."""
    if not values:
        raise ValueError("percentile: values is empty")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def _as_device(device: "str | torch.device | None") -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _rss_bytes() -> int:
    # ru_maxrss is in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure(
    fn: Callable[[], Any],
    *,
    device: "str | torch.device | None" = None,
    warmup: int = 3,
    repeats: int = 10,
    max_seconds: float | None = None,
) -> dict:
    """Time ``fn()`` and report its median, 20th and 80th percentile in milliseconds.

    Args:
        fn: a zero-argument callable running one case (its result is discarded).
        device: where ``fn`` runs; CUDA uses CUDA events, CPU the wall clock.
        warmup: untimed calls first (compilation, caches, autotuning).
        repeats: timed calls; at least 1.
        max_seconds: stop repeating early once this much time was spent timing
            (at least 3 repeats are kept when possible); for quick runs.

    Returns:
        dict with median, p20, p80 (ms), unit "ms", repeats, peak_mem_bytes.
    """
    if repeats < 1:
        raise ValueError(f"measure: repeats must be >= 1, got {repeats}")
    if warmup < 0:
        raise ValueError(f"measure: warmup must be >= 0, got {warmup}")
    dev = _as_device(device)
    for _ in range(warmup):
        fn()
    times_ms: list[float] = []
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        base = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        events = []
        started = time.perf_counter()
        for i in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            events.append((start, end))
            if max_seconds is not None and i >= 2 and time.perf_counter() - started > max_seconds:
                break
        torch.cuda.synchronize(dev)
        times_ms = [s.elapsed_time(e) for s, e in events]
        peak = max(0, torch.cuda.max_memory_allocated(dev) - base)
    else:
        base = _rss_bytes()
        started = time.perf_counter()
        for i in range(repeats):
            t0 = time.perf_counter()
            fn()
            times_ms.append((time.perf_counter() - t0) * 1e3)
            if max_seconds is not None and i >= 2 and time.perf_counter() - started > max_seconds:
                break
        peak = max(0, _rss_bytes() - base)
    return {
        "median": percentile(times_ms, 50),
        "p20": percentile(times_ms, 20),
        "p80": percentile(times_ms, 80),
        "unit": "ms",
        "repeats": len(times_ms),
        "peak_mem_bytes": int(peak),
    }


def _git(*args: str) -> str:
    try:
        out = subprocess.run(
            ["git", *args], cwd=Path(__file__).resolve().parent, capture_output=True, text=True, timeout=10
        )
        return out.stdout.strip() if out.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def _version(module: str) -> str:
    try:
        from importlib import metadata

        return metadata.version(module)
    except Exception:  # not installed
        return ""


def device_name(device: "str | torch.device | None" = None) -> str:
    dev = _as_device(device)
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"cpu: {platform.processor() or platform.machine()} x{os.cpu_count()}"


def provenance(device: "str | torch.device | None" = None) -> dict:
    """What ran: device, library versions, commit (and whether the tree was dirty), UTC date."""
    dev = _as_device(device)
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = ""
    return {
        "device": device_name(dev),
        "device_kind": dev.type,
        "torch": torch.__version__,
        "triton": triton_version,
        "clipdistill": _version("clipdistill"),
        "python": platform.python_version(),
        "commit": _git("rev-parse", "--short=12", "HEAD"),
        "dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def record(
    benchmark: str,
    rows: Iterable[dict],
    *,
    device: "str | torch.device | None" = None,
    quick: bool = False,
    results_dir: "str | Path | None" = None,
) -> list[dict]:
    """Append rows to ``<results_dir>/<benchmark>.jsonl`` with provenance; return the full rows.

    Each row needs provider, shape, dtype, metric, median, p20, p80 and unit;
    extra keys are kept. Rows are written (and flushed) one by one so that a
    run stopped at a time limit keeps what it measured.
    """
    if not benchmark or "/" in benchmark:
        raise ValueError(f"record: benchmark must be a plain name, got {benchmark!r}")
    folder = Path(results_dir) if results_dir is not None else RESULTS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    prov = provenance(device)
    written = []
    with open(folder / f"{benchmark}.jsonl", "a", encoding="utf-8") as fh:
        for row in rows:
            missing = [k for k in REQUIRED_ROW_FIELDS if k not in row]
            if missing:
                raise ValueError(f"record: row for {benchmark!r} lacks {missing}: {row}")
            full = {"benchmark": benchmark, **row, **prov, "quick": bool(quick)}
            full.setdefault("peak_mem_bytes", None)
            full.setdefault("repeats", None)
            fh.write(json.dumps(full, sort_keys=False) + "\n")
            fh.flush()
            written.append(full)
    return written


def load_results(benchmark: str | None = None, results_dir: "str | Path | None" = None) -> list[dict]:
    """Read rows back (all benchmarks, or one); malformed lines raise with their file and line."""
    folder = Path(results_dir) if results_dir is not None else RESULTS_DIR
    files = [folder / f"{benchmark}.jsonl"] if benchmark else sorted(folder.glob("*.jsonl"))
    rows = []
    for path in files:
        if not path.exists():
            continue
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: not a JSON line ({exc})") from exc
    return rows


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if value is None:
        return "-"
    return str(value)


def print_table(rows: Sequence[dict], columns: Sequence[str] | None = None) -> str:
    """Print rows as an aligned text table (and return it)."""
    if not rows:
        print("(no rows)")
        return "(no rows)"
    if columns is None:
        columns = ["provider", "shape", "dtype", "metric", "median", "p20", "p80", "unit", "peak_mem_bytes"]
        extra = [k for k in rows[0] if k not in columns and k not in SCHEMA_FIELDS]
        columns = columns + extra
    cells = [[_fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def summary_line(benchmark: str, rows: Sequence[dict], **extra: Any) -> str:
    """The one JSON line a benchmark prints last."""
    line = json.dumps(
        {
            "benchmark": benchmark,
            "rows": len(rows),
            "device": rows[0].get("device") if rows else device_name(),
            **extra,
        }
    )
    print(line, flush=True)
    return line
