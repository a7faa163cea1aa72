"""examples/: the Lightning module and the Hugging Face Trainer run a few steps on the tiny models.

Lightning and transformers come with the ``test`` extra (CI installs it); each test skips, with
the reason, only where its package is not installed.
"""
from __future__ import annotations

import argparse
import importlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

# importing clipdistill.engine applies its torchvision measure: lightning and transformers import torchvision
from clipdistill.engine.models import TINY_STUDENT, TINY_TEACHER

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.fixture
def example(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    return lambda name: importlib.import_module(name)


@pytest.fixture
def tiny_args(tmp_path) -> list[str]:
    rng = np.random.default_rng(0)
    (tmp_path / "images").mkdir()
    for i in range(8):  # odd sizes: the views crop and resize to 32 px
        pixels = rng.integers(0, 256, size=(36 + i, 44, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / "images" / f"{i}.jpg")
    (tmp_path / "classes.txt").write_text("circle\nsquare\ntriangle\n")
    return ["--images", str(tmp_path / "images"), "--class-names", str(tmp_path / "classes.txt"),
            "--teacher", TINY_TEACHER, "--student", TINY_STUDENT, "--batch-size", "4", "--device", "cpu"]


def _learner_keys(step) -> set[str]:
    return {f"student.{key}" for key in step.state_to_save()}


def test_lightning_module_trains_checkpoints_prompts_only_and_resumes(example, tiny_args, tmp_path):
    pytest.importorskip("lightning", reason="the lightning example needs lightning (pip install clipdistill[test])")
    lightning_distill = example("lightning_distill")
    torch.manual_seed(0)
    trainer = lightning_distill.main(tiny_args + ["--max-steps", "2", "--out", str(tmp_path / "run")])
    assert trainer.global_step == 2
    step = trainer.lightning_module.step
    (path,) = (tmp_path / "run" / "checkpoints").glob("*.ckpt")
    saved = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    assert set(saved) == {f"step.{key}" for key in _learner_keys(step)}  # no teacher, no backbone
    for key, value in step.state_to_save().items():
        assert torch.equal(saved[f"step.student.{key}"], value), key

    args = lightning_distill.add_arguments(argparse.ArgumentParser()).parse_args(tiny_args)
    fresh = lightning_distill.DistillModule(lightning_distill.build_step(args))
    trained = step.state_to_save()
    assert any(not torch.equal(value, trained[key]) for key, value in fresh.step.state_to_save().items())
    fresh.load_state_dict(saved)  # strict: the frozen parts are not missing
    for key, value in fresh.step.state_to_save().items():
        assert torch.equal(value, trained[key]), key

    resumed = lightning_distill.main(tiny_args + ["--max-steps", "3", "--out", str(tmp_path / "run2"),
                                                  "--resume", str(path)])
    assert resumed.global_step == 3


def test_hf_trainer_trains_checkpoints_prompts_only_and_resumes(example, tiny_args, tmp_path):
    pytest.importorskip("transformers", reason="the HF example needs transformers (pip install clipdistill[test])")
    pytest.importorskip("accelerate", reason="transformers' Trainer needs accelerate (pip install clipdistill[test])")
    hf_trainer_distill = example("hf_trainer_distill")
    torch.manual_seed(0)
    out = tmp_path / "run"
    trainer = hf_trainer_distill.main(tiny_args + ["--max-steps", "2", "--out", str(out)])
    assert trainer.state.global_step == 2
    assert all(np.isfinite(entry["loss"]) for entry in trainer.state.log_history if "loss" in entry)
    step = trainer.model
    with safe_open(str(out / "checkpoint-2" / "model.safetensors"), framework="pt") as f:
        saved = {key: f.get_tensor(key) for key in f.keys()}
    assert set(saved) == _learner_keys(step)  # no teacher, no backbone
    for key, value in step.state_to_save().items():
        assert torch.equal(saved[f"student.{key}"], value.cpu()), key

    resumed = hf_trainer_distill.main(tiny_args + ["--max-steps", "3", "--out", str(out),
                                                   "--resume", str(out / "checkpoint-2")])
    assert resumed.state.global_step == 3
