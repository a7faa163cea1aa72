"""bench_synthesis: the quick run's rows and JSON line; the GPU defaults are the command's."""
from __future__ import annotations

import json

import pytest
import torch

from benchmarks import bench_synthesis, harness
from clipdistill.engine.datafree import generators
from clipdistill.engine.datafree.synthesize import SynthesisPlan


def test_quick_run_records_a_rate_per_generator(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(harness, "RESULTS_DIR", tmp_path)
    assert bench_synthesis.main(["--quick", "--generators", "fourier", "pixel", "--steps-timed", "1",
                                 "--repeats", "1"]) == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["benchmark"] == "bench_synthesis" and set(last["images_per_s"]) == {"fourier", "pixel"}
    rows = harness.load_results("bench_synthesis", tmp_path)
    for row in rows:
        assert row["quick"] and row["steps_timed"] == 1 and row["repeats"] == 1
        # batch images per (median per timed step x the command's 100 steps)
        assert row["images_per_s"] == pytest.approx(2 / (row["median"] / 1e3 * 100))


def test_gpu_defaults_are_the_commands_and_the_vqgan_is_taming_sized(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    args = bench_synthesis._parse([])
    assert (args.quick, args.teacher, args.batch, args.cutouts, args.steps) == (
        False, "ViT-B-32", 8, SynthesisPlan.n_cutouts, SynthesisPlan.steps)
    assert args.augment == SynthesisPlan.augment and args.image_size is None
    if not generators.diffusers_available():
        pytest.skip("diffusers is not installed")
    with torch.device("meta"):
        model = generators.random_vqgan(bench_synthesis.VQGAN_F16_1024_CONFIG)
    vq = generators.VQGANGenerator(model, 224)
    assert (vq.factor, vq.latent_side) == (16, 14)
    assert tuple(model.quantize.embedding.weight.shape) == (1024, 256)


def test_the_gpu_suite_runs_it_in_a_phase_with_diffusers_carried(tmp_path):
    from benchmarks import gpu_suite
    from benchmarks.gpu_wheels import verify_wheels

    steps = gpu_suite.PHASES["synthesis"]({"data_dir": str(tmp_path)})
    bench = next(s for s in steps if s.name == "bench-synthesis")
    assert bench.gpu_args == ["-m", "benchmarks.bench_synthesis"] and "--quick" in bench.cpu_args
    assert [c["check"] for c in gpu_suite.carry_checks("synthesis")][1] == "carry .whl+.whl-syn"
    # The pinned set names diffusers; a wheel that is not in it is reported.
    (tmp_path / "diffusers-0.0.1-py3-none-any.whl").write_bytes(b"not the pinned file")
    problems = verify_wheels(tmp_path, gpu_suite.WHEELSETS / "synthesis.txt")
    assert any("diffusers" in p for p in problems)
