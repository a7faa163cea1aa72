"""The shared benchmark harness, the results format, plots and the GPU suite's helpers."""
from __future__ import annotations

import json

import pytest
import torch

from benchmarks import REGISTERED, harness, load, plot


def test_percentile_matches_numpy():
    import numpy as np

    values = torch.rand(37).tolist()
    for q in (0, 20, 50, 80, 100):
        assert harness.percentile(values, q) == pytest.approx(float(np.percentile(values, q)))
    with pytest.raises(ValueError, match="empty"):
        harness.percentile([], 50)


def test_measure_cpu_reports_spread_and_repeats():
    calls = []
    stats = harness.measure(lambda: calls.append(torch.randn(64, 64) @ torch.randn(64, 64)), device="cpu",
                            warmup=2, repeats=7)
    assert len(calls) == 9 and stats["repeats"] == 7 and stats["unit"] == "ms"
    assert 0 < stats["p20"] <= stats["median"] <= stats["p80"]
    with pytest.raises(ValueError, match="repeats"):
        harness.measure(lambda: None, device="cpu", repeats=0)


def test_record_appends_rows_with_provenance(tmp_path):
    row = {"provider": "ours", "shape": "B=2,C=3", "dtype": "float32", "metric": "fwd_ms",
           "median": 1.0, "p20": 0.9, "p80": 1.2, "unit": "ms", "images_per_s": 5.0}
    harness.record("unit_test", [row], device="cpu", quick=True, results_dir=tmp_path)
    harness.record("unit_test", [dict(row, provider="eager")], device="cpu", results_dir=tmp_path)
    lines = (tmp_path / "unit_test.jsonl").read_text().splitlines()
    assert len(lines) == 2
    first = json.loads(lines[0])
    for field in harness.SCHEMA_FIELDS:
        assert field in first, field
    assert first["images_per_s"] == 5.0 and first["quick"] is True and first["torch"] == torch.__version__
    assert [r["provider"] for r in harness.load_results("unit_test", tmp_path)] == ["ours", "eager"]
    with pytest.raises(ValueError, match="lacks"):
        harness.record("unit_test", [{"provider": "x"}], device="cpu", results_dir=tmp_path)


def test_load_results_names_the_bad_line(tmp_path):
    (tmp_path / "broken.jsonl").write_text('{"a": 1}\nnot json\n')
    with pytest.raises(ValueError, match=r"broken.jsonl:2"):
        harness.load_results("broken", tmp_path)


def test_plot_regenerates_pngs(tmp_path):
    rows = [{"provider": p, "shape": s, "dtype": "bfloat16", "metric": "fwd_ms", "median": m, "p20": m * 0.9,
             "p80": m * 1.1, "unit": "ms"} for p, m in (("ours", 1.0), ("eager", 3.0)) for s in ("a", "b")]
    harness.record("plot_test", rows, device="cpu", results_dir=tmp_path)
    assert plot.main(["--results", str(tmp_path), "--out", str(tmp_path / "png")]) == 0
    pngs = list((tmp_path / "png").glob("*.png"))
    assert len(pngs) == 1 and pngs[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_latest_rows_keeps_newest_and_drops_quick():
    base = {"benchmark": "b", "provider": "ours", "shape": "s", "dtype": "d", "metric": "m", "device": "x"}
    rows = [dict(base, median=1.0), dict(base, median=2.0), dict(base, median=9.0, quick=True)]
    assert [r["median"] for r in plot.latest_rows(rows)] == [2.0]


@pytest.mark.parametrize("name", REGISTERED)
def test_registered_benchmarks_expose_the_protocol(name):
    module = load(name)
    assert callable(module.main)
    cases = module.cpu_cases()
    assert cases and all(isinstance(n, str) and callable(fn) for n, fn in cases)
