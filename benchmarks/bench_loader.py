"""Loader throughput: images/s and CPU use per backend and worker count, and ``clipdistill index`` files/s.

    python -m benchmarks.bench_loader [--quick] [--images N] [--batch B] [--backends torch dali-cpu dali-gpu]
                                      [--workers 1 2 ...] [--outputs 224 224+336] [--repeats R]
                                      [--index-files N] [--data DIR] [--budget-s S]

Data: generated ImageNet-like JPEGs (about 500x375, quality 90, natural-looking:
smooth multi-scale fields, sharp-edged shapes, texture and grain; see
clipdistill.loaders.synthetic), written once under ``--data`` (default
``$CLIPDISTILL_BENCH_DATA`` or ``~/.cache/clipdistill/bench_loader``) and reused.

Cases (each one epoch over the images, train transform: random resized crop +
flip + normalize; fp32 on the CPU, or bf16 delivered on the GPU by every
backend when there is one):

- ``loader``: per backend x workers (DataLoader processes or DALI threads),
  output 224 and the dual 224 + 336 path (one decode, two resolutions);
- ``index``: the cheap check (magic bytes + end marker) over ``--index-files``
  files with 1 process and with all cores (the scan is not timed), and the whole
  command (scan, check, lists written).

Rows are recorded (and flushed) as each case finishes, so a run stopped at a time limit keeps
what it measured; ``--budget-s`` stops starting new cases once that much time has passed.
Defaults are sized per machine: the CPU machine gets every worker count and the index
benchmark; a GPU machine (whose suite has minutes, not hours) gets 2,048 images, the
machine's core count of workers (at most 16), and no index corpus (the index check is a CPU
benchmark, measured on the CPU machine).

Timing is wall clock (time.perf_counter) through the shared harness; images/s
is images per epoch over the median epoch time; cpu_util is the process's and
its reaped children's CPU time over wall time, divided by the core count (1.0 =
every core busy); loadavg_1m_before shows other work on a shared machine.
Targets (issue 4): dali-gpu at batch 256 >= 7,000 images/s and >= 4x the torch
backend with 16 workers; index >= 20,000 files/s on 2 cores.
"""
from __future__ import annotations

import argparse
import os
import resource
import shutil
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from benchmarks.harness import measure, print_table, record, summary_line

BENCHMARK = "bench_loader"
PHOTO_SIZE = (500, 375)


def default_data_dir() -> Path:
    env = os.environ.get("CLIPDISTILL_BENCH_DATA")
    return Path(env) if env else Path.home() / ".cache" / "clipdistill" / "bench_loader"


def _write_chunk(args):
    from clipdistill.loaders.synthetic import write_dataset

    folder, start, count = args
    return write_dataset(Path(folder) / f"part{start:07d}", count, size=PHOTO_SIZE, jitter=0.15, seed=start,
                         subfolders=0)


def ensure_photos(folder: Path, count: int) -> Path:
    """``count`` generated photos under ``folder/photos_<count>`` (made once, in parallel)."""
    target = folder / f"photos_{count}"
    done = target / ".complete"
    if done.exists():
        return target
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    per = 256
    tasks = [(str(target), s, min(per, count - s)) for s in range(0, count, per)]
    import multiprocessing as mp

    with mp.get_context("fork").Pool(os.cpu_count() or 1) as pool:
        pool.map(_write_chunk, tasks)
    done.write_text("ok")
    return target


def ensure_index_corpus(folder: Path, photos: Path, count: int) -> Path:
    """``count`` distinct files (copies of the photos) in folders of 1000, for the index check."""
    target = folder / f"index_{count}"
    done = target / ".complete"
    if done.exists():
        return target
    shutil.rmtree(target, ignore_errors=True)
    blobs = [p.read_bytes() for p in sorted(photos.rglob("*.jpg"))]
    for i in range(count):
        sub = target / f"d{i // 1000:04d}"
        if i % 1000 == 0:
            sub.mkdir(parents=True)
        (sub / f"f{i:07d}.jpg").write_bytes(blobs[i % len(blobs)])
    done.write_text("ok")
    return target


class _CpuMeter:
    """CPU seconds (this process and reaped children) and wall seconds over the timed calls."""

    def __init__(self):
        self.cpu = 0.0
        self.wall = 0.0

    @staticmethod
    def _cpu() -> float:
        s = resource.getrusage(resource.RUSAGE_SELF)
        c = resource.getrusage(resource.RUSAGE_CHILDREN)
        return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime

    def wrap(self, fn: Callable[[], object]) -> Callable[[], object]:
        def run():
            c0, w0 = self._cpu(), time.perf_counter()
            fn()
            self.cpu += self._cpu() - c0
            self.wall += time.perf_counter() - w0

        return run

    def util(self) -> float:
        return self.cpu / self.wall / (os.cpu_count() or 1) if self.wall else 0.0


