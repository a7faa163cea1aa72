"""The end-to-end benchmark (benchmarks/bench_e2e.py) on tiny models on the CPU.

What is checked: the FLOP count against a hand count, the breakdown against the instrumented
step, the rows' schema, that the reference pipeline and the instrumented split compute the
engine's loss, and the command line end to end. No speed assertions (targets live in the
benchmark's results).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import bench_e2e
from clipdistill.engine.models import TINY_STUDENT, TINY_TEACHER

REPO_ROOT = Path(__file__).resolve().parents[2]

SCHEMA = ("benchmark", "provider", "shape", "dtype", "metric", "median", "p20", "p80", "unit", "peak_mem_bytes",
          "repeats", "device", "device_kind", "torch", "triton", "clipdistill", "python", "commit", "dirty", "date",
          "quick")
CASE_FIELDS = ("images_per_s", "step_ms", "batch", "flops_per_image", "hw_limit_images_per_s", "fraction_of_limit",
               "peak_gpu_mem_bytes", "breakdown_ms", "instrumented_step_ms", "instrumented_stage_sum_ms")
TINY = ["--quick", "--pairs", f"{TINY_TEACHER}:{TINY_STUDENT}", "--classes", "7"]


def _args(tmp_path: Path, *extra: str) -> argparse.Namespace:
    parser = bench_e2e.add_arguments(argparse.ArgumentParser())
    return parser.parse_args([*TINY, "--results", str(tmp_path / "results"), "--work", str(tmp_path / "work"),
                              *extra])


@pytest.fixture(scope="module")
def quick_rows(tmp_path_factory):
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("bench_e2e")
    args = _args(tmp, "--learners", "vpt", "coop", "--batches", "8", "--steps", "3", "--warmup", "1")
    rows = bench_e2e.run_benchmark(args)
    return rows, tmp


@pytest.fixture(scope="module")
def live_run(tmp_path_factory):
    from clipdistill.engine.config.run import load_run_config
    from clipdistill.engine.training.builder import build_run

    work = tmp_path_factory.mktemp("bench_e2e_run")
    images = bench_e2e.make_images(work / "images", 16, 48)
    cfg = bench_e2e.run_config(work, images, teacher=TINY_TEACHER, student=TINY_STUDENT, learner="coop", batch=8,
                               quick=True, classes=7, device="cpu", workers=None)
    return build_run(load_run_config(cfg), log=lambda m: None), sorted(str(p) for p in images.glob("*.jpg"))


def test_flop_count_of_tiny_vit_matches_hand_count():
    from clipdistill.engine.models import load_clip

    model = load_clip(TINY_TEACHER, None).eval()
    # clipdistill-tiny-teacher: 32 px, patch 8 -> 16 patches + class token, width 96, 3 layers,
    # MLP ratio 4, output 48 taken from the class token.
    n, d, layers, out = 17, 96, 3, 48
    conv = 2 * 16 * d * (3 * 8 * 8)
    # per layer: qkv 2*n*d*3d, out-proj 2*n*d*d, MLP 2 * 2*n*d*4d, attention QK^T and AV 2 * 2*n*n*d
    per_layer = 2 * n * d * 3 * d + 2 * n * d * d + 2 * (2 * n * d * 4 * d) + 2 * (2 * n * n * d)
    hand = conv + layers * per_layer + 2 * d * out
    with torch.no_grad():
        counted = bench_e2e.count_flops(lambda: model.visual(torch.randn(1, 3, 32, 32)))
    assert counted == pytest.approx(hand, rel=0.03), (counted, hand)


def test_flops_per_image_split_into_per_image_and_per_step(live_run):
    run, _ = live_run
    small, large = (bench_e2e.flops_per_image(run, run.teacher, b) for b in (1, 64))
    assert small["teacher"] == pytest.approx(large["teacher"], rel=1e-6)  # all per-image work
    assert large["student"] < small["student"]  # CoOp's text encoder is per step, shared by the batch
    assert large["total"] > 0


def test_quick_run_writes_rows_with_every_schema_field(quick_rows):
    rows, tmp = quick_rows
    written = [json.loads(line) for line in (tmp / "results" / "bench_e2e.jsonl").read_text().splitlines()]
    assert len(written) == len(rows)
    assert {r["provider"] for r in written} >= {"torch.mm", "cache_build", "ours-live", "ours-cached", "reference"}
    for row in written:
        missing = [k for k in SCHEMA if k not in row]
        assert not missing, (row["provider"], missing)
        assert row["quick"] is True and row["device_kind"] == "cpu"
    cases = [r for r in written if r["metric"] == "images_per_s"]
    assert {r["learner"] for r in cases} == {"vpt", "coop"}
    for row in cases:
        missing = [k for k in CASE_FIELDS if k not in row and k != "images_per_s"]
        assert not missing, (row["provider"], missing)
        assert row["median"] > 0 and row["p20"] <= row["median"] <= row["p80"]
        assert 0 < row["fraction_of_limit"] and row["flops_per_image"] > 0 and row["flops_student_per_image"] > 0
        assert set(row["breakdown_ms"]) == set(bench_e2e.STAGES)
    ref = [r for r in cases if r["provider"] == "reference"]
    assert ref and all(r["breakdown_ms"]["teacher_text"] > 0 for r in ref)
    assert all(r["breakdown_ms"]["teacher_text"] == 0 for r in cases if r["provider"] != "reference")


def test_breakdown_adds_up_to_the_instrumented_step(quick_rows):
    rows, _ = quick_rows
    for row in (r for r in rows if r["metric"] == "images_per_s"):
        total, stages = row["instrumented_step_ms"], row["instrumented_stage_sum_ms"]
        # The gap is host time between stages (context managers, Python): small, never negative.
        assert stages <= total * 1.02 + 0.05, row["provider"]
        assert stages >= 0.8 * total - 1.0, (row["provider"], stages, total)
        assert sum(row["breakdown_ms"].values()) == pytest.approx(stages, rel=0.35)  # medians of parts


def test_reference_loss_is_the_engines_loss(live_run):
    from clipdistill.kernels.kd_loss import kd_loss_reference

    run, _ = live_run
    step = run.step
    gen = torch.Generator().manual_seed(3)
    c, d_t = step.teacher_class_vectors.shape
    d_s = int(step.student.clip.visual.output_dim)
    student = torch.randn(6, d_s, generator=gen, dtype=torch.float64)
    teacher = torch.randn(6, d_t, generator=gen, dtype=torch.float64)
    teacher_vectors = torch.randn(c, d_t, generator=gen, dtype=torch.float64)
    student_vectors = torch.randn(c, d_s, generator=gen, dtype=torch.float64)
    ours = bench_e2e.reference_kl_loss(student, teacher, teacher_vectors, student_vectors, 30.0)
    expected = kd_loss_reference(student, teacher, teacher_vectors, student_class_vectors=student_vectors,
                                 logit_scale=30.0, teacher_logit_scale=30.0, **step.loss_options)
    # reference_kl_loss computes in fp32 (the published practice): fp32 tolerance.
    assert torch.isfinite(ours) and ours.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-6)


def test_split_step_and_reference_compute_the_engines_step_loss(live_run):
    run, paths = live_run
    step = run.step
    gen = torch.Generator().manual_seed(4)
    images = torch.randn(5, 3, 32, 32, generator=gen)
    with torch.no_grad():
        engine = step(images, images)["loss"]
        pipeline = bench_e2e.EnginePipeline(run)
        split = pipeline.split_loss(bench_e2e.StageClock("cpu", enabled=False), images, images, None, None)
        teacher_features = step.teacher.encode_image(images)
        reference = bench_e2e.reference_kl_loss(step.student.encode_image(images), teacher_features,
                                                step.teacher_class_vectors, step.student.class_features(None),
                                                step.student_logit_scale)
    assert torch.isfinite(engine)
    assert split.item() == pytest.approx(engine.item(), rel=1e-5, abs=1e-6)
    assert reference.item() == pytest.approx(engine.item(), rel=1e-4, abs=1e-5)
    # The reference recomputes the teacher's text features each step: they are the run's class vectors.
    ref = bench_e2e.ReferencePipeline(run, paths, batch_size=8, workers=0)
    loss = ref.instrumented_step(bench_e2e.StageClock("cpu", enabled=True))
    assert torch.isfinite(loss)
    ref.close()


def test_cli_bench_e2e_quick_prints_json_last(tmp_path):
    argv = [*TINY, "--learners", "vpt", "--batches", "8", "--modes", "live", "reference",
            "--steps", "2", "--warmup", "1", "--results", str(tmp_path / "results"), "--work", str(tmp_path / "w")]
    # `python -m benchmarks.bench_e2e` from the repository root, as the README and the GPU suite run it.
    proc = subprocess.run([sys.executable, "-m", "benchmarks.bench_e2e", *argv], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=300, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = json.loads(proc.stdout.strip().splitlines()[-1])
    assert last["benchmark"] == "bench_e2e" and last["rows"] == 3
    assert "ours-live_vs_reference" in last
    assert (tmp_path / "results" / "bench_e2e.jsonl").is_file()


def test_the_product_has_no_bench_command():
    from clipdistill.engine.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "e2e", "--quick"])
