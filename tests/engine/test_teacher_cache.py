"""The teacher cache: build, resume, replay in training, refusals (tiny models, CPU)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from clipdistill.engine.config.run import load_run_config
from clipdistill.engine.training.teacher_cache import TeacherCache, TeacherCacheError, build_teacher_cache
from clipdistill.engine.training.builder import build_run
from clipdistill.engine.training.trainer import Trainer

CLASSES = ["circle", "square", "triangle"]


@pytest.fixture(scope="module")
def data_dir(shape_folder) -> Path:
    return shape_folder("cache_data", CLASSES, 10, 48)


@pytest.fixture(scope="module")
def run_config(tiny_run_config):
    """``run_config(data_dir, out, **train)``: conftest's tiny run with batches of 4, crops of at least 30% of
    the image, and the recipe's optimizer, epochs and checkpoint interval."""
    def config(data_dir: Path, out: Path, **train) -> dict:
        cfg = tiny_run_config(data_dir, out, data={"batch_size": 4, "min_scale": 0.3}, optim=None, train=train)
        for key in {"epochs", "checkpoint_every"} - set(train):
            del cfg["train"][key]
        return cfg

    return config


@pytest.fixture(scope="module")
def cache_dir(data_dir, tmp_path_factory, run_config) -> Path:
    out = tmp_path_factory.mktemp("cache")
    cfg = load_run_config(run_config(data_dir, out / "run"))
    torch.manual_seed(0)
    summary = build_teacher_cache(cfg, views=3, out=out / "cache", shard_size=4, batch_size=5, progress=False,
                                  log=lambda m: None)
    assert summary["complete"] and summary["shards"] == 3 and summary["images"] == 10
    return out / "cache"


def test_cache_layout_and_features_match_the_teacher(cache_dir, data_dir):
    from clipdistill.engine.models import build_teacher
    from clipdistill.loaders import ImageLoader, OutputSpec, RandomResizedCrop

    cache = TeacherCache(cache_dir)
    assert cache.num_views == 3 and cache.key.dim == 48
    index = json.loads((cache_dir / "index.json").read_text())
    assert [s["count"] for s in index["shards"]] == [4, 4, 2]
    feats = np.load(cache_dir / "shard-00001.features.npy")
    assert feats.shape == (4, 3, 48) and feats.dtype == np.float16
    # Recompute sample 5, view 2 by hand from its stored numbers.
    torch.manual_seed(0)
    teacher = build_teacher("clipdistill-tiny-teacher", None)
    f, views, valid = cache.lookup(np.array([5, -1]), np.array([2, 0]))
    assert valid.tolist() == [True, False] and not f[1].any()
    renderer = ImageLoader(str(data_dir / "images"), global_batch_size=1, outputs=[OutputSpec("t", 32)],
                           transform=RandomResizedCrop(scale=(0.3, 1.0)), backend="torch", workers=0)
    image = renderer.render([5], views[:1, :4], views[:1, 4].astype(bool))["t"]
    expected = teacher.encode_image(image)[0].numpy()
    np.testing.assert_allclose(f[0].astype(np.float32), expected, atol=2e-3)
    # The stored view is the loaders' generator's view (seed, epoch 0, sample 5, view 2).
    crops, flips = renderer.view_params(0, [5], [2])
    assert crops[0].tolist() == views[0, :4].tolist() and bool(flips[0]) == bool(views[0, 4])


