"""clipdistill's benchmarks (run from the repository root: ``python -m benchmarks.<name>``).

Every benchmark module is listed in :data:`REGISTERED`; each exposes
``main(argv=None) -> int`` (``--quick`` for a CPU-sized run) and
``cpu_cases() -> list[tuple[str, Callable[[], object]]]`` for the pytest-benchmark
smoke tier. ``benchmarks/gpu_suite.py`` runs them on the GPU machine in time-boxed phases.
"""
from __future__ import annotations

import importlib
import os
from types import ModuleType

import torch

# Without a GPU, Triton kernels can only run under the interpreter, and
# TRITON_INTERPRET must be set before any @triton.jit module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REGISTERED: tuple[str, ...] = ("bench_kd_loss", "bench_loader", "bench_teacher_cache", "bench_e2e", "bench_synthesis")


def load(name: str) -> ModuleType:
    """Import a registered benchmark module by name (e.g. ``"bench_kd_loss"``)."""
    if name not in REGISTERED:
        raise ValueError(f"unknown benchmark {name!r}; registered: {', '.join(REGISTERED)}")
    return importlib.import_module(f"{__name__}.{name}")
