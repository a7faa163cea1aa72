"""bench_loader records each row as it is measured, honours its budget, and parses its outputs."""
from __future__ import annotations

import argparse
import json

import pytest
import torch

from benchmarks import bench_loader


class _Loader:
    dtype = torch.float32


def test_rows_are_on_disk_before_a_later_case_fails(tmp_path, monkeypatch):
    calls = []

    def fake_epoch_fn(photos, backend, workers, sizes, batch, cache_dir):
        calls.append(sizes)
        if len(calls) == 2:
            raise RuntimeError("the second case breaks (a timeout would kill it here)")
        return (lambda: 8), _Loader()

    monkeypatch.setattr(bench_loader, "make_epoch_fn", fake_epoch_fn)
    monkeypatch.setattr("benchmarks.harness.RESULTS_DIR", tmp_path)
    with pytest.raises(RuntimeError, match="second case"):
        bench_loader.loader_rows(tmp_path, 8, ["torch"], [1], 4, 1, tmp_path, [(224,), (224, 336)], quick=True)
    (line,) = (tmp_path / "bench_loader.jsonl").read_text().splitlines()
    row = json.loads(line)
    assert row["provider"] == "torch" and row["shape"].endswith("->224") and row["quick"] is True


def test_budget_stops_starting_cases(tmp_path, monkeypatch):
    monkeypatch.setattr(bench_loader, "make_epoch_fn", lambda *a: ((lambda: 8), _Loader()))
    monkeypatch.setattr("benchmarks.harness.RESULTS_DIR", tmp_path)
    rows = bench_loader.loader_rows(tmp_path, 8, ["torch"], [1, 2], 4, 1, tmp_path, [(224,)], quick=True,
                                    deadline=0.0)
    assert rows == [] and not (tmp_path / "bench_loader.jsonl").exists()


def test_outputs_argument():
    args = bench_loader.build_parser().parse_args(["--outputs", "224", "224+336", "--budget-s", "60"])
    assert args.outputs == [(224,), (224, 336)] and args.budget_s == 60
    with pytest.raises(argparse.ArgumentTypeError):
        bench_loader._outputs("224+x")