def make_epoch_fn(photos: Path, backend: str, workers: int, sizes: tuple[int, ...], batch: int,
                  cache_dir: Path) -> tuple[Callable[[], int], object]:
    """A zero-argument callable running one epoch; returns (fn, loader)."""
    from clipdistill.loaders import ImageLoader, OutputSpec

    outputs = tuple(OutputSpec(f"s{s}", s) for s in sizes)
    # On a GPU machine every backend delivers bf16 on the GPU, as training consumes it.
    on_gpu = torch.cuda.is_available()
    dtype = torch.bfloat16 if on_gpu else torch.float32
    loader = ImageLoader(photos, global_batch_size=batch, outputs=outputs, backend=backend, workers=workers,
                         dtype=dtype, device="cuda" if on_gpu else "cpu", cache_dir=cache_dir, prefetch=2)

    def epoch() -> int:
        seen = 0
        for b in loader:
            seen += int(b.mask.sum())
        if on_gpu:
            torch.cuda.synchronize()
        return seen

    return epoch, loader


def available_backends() -> list[str]:
    from clipdistill.loaders.loader import dali_available

    out = ["torch"]
    if dali_available():
        out.append("dali-cpu")
        if torch.cuda.is_available():
            out.append("dali-gpu")
    return out


def loader_rows(photos: Path, n_images: int, backends, workers_list, batch: int, repeats: int,
                cache_dir: Path, outputs=((224,), (224, 336)), *, quick: bool = False,
                deadline: float | None = None) -> list[dict]:
    """One epoch-time row per backend x workers x outputs, each recorded as soon as it is measured."""
    rows = []
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for backend in backends:
        for workers in workers_list:
            for sizes in outputs:
                if deadline is not None and time.perf_counter() > deadline:
                    print(f"# budget spent: {backend} workers={workers} {sizes} not started", flush=True)
                    return rows
                fn, loader = make_epoch_fn(photos, backend, workers, sizes, batch, cache_dir)
                meter = _CpuMeter()
                load = os.getloadavg()[0]  # the CPU machine is shared: other work shows here
                stats = measure(meter.wrap(fn), device="cpu", warmup=1, repeats=repeats)
                row = {
                    "provider": backend,
                    "shape": f"{n_images}x{PHOTO_SIZE[0]}x{PHOTO_SIZE[1]}->{'+'.join(map(str, sizes))}",
                    "dtype": str(loader.dtype).replace("torch.", ""),
                    "metric": "epoch_time",
                    **stats,
                    "workers": workers,
                    "batch": batch,
                    "images_per_s": round(n_images / (stats["median"] / 1e3), 1),
                    "cpu_util": round(meter.util(), 3),
                    "cores": os.cpu_count(),
                    "loadavg_1m_before": round(load, 2),
                }
                rows += record(BENCHMARK, [row], device=device, quick=quick)
                print_table(rows[-1:])
    return rows


def index_rows(corpus: Path, n_files: int, repeats: int, cache_dir: Path, *, quick: bool = False) -> list[dict]:
    """Files/s of the cheap check (1 process, all cores) and of the whole command, each recorded when measured."""
    from clipdistill.loaders.index import index_source, validate
    from clipdistill.loaders.sources import resolve_source

    samples = resolve_source(corpus, cache_dir=cache_dir, rescan=True)
    rows = []
    cores = os.cpu_count() or 1
    for workers in sorted({1, cores}):
        meter = _CpuMeter()
        stats = measure(meter.wrap(lambda: validate(samples, workers=workers)), device="cpu", warmup=1,
                        repeats=repeats)
        rows.append({"provider": "index-cheap-check", "shape": f"{n_files} files", "dtype": "-",
                     "metric": "check_time", **stats, "workers": workers,
                     "files_per_s": round(n_files / (stats["median"] / 1e3), 1),
                     "cpu_util": round(meter.util(), 3), "cores": cores})
        rows[-1:] = record(BENCHMARK, rows[-1:], device="cpu", quick=quick)
        print_table(rows[-1:])
    out = cache_dir / "bench_index.list"
    meter = _CpuMeter()
    stats = measure(meter.wrap(lambda: index_source(corpus, out, cache_dir=cache_dir, rescan=True)),
                    device="cpu", warmup=1, repeats=repeats)
    rows.append({"provider": "index-command", "shape": f"{n_files} files", "dtype": "-",
                 "metric": "scan_check_write_time", **stats, "workers": cores,
                 "files_per_s": round(n_files / (stats["median"] / 1e3), 1),
                 "cpu_util": round(meter.util(), 3), "cores": cores})
    rows[-1:] = record(BENCHMARK, rows[-1:], device="cpu", quick=quick)
    print_table(rows[-1:])
    return rows


