"""End-to-end distillation throughput (issue 12): the engine against the published practice and the limit.

    python -m benchmarks.bench_e2e [--quick] [--pairs T:S ...] [--learners vpt coop] [--batches B ...]
                                   [--modes live cached reference] [--steps N]

The measuring code lives in the package (:mod:`clipdistill.engine.bench_e2e`, also
``clipdistill bench e2e``); this module registers it with the other benchmarks and writes its
rows through this folder's harness. See that module's docstring for the providers (ours-live,
ours-cached, reference), the instrumented breakdown and the hardware limit.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Callable

from benchmarks import harness

BENCHMARK = "bench_e2e"


def _parser() -> argparse.ArgumentParser:
    from clipdistill.engine.bench_e2e import add_arguments

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    return add_arguments(parser)


def cpu_cases() -> list[tuple[str, Callable[[], object]]]:
    """One tiny step of each provider (runs and models built on the first call, not at collection)."""
    state: dict = {}

    def build():
        from clipdistill.engine.bench_e2e import EnginePipeline, ReferencePipeline, make_images, run_config
        from clipdistill.engine.recipes import load_run_config
        from clipdistill.engine.teacher_cache import build_teacher_cache
        from clipdistill.engine.train import build_run

        work = Path(tempfile.mkdtemp(prefix="bench_e2e_"))
        images = make_images(work / "images", 16, 64)
        base = run_config(work, images, teacher="clipdistill-tiny-teacher", student="clipdistill-tiny-student",
                          learner="vpt", batch=8, quick=True, classes=10, device="cpu", workers=None)
        live = build_run(load_run_config(base, [f"train.out_dir={work / 'live'}"]), log=lambda m: None)
        build_teacher_cache(load_run_config(base, [f"train.out_dir={work / 'build'}"]), views=1,
                            out=work / "cache", batch_size=8, progress=False, log=lambda m: None)
        cached = build_run(load_run_config(base, [f"teacher.cache={work / 'cache'}",
                                                  f"train.out_dir={work / 'cached'}"]), log=lambda m: None)
        state["live"] = EnginePipeline(live).step
        state["cached"] = EnginePipeline(cached).step
        state["reference"] = ReferencePipeline(live, sorted(str(p) for p in images.glob("*.jpg")),
                                               batch_size=8, workers=0).step

    def case(provider: str):
        def run():
            if not state:
                build()
            return state[provider]()

        return run

    return [(f"{p}-tiny", case(p)) for p in ("live", "cached", "reference")]


def main(argv: list[str] | None = None) -> int:
    from clipdistill.engine import bench_e2e

    args = _parser().parse_args(argv)
    return bench_e2e.main(args, harness)


if __name__ == "__main__":
    raise SystemExit(main())
