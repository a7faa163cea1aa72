"""Files written before engine/ was split into subpackages still load and mean the same.

tests/fixtures/legacy_eeb4a4a holds what commit eeb4a4a's code wrote with
tests/fixtures/make_legacy_artifacts.py: a KDPL (CoOp) training checkpoint and its class-vector
cache, a teacher cache, a tuned teacher, exports of a KDPL and a PromptKD student, and what that
code predicted and computed from them. The models' weights are regenerated here byte for byte
(numpy's PCG64 draws, checked against the recorded SHA-256) instead of being stored.

Each test reads one format with today's code: checkpoints (and their saved config's key layout,
which resume compares key by key), exports (predictions equal the old code's), teacher caches
(the key, transform ``repr`` and ``VIEWS_VERSION`` included), tuned teachers and class-vector
caches.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

from clipdistill.engine.commands.export import register as register_export
from clipdistill.engine.config.run import load_run_config
from clipdistill.engine.evaluation.export import read_distilled
from clipdistill.engine.io import image_spec, read_class_names, read_templates
from clipdistill.engine.models.class_vectors import ClassVectorKey, cache_path_for, load_class_vectors
from clipdistill.engine.models.tuned import load_tuned_teacher
from clipdistill.engine.training.builder import build_run
from clipdistill.engine.training.teacher_cache import TeacherCache, run_key
from clipdistill.engine.training.trainer import Trainer
from clipdistill.loaders.sources import resolve_source

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
LEGACY = FIXTURES / "legacy_eeb4a4a"


def _maker():
    spec = importlib.util.spec_from_file_location("make_legacy_artifacts", FIXTURES / "make_legacy_artifacts.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# Where make_legacy_artifacts.py ran: checkpoints, exports and caches name the weights and images there.
RECORDED_AT = Path("/tmp/legacy")


@pytest.fixture
def legacy(tmp_path, monkeypatch):
    """A copy of the legacy folder with its weights regenerated; the current directory is set to it,
    and the folder the artifacts were made in (/tmp/legacy) leads to it while the test runs (a
    link, removed after; a real folder there is used if it holds the same weights)."""
    root = tmp_path / "legacy"
    shutil.copytree(LEGACY, root)
    maker = _maker()
    maker.write_weights(maker.TEACHER, root / "teacher.safetensors", seed=1)
    maker.write_weights(maker.STUDENT, root / "student.safetensors", seed=2)
    for line in (LEGACY / "weights.sha256").read_text().splitlines():
        digest, name = line.split()
        actual = hashlib.sha256((root / name).read_bytes()).hexdigest()
        assert actual == digest, f"regenerated {name} differs from the one the artifacts were made with"
        if RECORDED_AT.exists() and not RECORDED_AT.is_symlink():
            there = RECORDED_AT / name
            assert there.is_file() and hashlib.sha256(there.read_bytes()).hexdigest() == digest, \
                f"{RECORDED_AT} exists but does not hold the artifacts' {name}: move it aside to run these tests"
    linked = False
    if RECORDED_AT.is_symlink():  # left by an interrupted run
        RECORDED_AT.unlink()
    if not RECORDED_AT.exists():
        RECORDED_AT.symlink_to(root, target_is_directory=True)
        linked = True
    monkeypatch.chdir(root)
    try:
        yield root
    finally:
        if linked and RECORDED_AT.is_symlink():
            RECORDED_AT.unlink()


def _predict(capsys, model: str, images: list[str], *extra: str) -> list[dict]:
    import argparse

    parser = argparse.ArgumentParser(prog="clipdistill")
    register_export(parser.add_subparsers())
    args = parser.parse_args(["predict", *images, "--model", model, "--top-k", "3", "--device", "cpu", *extra])
    capsys.readouterr()
    assert args.func(args) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]


@pytest.mark.parametrize("recipe", ["kdpl", "promptkd"])
def test_exports_predict_what_the_old_code_predicted(legacy, capsys, recipe):
    recorded = json.loads((legacy / "records.json").read_text())[f"predict_{recipe}"]
    images = [str(legacy / "images" / Path(r["image"]).name) for r in recorded]
    now = _predict(capsys, f"export_{recipe}.safetensors", images)
    assert [Path(r["image"]).name for r in now] == [Path(r["image"]).name for r in recorded]
    for new, old in zip(now, recorded):
        assert [t["class"] for t in new["top"]] == [t["class"] for t in old["top"]]
        assert [t["score"] for t in new["top"]] == pytest.approx([t["score"] for t in old["top"]], abs=1e-6)


def test_checkpoint_reads_and_resumes_with_the_saved_config_layout(legacy):
    checkpoint = legacy / "runs/kdpl/checkpoints/step-000000002.safetensors"
    distilled = read_distilled(checkpoint)
    assert distilled.learner_kind == "coop" and set(distilled.learner_state) == {"prompts.ctx"}
    saved = json.loads((legacy / "runs/kdpl/config.json").read_text())
    cfg = load_run_config("kdpl.yaml", ["train.max_steps=3", "train.resume=true"])
    # Resume compares the saved config with today's key by key: the saved keys' layout must not have
    # changed; keys added since read as the behaviour of the code that wrote the checkpoint.
    from clipdistill.engine.config.run import config_differences, dump_run_config, resume_config, with_absent_keys

    filled = with_absent_keys(saved)
    assert config_differences(filled, dump_run_config(cfg)) == [
        "learner.frozen_templates", "learner.gpa", "learner.prompt_placement", "optim.warmup_epochs",
        "train.max_steps", "train.resume"]
    assert (filled["learner"]["prompt_placement"], filled["optim"]["warmup_epochs"]) == ("after_ln_pre", 0)
    # Changed defaults the user did not set are taken from the checkpoint; what the user set stays.
    resumed, taken = resume_config(cfg, saved)
    assert taken == ["learner.frozen_templates", "learner.gpa", "learner.prompt_placement", "optim.warmup_epochs"]
    assert config_differences(filled, dump_run_config(resumed)) == ["train.max_steps", "train.resume"]
    logs: list[str] = []
    summary = Trainer(build_run(cfg, log=logs.append), log=logs.append).fit()
    assert any("resumed from" in m and "step 2" in m for m in logs), logs
    assert any("taken from step-000000002" in m and "optim.warmup_epochs=0" in m for m in logs), logs
    assert summary["step"] == 3 and np.isfinite(summary["loss/kd"])


def test_teacher_cache_key_and_shards_match_todays_run(legacy):
    cache = TeacherCache("teacher_cache")
    cfg = load_run_config("kdpl.yaml", [])
    samples = resolve_source(cfg.data.train, cache_dir=str(legacy / "lists"))
    key = cache.key
    now = run_key(cfg, num_views=key.num_views, teacher_dim=key.dim, samples=samples,
                  input_spec=(key.input_size, key.mean, key.std))
    old, new = asdict(key), asdict(now)
    # The weights fingerprint names a local file by path and mtime, which a copied folder cannot keep.
    old.pop("weights"), new.pop("weights")
    assert {k: (list(v) if isinstance(v, tuple) else v) for k, v in new.items()} == \
           {k: (list(v) if isinstance(v, tuple) else v) for k, v in old.items()}
    features, views, valid = cache.lookup(np.arange(8), np.zeros(8, dtype=np.int64))
    assert features.shape == (8, key.dim) and valid.all()
    norms = np.linalg.norm(features.astype(np.float32), axis=1)
    assert np.allclose(norms, 1.0, atol=2e-3)
    # The image spec today's code reads from the teacher is the one the cache recorded.
    from clipdistill.engine.models.clip import build_teacher

    size, mean, std = image_spec(build_teacher(cfg.teacher.name, cfg.teacher.weights).model)
    assert (size, list(mean), list(std)) == (key.input_size, list(key.mean), list(key.std))


def test_tuned_teacher_gives_the_old_class_vectors(legacy):
    tuned = load_tuned_teacher("tuned.safetensors")
    vectors = tuned.class_vectors(read_class_names("classes.txt"))
    expected = torch.from_numpy(np.load("tuned_class_vectors.npy"))
    torch.testing.assert_close(vectors, expected, atol=1e-6, rtol=1e-5)


def test_class_vector_cache_loads_under_todays_key(legacy):
    cfg = load_run_config("kdpl.yaml", [])
    now = ClassVectorKey.make(cfg.teacher.name, cfg.teacher.weights, read_class_names(cfg.data.class_names),
                              read_templates(cfg.data.templates))
    (stored_json,) = (legacy / "runs/kdpl/class_vectors").glob("*.json")
    stored = ClassVectorKey.from_json(json.loads(stored_json.read_text()))
    # Equal but for the weights fingerprint (a local file's path and mtime, which a copy cannot keep).
    assert stored.difference(now).startswith("weights:")
    assert ClassVectorKey(now.model, stored.weights, now.names, now.templates) == stored
    # Its file name is today's name for that key, and it loads.
    stem = cache_path_for(legacy / "runs/kdpl/class_vectors", stored)
    assert stem.with_suffix(".json").name == stored_json.name
    vectors = load_class_vectors(stem, stored)
    assert vectors.shape == (3, 48)
    torch.testing.assert_close(vectors.norm(dim=-1), torch.ones(3), atol=1e-5, rtol=0)


def test_promptkd_checkpoint_without_stored_vectors_uses_its_tuned_teacher_or_names_it(legacy, tmp_path):
    from safetensors.torch import load_file

    from clipdistill.engine.evaluation.export import ExportError, export_from_checkpoint

    checkpoint = legacy / "runs/promptkd/checkpoints/step-000000002.safetensors"
    distilled = read_distilled(checkpoint)
    assert distilled.teacher_vectors is None and distilled.teacher["prompts"] == "tuned.safetensors"
    out = export_from_checkpoint(checkpoint, tmp_path / "student.safetensors")
    # Rebuilt from its saved teacher.prompts: the tuned teacher's vectors, which the student trained against.
    expected = torch.from_numpy(np.load("tuned_class_vectors.npy"))
    torch.testing.assert_close(load_file(str(out))["class_vectors"], expected, atol=1e-6, rtol=1e-5)
    Path("tuned.safetensors").unlink()
    with pytest.raises(ExportError, match="teacher.prompts='tuned.safetensors'"):
        export_from_checkpoint(checkpoint, tmp_path / "again.safetensors")


def test_promptkd_checkpoint_resumes_with_its_old_placement_and_warm_up(legacy):
    cfg = load_run_config("promptkd.yaml", ["train.max_steps=3", "train.resume=true"])
    assert (cfg.learner.prompt_placement, cfg.optim.warmup_epochs) == ("before_ln_pre", 1)  # today's defaults
    logs: list[str] = []
    run = build_run(cfg, log=logs.append)
    # The checkpoint predates both keys: the run continues as it started (prompts after ln_pre, no warm-up epoch).
    assert (run.config.learner.prompt_placement, run.config.optim.warmup_epochs) == ("after_ln_pre", 0)
    assert run.learner.before_ln_pre is False
    summary = Trainer(run, log=logs.append).fit()
    assert any("resumed from" in m and "step 2" in m for m in logs), logs
    assert summary["step"] == 3 and np.isfinite(summary["loss/kd"])


# ------------------------------------------------------------------------------ today's main (cb0f5d1)

MAIN = FIXTURES / "main_cb0f5d1"


@pytest.fixture
def main_cb0f5d1(tmp_path, monkeypatch) -> Path:
    """tests/fixtures/main_cb0f5d1 (made by make_main_cb0f5d1.py at commit cb0f5d1), weights regenerated."""
    root = tmp_path / "main"
    shutil.copytree(MAIN, root)
    maker = _maker()
    maker.write_weights(maker.TEACHER, root / "teacher.safetensors", seed=1)
    maker.write_weights(maker.STUDENT, root / "student.safetensors", seed=2)
    for line in (LEGACY / "weights.sha256").read_text().splitlines():  # the same seeds, the same files
        digest, name = line.split()
        assert hashlib.sha256((root / name).read_bytes()).hexdigest() == digest
    monkeypatch.chdir(root)
    return root


def test_main_vpt_run_resumes_with_its_settings_and_predicts_as_it_did(main_cb0f5d1, capsys, tmp_path):
    recorded = json.loads((main_cb0f5d1 / "records.json").read_text())["predict_vpt"]
    images = [str(main_cb0f5d1 / "images" / Path(r["image"]).name) for r in recorded]
    checkpoint = main_cb0f5d1 / "runs/vpt/checkpoints/step-000000002.safetensors"
    # Its export, and today's export of its checkpoint, predict what that code predicted (prompts after ln_pre).
    from clipdistill.engine.evaluation.export import export_from_checkpoint

    export_from_checkpoint(checkpoint, tmp_path / "again.safetensors")
    for model in ("export_vpt.safetensors", str(tmp_path / "again.safetensors")):
        # the export names the weights by the absolute path they had when it was made
        now = _predict(capsys, model, images, "--student-weights", "student.safetensors")
        for new, old in zip(now, recorded, strict=True):
            assert [t["class"] for t in new["top"]] == [t["class"] for t in old["top"]]
            assert [t["score"] for t in new["top"]] == pytest.approx([t["score"] for t in old["top"]], abs=1e-6)

    # Resumed with today's recipe, whose VPT preset and warm-up differ: the run keeps the settings it began with.
    cfg = load_run_config("vpt.yaml", ["train.max_steps=3", "train.resume=true"])
    assert (cfg.data.batch_size, cfg.optim.lr, cfg.train.epochs, cfg.optim.warmup_epochs) == (4, 0.0025, 5, 1)
    logs: list[str] = []
    run = build_run(cfg, log=logs.append)
    resumed = run.config
    assert (resumed.data.batch_size, resumed.optim.lr, resumed.train.epochs, resumed.optim.warmup_epochs,
            resumed.learner.prompt_placement) == (32, 0.002, 50, 0, "after_ln_pre")
    assert resumed.learner.options == {"n_tokens": 2, "depth": 2}
    summary = Trainer(run, log=logs.append).fit()
    assert any("resumed from" in m and "step 2" in m for m in logs), logs
    assert summary["step"] == 3 and np.isfinite(summary["loss/kd"])