def test_cached_loss_equals_online_loss_for_the_same_view(cache_dir, data_dir, tmp_path, run_config):
    torch.manual_seed(0)
    cfg = load_run_config(run_config(data_dir, tmp_path / "cached"), [f"teacher.cache={cache_dir}"])
    cached = build_run(cfg, log=lambda m: None)
    batch = next(iter(cached.loader))
    trainer = Trainer(cached, log=lambda m: None)
    features, mask = trainer._cached_features(batch)
    student_images = batch.images["student"]
    loss_cached = cached.step(None, student_images, mask.float(), teacher_features=features)["kd"]

    torch.manual_seed(0)
    online = build_run(load_run_config(run_config(data_dir, tmp_path / "online")), log=lambda m: None)
    online.step.load_saved_state(cached.step.state_to_save())
    real = batch.mask.numpy()
    images = online.loader.render(batch.sample_ids.numpy()[real], batch.crops.numpy()[real],
                                  batch.flips.numpy()[real])["student"]
    assert torch.equal(images, student_images[torch.from_numpy(real)])
    loss_online = online.step(images, images)["kd"]
    assert loss_cached.item() == pytest.approx(loss_online.item(), rel=2e-3, abs=1e-4)


def test_training_from_the_cache_never_loads_the_teacher(cache_dir, data_dir, tmp_path, forbid, run_config):
    from clipdistill.engine.models.clip import build_teacher

    forbid(build_teacher, "the teacher model was loaded")
    cfg = load_run_config(run_config(data_dir, tmp_path, max_steps=4), [f"teacher.cache={cache_dir}"])
    run = build_run(cfg, log=lambda m: None)
    summary = Trainer(run, log=lambda m: None).fit()
    assert summary["step"] == 4 and np.isfinite(summary["loss/kd"])
    # Each epoch shows every sample one stored view, chosen per (seed, epoch, sample).
    seen = {}
    for epoch in (0, 1):
        run.loader.set_epoch(epoch)
        for batch in run.loader:
            for sid, vid in zip(batch.sample_ids.tolist(), batch.view_ids.tolist()):
                if sid >= 0:
                    seen.setdefault(sid, []).append(vid)
    assert sorted(seen) == list(range(10)) and all(len(v) == 2 for v in seen.values())
    assert all(0 <= v < 3 for views in seen.values() for v in views)
    assert len({tuple(v) for v in seen.values()}) > 1


def test_interrupted_build_resumes_to_the_same_files(data_dir, cache_dir, tmp_path, run_config):
    cfg = load_run_config(run_config(data_dir, tmp_path / "run"))
    torch.manual_seed(0)
    first = build_teacher_cache(cfg, views=3, out=tmp_path / "c", shard_size=4, batch_size=5, progress=False,
                                max_shards=1, log=lambda m: None)
    assert first["shards_built"] == 1 and not first["complete"] and not (tmp_path / "c" / "index.json").exists()
    # A torn shard: its arrays written, its JSON (written last) not.
    (tmp_path / "c" / "shard-00001.features.npy").write_bytes(b"partial")
    with pytest.raises(TeacherCacheError, match="unfinished"):
        TeacherCache(tmp_path / "c")
    torch.manual_seed(0)
    second = build_teacher_cache(cfg, views=3, out=tmp_path / "c", shard_size=4, batch_size=5, progress=False,
                                 log=lambda m: None)
    assert second["shards_built"] == 2 and second["complete"]
    for path in sorted(cache_dir.glob("shard-*.npy")):
        assert (tmp_path / "c" / path.name).read_bytes() == path.read_bytes(), path.name


