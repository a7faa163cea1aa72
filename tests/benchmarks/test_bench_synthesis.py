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
