"""Epoch time with the teacher cache versus the live teacher (issue 10's measurement).

    python -m benchmarks.bench_teacher_cache [--quick] [--images N] [--batch B] [--views K]
                                             [--teacher NAME] [--student NAME] [--learner vpt|coop]

One run config, two ways of getting the teacher's features:

- ``online``: every step decodes the view at the teacher's and the student's
  resolution and runs the teacher's image tower (the usual loop);
- ``cached``: ``cache-teacher`` ran once beforehand (its time is reported as
  ``cache_build``); every step decodes only the student's resolution and looks
  the teacher's features up.

Each timed repeat is one epoch of ``Trainer.fit`` (optimizer steps included).
Default (a GPU): random-init ViT-L-14 teacher and ViT-B-16 student with VPT
prompts, 224 px, bf16 autocast, batch 256 (issue 10's target: the cached epoch
at least 2.5x faster; the FLOP bound is about 3.3x). ``--quick``: the tiny
shipped configs on the CPU, 64 generated images, batch 16.
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

from benchmarks.harness import measure, print_table, record, summary_line

BENCHMARK = "bench_teacher_cache"


def _config(work: Path, images: Path, args) -> dict:
    names = work / "classes.txt"
    names.write_text("\n".join(f"class {i}" for i in range(args.classes)) + "\n")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    learner = {"vpt": {"n_tokens": 8, "depth": 2 if args.quick else 12},
               "coop": {"n_ctx": 4, "init_words": None}}[args.learner]
    return {
        "recipe": "kdpl",
        "teacher": {"name": args.teacher, "weights": None},
        "student": {"name": args.student, "weights": None},
        "learner": {"kind": args.learner, "options": learner},
        "data": {"train": str(images), "class_names": str(names), "templates": "generic",
                 "batch_size": args.batch, "backend": "auto", "workers": None},
        "train": {"epochs": 1, "device": device, "out_dir": str(work / "run"), "progress": False,
                  "log_every": 10_000, "checkpoint_every": 10_000_000, "keep_last": 1},
    }


def make_epoch_fns(args, work: Path) -> tuple[dict[str, Callable[[], object]], float, dict]:
    """{"online": fn, "cached": fn} each running one epoch; the cache's build time; facts."""
    from benchmarks.bench_e2e import make_images
    from clipdistill.engine.config.run import load_run_config
    from clipdistill.engine.training.teacher_cache import build_teacher_cache
    from clipdistill.engine.training.builder import build_run
    from clipdistill.engine.training.run_dir import RUN_ENTRIES
    from clipdistill.engine.training.trainer import Trainer

    images = make_images(work / "images", args.images, 64 if args.quick else 500)
    base = _config(work, images, args)
    cfg = load_run_config(base)
    started = time.perf_counter()
    build_teacher_cache(cfg, views=args.views, out=work / "cache", shard_size=1024, batch_size=args.batch,
                        progress=False, log=lambda m: None)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    cache_seconds = time.perf_counter() - started
    fns = {}
    for provider, overrides in (("online", []), ("cached", [f"teacher.cache={work / 'cache'}"])):
        run = build_run(load_run_config(base, [*overrides, f"train.out_dir={work / provider}"]),
                        log=lambda m: None)

        def epoch(run=run, provider=provider):
            # A fresh trainer per epoch (one epoch of optimizer steps), a new run in an emptied folder
            # (out_dir holds one run); the loader moves on.
            for path in (work / provider / name for name in RUN_ENTRIES):
                shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
            Trainer(run, log=lambda m: None).fit()

        fns[provider] = epoch
    facts = {"steps_per_epoch": len(run.loader), "device": str(run.device)}
    return fns, cache_seconds, facts


def cpu_cases() -> list[tuple[str, Callable[[], object]]]:
    """One tiny epoch each way (models and cache made on the first call, not at collection)."""
    state: dict = {}

    def case(provider: str):
        def run():
            if "fns" not in state:
                args = _parse(["--quick", "--images", "16", "--batch", "8", "--views", "2"])
                state["dir"] = tempfile.mkdtemp(prefix="bench_teacher_cache_")
                state["fns"], _, _ = make_epoch_fns(args, Path(state["dir"]))
            return state["fns"][provider]()

        return run

    return [("online-tiny", case("online")), ("cached-tiny", case("cached"))]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny models on the CPU")
    parser.add_argument("--images", type=int, default=None)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--views", type=int, default=4)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--teacher", default=None)
    parser.add_argument("--student", default=None)
    parser.add_argument("--learner", default="vpt", choices=["vpt", "coop"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work", type=Path, default=None, help="folder for images, cache and runs (default: tmp)")
    return parser


def _parse(argv: list[str] | None) -> argparse.Namespace:
    """Arguments with the defaults of the machine: the issue's GPU setting, or the tiny CPU one."""
    args = _parser().parse_args(argv)
    args.quick = quick = args.quick or not torch.cuda.is_available()
    args.images = args.images or (64 if quick else 2048)
    args.batch = args.batch or (16 if quick else 256)
    args.teacher = args.teacher or ("clipdistill-tiny-teacher" if quick else "ViT-L-14")
    args.student = args.student or ("clipdistill-tiny-student" if quick else "ViT-B-16")
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    quick = args.quick
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_teacher_cache_"))
    fns, cache_seconds, facts = make_epoch_fns(args, work)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    shape = f"{args.teacher}->{args.student},{args.learner},N={args.images},B={args.batch},K={args.views}"
    dtype = "bf16-autocast" if device == "cuda" else "fp32"
    rows = []
    loadavg = round(os.getloadavg()[0], 2)  # other work on a shared machine skews wall-clock epochs
    for provider, fn in fns.items():
        stats = measure(fn, device="cpu", warmup=1, repeats=args.repeats)  # wall clock: an epoch crosses the host
        rows.append({"provider": provider, "shape": shape, "dtype": dtype, "metric": "epoch_ms", **stats,
                     "images_per_s": args.images / (stats["median"] / 1e3), "loadavg_1m_before": loadavg,
                     **facts})
    rows.append({"provider": "cache_build", "shape": shape, "dtype": dtype, "metric": "build_ms",
                 "median": cache_seconds * 1e3, "p20": cache_seconds * 1e3, "p80": cache_seconds * 1e3,
                 "unit": "ms", "repeats": 1, "peak_mem_bytes": None})
    written = record(BENCHMARK, rows, device=device, quick=quick)
    print_table(written)
    online_ms, cached_ms = rows[0]["median"], rows[1]["median"]
    saved_ms = online_ms - cached_ms
    summary_line(BENCHMARK, written, cached_speedup=round(online_ms / cached_ms, 3),
                 epochs_to_amortize_build=round(cache_seconds * 1e3 / saved_ms, 2) if saved_ms > 0 else None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
