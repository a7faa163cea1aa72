"""bench_zero_teacher's largest-teacher ladder and step-overhead modes (benchmarks/bench_zero_teacher.py).

The climb's logic, the ladder's sizes and the host-memory refusal run in the default tier (no
process is started); the quick modes, which start torchrun jobs with DeepSpeed on the CPU, are in
the distributed tier. No timing assertions: the rows must be complete and sane.
"""
from __future__ import annotations

import json

import pytest
import torch

from benchmarks import REGISTERED
from benchmarks import bench_zero_teacher as bench
from benchmarks.harness import SCHEMA_FIELDS, load_results


def test_climb_stops_each_series_at_its_first_failure():
    outcomes = {("b", "none", "fp32"): "oom", ("c", "cpu", "fp32"): "killed"}
    ran, written = [], []

    def run(rung, offload, dtype):
        ran.append((rung, offload))
        return {"status": outcomes.get((rung, offload, dtype), "ok")}

    largest = bench.climb(["a", "b", "c", "d"], [("none", "fp32"), ("cpu", "fp32")], run, written.append)
    assert ran == [("a", "none"), ("a", "cpu"), ("b", "none"), ("b", "cpu"), ("c", "cpu")]
    assert largest == {("none", "fp32"): "a", ("cpu", "fp32"): "b"}
    assert [r["status"] for r in written] == ["ok", "ok", "oom", "ok", "killed"]


def test_climb_ends_when_no_time_is_left():
    calls = []

    def run(rung, offload, dtype):
        calls.append(rung)
        return {"status": "ok"} if rung == "a" else None

    assert bench.climb(["a", "b", "c"], [("none", "fp32")], run, lambda row: None) == {("none", "fp32"): "a"}
    assert calls == ["a", "b"]


@pytest.mark.parametrize("text, status", [
    ("OutOfMemoryError: CUDA out of memory. Tried to allocate 1.17 GiB", "oom"),
    ("RuntimeError: CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate", "oom"),
    ("ValidationError: offload_param.device", "error"),
])
def test_failures_are_told_apart(text, status):
    assert bench.classify_failure(text) == status


def test_the_ladder_grows_and_ends_beyond_one_80_gb_device(tmp_path):
    names = bench.ladder(quick=False)
    assert names[:5] == list(bench.NAMED_RUNGS) and len(set(names)) == len(names)
    bench.register_rungs(names, tmp_path)
    params = [bench.parameter_counts(name)["params"] for name in names]
    assert params == sorted(params) and params[0] > 300e6
    assert 2 * params[-1] > 80 * 2**30  # its bf16 weights alone exceed an 80 GB device
    assert all(n not in REGISTERED for n in ("bench_zero_teacher", "zero_teacher"))  # never in the CPU tier


def test_a_rung_rank_0_cannot_hold_is_refused_without_a_job():
    facts = {"params": 10**13, "clip_params": 10**13, "config": {}}
    row = bench._run_rung("synthetic-ViT-w192-L4-p8", "cpu", "fp32", batch=4, repeats=1, device="cpu", facts=facts,
                          timeout=1.0)
    assert row["status"] == "host-ram" and "not started" in row["error"] and row["median"] is None
    assert row["params"] == 10**13 and row["wall_s"] == 0.0


def _rows(folder) -> list[dict]:
    rows = load_results("bench_zero_teacher", folder)
    assert rows and all(k in row for row in rows for k in SCHEMA_FIELDS)
    assert all(row["quick"] and row["device_kind"] == "cpu" for row in rows)
    return rows


@pytest.mark.distributed
# About 95 s on 2 cores: slow tier; test_quick_largest_with_bf16_partitions runs the path by default.
@pytest.mark.slow
def test_quick_largest_runs_every_rung_with_and_without_offload(tmp_path, capsys):
    pytest.importorskip("deepspeed", reason="the distributed tier needs DeepSpeed: pip install -e '.[deepspeed]'")
    from clipdistill.engine.parallel.zero import build_vision_tower

    assert bench.main(["--mode", "largest", "--quick", "--results-dir", str(tmp_path)]) == 0
    rows = _rows(tmp_path)
    names = bench.ladder(quick=True)
    assert [(r["rung"], r["offload"]) for r in rows] == [(n, o) for n in names for o in ("none", "cpu")]
    bench.register_rungs(names, tmp_path / "configs")
    for row in rows:
        assert row["status"] == "ok" and row["error"] is None, row
        assert row["params"] == sum(p.numel() for p in build_vision_tower(row["rung"]).parameters())
        assert row["offload_device"] == row["offload"] and row["tower_dtype"] == "float32"
        assert row["finite"] is True and row["median"] > 0 and row["images_per_s"] > 0 and row["repeats"] >= 1
        assert row["host_peak_rss_bytes"] > 0 and row["build_s"] > 0 and row["peak_device_forward_bytes"] is None
        assert row["metric"] == "teacher_forward_ms" and row["batch"] == 4
    assert [r["synthetic"] for r in rows] == [False, False, True, True]
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["largest"] == {s: {"rung": names[-1], "params": rows[-1]["params"]} for s in ("none/fp32", "cpu/fp32")}


@pytest.mark.distributed
def test_quick_largest_with_bf16_partitions(tmp_path):
    pytest.importorskip("deepspeed", reason="the distributed tier needs DeepSpeed: pip install -e '.[deepspeed]'")
    argv = ["--mode", "largest", "--quick", "--dtype", "bf16", "--offload", "none", "--rungs",
            "clipdistill-tiny-teacher", "--results-dir", str(tmp_path)]
    assert bench.main(argv) == 0
    (row,) = _rows(tmp_path)
    assert row["status"] == "ok" and row["tower_dtype"] == "bfloat16" and row["ds_config"]["bf16"] == {"enabled": True}
    assert row["finite"] is True and row["median"] > 0


@pytest.mark.distributed
def test_quick_throughput_steps_the_plain_and_the_sharded_teacher(tmp_path):
    pytest.importorskip("deepspeed", reason="the distributed tier needs DeepSpeed: pip install -e '.[deepspeed]'")
    assert bench.main(["--mode", "throughput", "--quick", "--results-dir", str(tmp_path)]) == 0
    plain, zero3 = _rows(tmp_path)
    assert (plain["provider"], zero3["provider"]) == ("plain", "zero3")
    assert (plain["teacher_type"], zero3["teacher_type"]) == ("Teacher", "ShardedTeacher")
    assert plain["ds_config"] is None and zero3["ds_config"]["zero_optimization"] == {"stage": 3}
    for row in (plain, zero3):
        assert row["status"] == "ok" and row["metric"] == "images_per_s" and row["unit"] == "images/s"
        assert row["median"] > 0 and row["p20"] <= row["median"] <= row["p80"] and row["repeats"] >= 1
        assert row["batch"] == 8 and row["learner"] == "coop" and row["autocast"] == "off"
        assert row["teacher_param_dtype"] == "float32" and row["offload"] == "none"
    assert plain["ratio_to_plain"] == 1.0
    assert zero3["ratio_to_plain"] == pytest.approx(zero3["median"] / plain["median"])
    assert torch.isfinite(torch.tensor([plain["step_ms"], zero3["step_ms"]])).all()