# ---- pytest-benchmark smoke tier -------------------------------------------------------------------
_SMOKE: dict = {}


def _smoke_data() -> tuple[Path, Path]:
    if not _SMOKE:
        import tempfile

        root = Path(tempfile.mkdtemp(prefix="clipdistill_bench_loader_"))
        from clipdistill.loaders.synthetic import write_dataset

        write_dataset(root / "photos", 16, size=PHOTO_SIZE, jitter=0.15, seed=0)
        _SMOKE["photos"], _SMOKE["cache"] = root / "photos", root / "cache"
    return _SMOKE["photos"], _SMOKE["cache"]


def cpu_cases() -> list[tuple[str, Callable[[], object]]]:
    """Small CPU cases (16 photos; data made on the first call, not at collection)."""

    def case(backend: str, sizes: tuple[int, ...]):
        state: dict = {}

        def run():
            if "fn" not in state:
                photos, cache = _smoke_data()
                state["fn"], _ = make_epoch_fn(photos, backend, 2, sizes, 8, cache)
            return state["fn"]()

        return run

    def index_case():
        from clipdistill.loaders.index import validate
        from clipdistill.loaders.sources import resolve_source

        photos, cache = _smoke_data()
        return validate(resolve_source(photos, cache_dir=cache), workers=1)

    cases = [("torch-224", case("torch", (224,))), ("torch-224+336", case("torch", (224, 336)))]
    if "dali-cpu" in available_backends():
        cases += [("dali-cpu-224", case("dali-cpu", (224,))), ("dali-cpu-224+336", case("dali-cpu", (224, 336)))]
    cases.append(("index-cheap", index_case))
    return cases


def _outputs(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(v) for v in text.split("+"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"an output is sizes joined by '+', e.g. 224 or 224+336; got {text!r}")
    if not sizes or min(sizes) <= 0:
        raise argparse.ArgumentTypeError(f"output sizes must be positive, got {text!r}")
    return sizes


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a small CPU-sized run")
    parser.add_argument("--images", type=int, default=None, help="photos per epoch")
    parser.add_argument("--batch", type=int, default=None, help="global batch size (256 on the GPU target)")
    parser.add_argument("--backends", nargs="*", default=None, help="default: every available backend")
    parser.add_argument("--workers", type=int, nargs="*", default=None, help="worker/thread counts")
    parser.add_argument("--outputs", type=_outputs, nargs="*", default=None,
                        help="output resolutions per case, e.g. 224 224+336 (the default)")
    parser.add_argument("--index-files", type=int, default=None, help="files for the index benchmark (0: skip)")
    parser.add_argument("--repeats", type=int, default=None, help="timed epochs per case (after one warm-up)")
    parser.add_argument("--data", type=Path, default=None, help="folder for generated data")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="start no new case after this many seconds (rows so far are kept)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    started = time.perf_counter()
    deadline = started + args.budget_s if args.budget_s is not None else None

    cores = os.cpu_count() or 1
    quick = args.quick
    on_gpu = torch.cuda.is_available() and not quick
    n_images = args.images or (64 if quick else (2048 if on_gpu else 1024))
    batch = args.batch or (16 if quick else 256)
    repeats = args.repeats or (2 if quick else (3 if on_gpu else 5))
    n_index = args.index_files if args.index_files is not None else (2000 if quick else (0 if on_gpu else 50_000))
    if args.workers:
        workers_list = args.workers
    elif quick:
        workers_list = sorted({1, cores})
    elif on_gpu:
        workers_list = [min(16, cores)]
    else:
        workers_list = sorted({1, max(1, cores // 2), cores})
    outputs = args.outputs or [(224,), (224, 336)]
    backends = args.backends or available_backends()
    data = args.data or default_data_dir()
    cache_dir = data / "cache"

    photos = ensure_photos(data, n_images)
    print(f"data: {n_images} photos at {photos} ({time.perf_counter() - started:.1f} s)", file=sys.stderr)
    rows = loader_rows(photos, n_images, backends, workers_list, batch, repeats, cache_dir, outputs,
                       quick=quick, deadline=deadline)
    if n_index and (deadline is None or time.perf_counter() < deadline):
        corpus = ensure_index_corpus(data, photos, n_index)
        rows += index_rows(corpus, n_index, repeats, cache_dir, quick=quick)

    print()
    print_table(rows)
    best = {}
    for r in rows:
        key = r["provider"]
        value = r.get("images_per_s") or r.get("files_per_s")
        best[key] = max(best.get(key, 0.0), value)
    summary_line(BENCHMARK, rows, best_per_s=best, images=n_images, batch=batch, index_files=n_index)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
