"""Test tiers and the CPU environment.

- Without a CUDA device, Triton kernels run under the interpreter: TRITON_INTERPRET
  must be set before any module defining an ``@triton.jit`` kernel is imported,
  so it is set here, at collection start.
- ``gpu`` tests skip without CUDA; ``slow`` and ``distributed`` tests skip unless
  asked for (flag or environment variable), each with a reason.
- ``benchmarks/`` is not an installed package; it is loaded from its path under
  the name ``benchmarks`` so that tests can run the CPU-sized benchmark cases
  without putting the repository root on sys.path.
"""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("DS_ACCELERATOR", "cuda" if HAS_CUDA else "cpu")

REPO_ROOT = Path(__file__).resolve().parents[1]


def _load_benchmarks_package() -> None:
    if "benchmarks" in sys.modules:
        return
    spec = importlib.util.spec_from_file_location(
        "benchmarks",
        REPO_ROOT / "benchmarks" / "__init__.py",
        submodule_search_locations=[str(REPO_ROOT / "benchmarks")],
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["benchmarks"] = module
    spec.loader.exec_module(module)


_load_benchmarks_package()


def _flag(config: pytest.Config, option: str, env: str) -> bool:
    return bool(config.getoption(option)) or os.environ.get(env, "") not in ("", "0")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-slow", action="store_true", help="run tests marked slow")
    parser.addoption("--run-distributed", action="store_true", help="run tests marked distributed")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    run_slow = _flag(config, "--run-slow", "CLIPDISTILL_RUN_SLOW")
    run_distributed = _flag(config, "--run-distributed", "CLIPDISTILL_RUN_DISTRIBUTED")
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU; none is visible to torch")
    skip_slow = pytest.mark.skip(reason="slow tier: pass --run-slow or set CLIPDISTILL_RUN_SLOW=1")
    skip_dist = pytest.mark.skip(
        reason="distributed tier: pass --run-distributed or set CLIPDISTILL_RUN_DISTRIBUTED=1"
    )
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)
        if "slow" in item.keywords and not run_slow:
            item.add_marker(skip_slow)
        if "distributed" in item.keywords and not run_distributed:
            item.add_marker(skip_dist)


@pytest.fixture
def cuda_device() -> torch.device:
    if not HAS_CUDA:
        pytest.skip("needs a CUDA GPU; none is visible to torch")
    return torch.device("cuda")