def test_refusals_say_what_differs(cache_dir, data_dir, tmp_path, run_config):
    def run_with(*overrides, cache=cache_dir):
        cfg = load_run_config(run_config(data_dir, tmp_path / "r"), [f"teacher.cache={cache}", *overrides])
        return build_run(cfg, log=lambda m: None)

    with pytest.raises(TeacherCacheError, match="teacher model: cache has 'clipdistill-tiny-teacher'"):
        run_with("teacher.name=clipdistill-tiny-student")
    with pytest.raises(TeacherCacheError, match="teacher weights"):
        run_with("teacher.weights=openai")
    with pytest.raises(TeacherCacheError, match="transform"):
        run_with("data.min_scale=0.5")
    more = tmp_path / "more"
    shutil.copytree(data_dir / "images", more)
    shutil.copy(more / "000.jpg", more / "zzz.jpg")
    with pytest.raises(TeacherCacheError, match="number of images|image list"):
        run_with(f"data.train={more}")
    # Another feature dimension (an index edited by hand), then a corrupted shard.
    edited = tmp_path / "edited"
    shutil.copytree(cache_dir, edited)
    index = json.loads((edited / "index.json").read_text())
    index["key"]["dim"] = 64
    (edited / "index.json").write_text(json.dumps(index))
    with pytest.raises(TeacherCacheError, match="dimension 48, index says 64"):
        TeacherCache(edited)
    corrupted = tmp_path / "corrupted"
    shutil.copytree(cache_dir, corrupted)
    data = bytearray((corrupted / "shard-00002.views.npy").read_bytes())
    data[-1] ^= 0xFF
    (corrupted / "shard-00002.views.npy").write_bytes(bytes(data))
    with pytest.raises(TeacherCacheError, match=r"shard-00002\.views\.npy: checksum mismatch"):
        run_with(cache=corrupted)
    with pytest.raises(TeacherCacheError, match="another configuration"):
        build_teacher_cache(load_run_config(run_config(data_dir, tmp_path / "r"), ["data.min_scale=0.9"]), views=3,
                            out=cache_dir, shard_size=4, progress=False, log=lambda m: None)


def test_cli_cache_teacher_prints_a_summary(data_dir, tmp_path, run_config):
    import subprocess
    import sys

    import yaml

    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(run_config(data_dir, tmp_path / "run")))
    exe = Path(sys.executable).parent / "clipdistill"
    proc = subprocess.run([str(exe), "cache-teacher", "--config", str(config), "--views", "2", "--out-dir",
                           str(tmp_path / "cache"), "--shard-size", "8", "--no-progress"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["complete"] and summary["images"] == 10 and summary["views"] == 2
    assert summary["bytes"] > 10 * 2 * 48 * 2


def _drop_last_shard(index):
    index["shards"].pop()


@pytest.mark.parametrize("edit, message", [
    # Reproduction: an edited index.json ended in IndexError (lookup) or TypeError (reading the key).
    (_drop_last_shard, r"10 images in shards of 4 need 3 shards, the index lists 2"),
    (lambda index: index.update(shard_size=2), r"need 5 shards, the index lists 3"),
    (lambda index: index.update(shard_size="4"), r"shard_size '4' is not a positive integer"),
    (lambda index: index["key"].update(mean=None), r"key field 'mean' holds None"),
    (lambda index: index["key"].pop("seed"), r"the key's fields are .* expected"),
    (lambda index: index["shards"][1].update(sha256=None), r"entry 1 of 'shards' is"),
    (lambda index: index["shards"][1].update(first=0), r"entry 1 of 'shards' is"),
    (lambda index: index.update(logit_scale="100"), r"logit_scale '100' is not a finite number"),
    (lambda index: index.update(rejects=None), r"'rejects' is not a list"),
    (lambda index: index["key"].update(num_views=5), r"arrays of shapes .* do not hold 4 images x 5 views"),
], ids=["missing-shard", "shard-size", "shard-size-text", "mean-null", "key-field", "sha-null", "first",
        "logit-scale", "rejects", "views"])
def test_an_edited_index_is_refused_in_one_line(cache_dir, tmp_path, edit, message):
    edited = tmp_path / "edited"
    shutil.copytree(cache_dir, edited)
    index = json.loads((edited / "index.json").read_text())
    edit(index)
    (edited / "index.json").write_text(json.dumps(index))
    with pytest.raises(TeacherCacheError, match=message):
        TeacherCache(edited)


def test_an_index_that_is_not_json_is_refused(cache_dir, tmp_path):
    edited = tmp_path / "edited"
    shutil.copytree(cache_dir, edited)
    (edited / "index.json").write_text('{"format": "clipdistill-teacher-cache/1", "key": ')
    with pytest.raises(TeacherCacheError, match=r"index\.json: not readable JSON"):
        TeacherCache(edited)
    (edited / "index.json").write_text("[1, 2]")
    with pytest.raises(TeacherCacheError, match=r"unknown cache format 'list'"):
        TeacherCache(edited)
