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


@pytest.fixture
def legacy(tmp_path, monkeypatch) -> Path:
    """A copy of the legacy folder with its weights regenerated; the current directory is set to it."""
    root = tmp_path / "legacy"
    shutil.copytree(LEGACY, root)
    maker = _maker()
    maker.write_weights(maker.TEACHER, root / "teacher.safetensors", seed=1)
    maker.write_weights(maker.STUDENT, root / "student.safetensors", seed=2)
    for line in (LEGACY / "weights.sha256").read_text().splitlines():
        digest, name = line.split()
        actual = hashlib.sha256((root / name).read_bytes()).hexdigest()
        assert actual == digest, f"regenerated {name} differs from the one the artifacts were made with"
    monkeypatch.chdir(root)
    return root


def _predict(capsys, model: str, images: list[str]) -> list[dict]:
    import argparse

    parser = argparse.ArgumentParser(prog="clipdistill")
    register_export(parser.add_subparsers())
    args = parser.parse_args(["predict", *images, "--model", model, "--top-k", "3", "--device", "cpu"])
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
    # Resume compares the saved config with today's key by key: the layout must not have changed.
    from clipdistill.engine.config.run import config_differences, dump_run_config

    assert config_differences(saved, dump_run_config(cfg)) == ["train.max_steps", "train.overwrite", "train.resume"]
    logs: list[str] = []
    summary = Trainer(build_run(cfg, log=logs.append), log=logs.append).fit()
    assert any("resumed from" in m and "step 2" in m for m in logs), logs
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
