"""pytest-benchmark runs every registered benchmark's CPU-sized cases.

No timing assertions: speed targets live in the benchmarks and their results
files, never in tests. This tier proves the cases run and gives a rough CPU
number in the pytest-benchmark table.
"""
from __future__ import annotations

import pytest

from benchmarks import REGISTERED, load


def _cases():
    for name in REGISTERED:
        # A registered benchmark that fails to import is a collection error: red, never skipped.
        for case_name, fn in load(name).cpu_cases():
            yield pytest.param(name, fn, id=f"{name}-{case_name}")


@pytest.mark.parametrize("benchmark_name, case", list(_cases()))
def test_cpu_case(benchmark, benchmark_name, case):
    benchmark.pedantic(case, rounds=3, iterations=1, warmup_rounds=1)
