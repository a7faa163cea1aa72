"""The training loop, recipes, checkpoints, resume, the CLI and the embedding API (tiny models, CPU)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from clipdistill.engine.training import checkpoint as ckpt
from clipdistill.engine.config import ConfigError
from clipdistill.engine.config.run import load_run_config
from clipdistill.engine.training.builder import build_run
from clipdistill.engine.training.schedule import lr_at
from clipdistill.engine.training.trainer import NonFiniteLossError, Trainer, distill

CLASSES = ["circle", "square", "triangle", "cross", "ring"]


@pytest.fixture(scope="module")
def data_dir(shape_folder) -> Path:
    """20 small generated JPEGs of the demo's shapes and a class-name file."""
    return shape_folder("train_data", CLASSES, 20, 40)


def _config(data_dir: Path, out_dir: Path, **sections) -> dict:
    base = {
        "recipe": "kdpl",
        "teacher": {"name": "clipdistill-tiny-teacher", "weights": None},
        "student": {"name": "clipdistill-tiny-student", "weights": None},
        "learner": {"kind": "coop", "options": {"n_ctx": 2, "init_words": None}},
        "data": {"train": str(data_dir / "images"), "class_names": str(data_dir / "classes.txt"),
                 "templates": "generic", "batch_size": 8, "backend": "torch", "workers": 0,
                 "interpolation": "bilinear"},
        "optim": {"lr": 0.01, "warmup_steps": 1},
        "train": {"epochs": 1, "max_steps": 3, "device": "cpu", "out_dir": str(out_dir), "log_every": 1,
                  "checkpoint_every": 2, "progress": False, "seed": 0},
    }
    for key, value in sections.items():
        base[key] = {**base.get(key, {}), **value} if isinstance(value, dict) else value
    return base


LEARNER_OPTIONS = {
    "coop": {"n_ctx": 2},
    "cocoop": {"n_ctx": 2},
    "vpt": {"n_tokens": 2, "depth": 2},
    "maple": {"n_ctx": 2, "depth": 2},
    "ivlp": {"n_text_ctx": 2, "text_depth": 2, "n_vision_ctx": 2, "vision_depth": 2},
    "promptsrc": {"n_text_ctx": 2, "text_depth": 2, "n_vision_ctx": 2, "vision_depth": 2},
}


def _learner_snapshot(run) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in run.step.trainable_parameters().items()}


@pytest.mark.parametrize("kind", sorted(LEARNER_OPTIONS))
def test_kdpl_runs_end_to_end_for_every_learner(kind, data_dir, tmp_path):
    cfg = load_run_config(_config(data_dir, tmp_path, learner={"kind": kind, "options": LEARNER_OPTIONS[kind]}))
    run = build_run(cfg, log=lambda m: None)
    before = _learner_snapshot(run)
    summary = Trainer(run, log=lambda m: None).fit()
    after = _learner_snapshot(run)
    assert summary["step"] == 3 and np.isfinite(summary["loss/loss"])
    assert all(not torch.equal(before[k], after[k]) for k in before), "every trainable tensor moves"
    for p in run.learner.clip.parameters():
        assert not p.requires_grad
    assert all(not p.requires_grad for p in run.teacher.parameters()) and not run.teacher.training
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3]
    for key in ("loss/kd", "loss/loss", "lr", "images_per_s", "images_seen", "rejected_images"):
        assert key in lines[-1]
    if kind == "promptsrc":
        assert {"loss/scl_image", "loss/scl_text", "loss/scl_logits"} <= set(lines[-1])
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "checkpoints")] == [2, 3]


def test_promptkd_runs_end_to_end(data_dir, tmp_path):
    cfg = load_run_config(_config(data_dir, tmp_path, recipe="promptkd",
                                  learner={"kind": "promptkd", "options": {"n_ctx": 2, "depth": 2}}))
    assert cfg.loss.kd_weight == 1000.0 and cfg.loss.temperature_squared and cfg.loss.reduction == "mean"
    run = build_run(cfg, log=lambda m: None)
    before = _learner_snapshot(run)
    bn_before = run.learner.state_to_save()["projector.layers.1.running_mean"].clone()
    summary = Trainer(run, log=lambda m: None).fit()
    assert np.isfinite(summary["loss/kd"])
    after = _learner_snapshot(run)
    assert all(not torch.equal(before[k], after[k]) for k in before)
    # The projector's batch-norm statistics are state, saved in the checkpoint.
    state = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path / "checkpoints"))
    assert not torch.equal(state["learner"]["projector.layers.1.running_mean"], bn_before)


def test_kdpl_loss_matches_a_direct_computation(data_dir, tmp_path):
    """One step's KDPL loss equals 0.5 KL(t||s) + 0.5 KL(s||t) computed by hand from the models."""
    import torch.nn.functional as F

    cfg = load_run_config(_config(data_dir, tmp_path))
    run = build_run(cfg, log=lambda m: None)
    batch = next(iter(run.loader))
    images = batch.images["student"]
    parts = run.step(images, images, batch.mask.float())
    with torch.no_grad():
        scale = run.learner.logit_scale
        t = F.normalize(run.teacher.encode_image(images), dim=-1) @ run.step.teacher_class_vectors.t() * scale
        s = F.normalize(run.learner.encode_image(images), dim=-1) @ run.learner.class_features().t() * scale
        lt, ls = F.log_softmax(t.double(), -1), F.log_softmax(s.double(), -1)
        rows = 0.5 * (lt.exp() * (lt - ls)).sum(-1) + 0.5 * (ls.exp() * (ls - lt)).sum(-1)
        m = batch.mask.double()
        expected = (rows * m).sum() / m.sum()
    assert parts["kd"].item() == pytest.approx(expected.item(), rel=1e-4, abs=1e-6)


def test_lr_schedule_warmup_then_cosine():
    kw = dict(base_lr=0.1, total_steps=10, warmup_steps=2, warmup_lr=1e-5, schedule="cosine")
    lrs = [lr_at(s, **kw) for s in range(10)]
    assert lrs[:2] == [1e-5, 1e-5] and lrs[2] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[2:], lrs[3:])) and lrs[-1] < 0.01
    assert lr_at(0, **{**kw, "warmup_lr": None}) == pytest.approx(0.05)
    assert lr_at(5, **{**kw, "schedule": "constant"}) == 0.1


def test_resume_in_process_equals_uninterrupted(data_dir, tmp_path):
    full = load_run_config(_config(data_dir, tmp_path / "full", train={"max_steps": 6, "checkpoint_every": 3}))
    run = build_run(full, log=lambda m: None)
    Trainer(run, log=lambda m: None).fit()
    expected = _learner_snapshot(run)

    part = load_run_config(_config(data_dir, tmp_path / "part", train={"max_steps": 6, "checkpoint_every": 3}))
    crashing = Trainer(build_run(part, log=lambda m: None), log=lambda m: None)
    real_step, calls = crashing.step_fn, {"n": 0}

    def crash_at_step_4(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt("simulated crash in step 4, after the checkpoint of step 3")
        return real_step(*args, **kwargs)

    crashing.step_fn = crash_at_step_4
    with pytest.raises(KeyboardInterrupt):
        crashing.fit()
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "part" / "checkpoints")] == [3]
    resumed_cfg = load_run_config(_config(data_dir, tmp_path / "part",
                                          train={"max_steps": 6, "checkpoint_every": 3, "resume": True}))
    resumed = build_run(resumed_cfg, log=lambda m: None)
    trainer = Trainer(resumed, log=lambda m: None)
    trainer.fit()
    assert trainer.global_step == 6
    got = _learner_snapshot(resumed)
    for k in expected:
        assert torch.equal(expected[k], got[k]), k


def test_resume_refuses_a_checkpoint_of_another_config(data_dir, tmp_path):
    Trainer(build_run(load_run_config(_config(data_dir, tmp_path)), log=lambda m: None),
            log=lambda m: None).fit()
    other = load_run_config(_config(data_dir, tmp_path, optim={"lr": 0.5}, train={"resume": True}))
    with pytest.raises(ConfigError, match=r"optim\.lr"):
        Trainer(build_run(other, log=lambda m: None), log=lambda m: None).fit()


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(data_dir, tmp_path):
    cfg = load_run_config(_config(data_dir, tmp_path, train={"max_steps": 8, "checkpoint_every": 2,
                                                             "log_every": 3}))
    run = build_run(cfg, log=lambda m: None)
    trainer = Trainer(run, log=lambda m: None)
    real_step, calls = trainer.step_fn, {"n": 0}

    def poisoned(*args, **kwargs):
        parts = real_step(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 5:  # optimizer step index 4 (0-based)
            parts = {k: v * float("nan") for k, v in parts.items()}
        return parts

    trainer.step_fn = poisoned
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss at step 4.*step-000000004"):
        trainer.fit()
    steps = [s for s, _ in ckpt.list_checkpoints(tmp_path / "checkpoints")]
    assert steps == [2, 4] or steps == [2, 3, 4] or max(steps) <= 4
    state = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path / "checkpoints"))
    assert all(torch.isfinite(v).all() for v in state["learner"].values())


def test_gradient_accumulation_counts_optimizer_steps(data_dir, tmp_path):
    cfg = load_run_config(_config(data_dir, tmp_path, optim={"grad_accum": 2, "clip_grad_norm": 1.0},
                                  train={"max_steps": None, "epochs": 2}))
    run = build_run(cfg, log=lambda m: None)
    trainer = Trainer(run, log=lambda m: None)
    assert len(run.loader) == 3 and trainer.total_steps == 3  # 2 epochs x 3 batches / 2
    summary = trainer.fit()
    # 6 micro-batches of 8 rows; the last batch of each epoch holds 4 images and 4 padding rows.
    assert summary["step"] == 3 and summary["images_seen"] == 40


# ------------------------------------------------------------------------------ config errors


def test_config_errors_name_the_key(data_dir, tmp_path):
    good = _config(data_dir, tmp_path)
    with pytest.raises(ConfigError, match=r"unknown config key 'optim\.lrr'; did you mean 'optim\.lr'"):
        load_run_config(good, ["optim.lrr=0.1"])
    with pytest.raises(ConfigError, match=r"unknown config key 'trian\.epochs'; did you mean 'train\.epochs'"):
        load_run_config(good, ["trian.epochs=2"])
    with pytest.raises(ConfigError, match=r"optim\.lr: expected a number, got 'fast'"):
        load_run_config(good, ["optim.lr=fast"])
    with pytest.raises(ConfigError, match=r"learner\.options\.n_ctxx.*did you mean 'learner\.options\.n_ctx'"):
        load_run_config(good, ["learner.options.n_ctxx=3"])
    with pytest.raises(ConfigError, match=r"data\.backend: 'dali' is not one of"):
        load_run_config(good, ["data.backend=dali"])
    with pytest.raises(ConfigError, match=r"train\.epochs must be >= 1"):
        load_run_config(good, ["train.epochs=0"])
    with pytest.raises(ConfigError, match=r"unknown recipe 'kdp'; did you mean 'kdpl'"):
        load_run_config({**good, "recipe": "kdp"})
    with pytest.raises(ConfigError, match="needs learner.kind=promptkd"):
        load_run_config(good, ["method=promptkd"])


def test_missing_class_file_and_bad_class_names(data_dir, tmp_path):
    with pytest.raises(ConfigError, match=r"class-name file .*nope\.txt.* does not exist"):
        build_run(load_run_config(_config(data_dir, tmp_path), [f"data.class_names={tmp_path}/nope.txt"]))
    bad = tmp_path / "classes.txt"
    bad.write_text("cat\n\ndog\ncat\n")
    with pytest.raises(ConfigError, match=r"line 2 is empty; line 4 repeats 'cat' \(first on line 1\)"):
        build_run(load_run_config(_config(data_dir, tmp_path), [f"data.class_names={bad}"]))


def test_folder_without_valid_images_is_a_clear_error(data_dir, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match=r"(?i)no (valid )?images|empty"):
        build_run(load_run_config(_config(data_dir, tmp_path), [f"data.train={empty}"]), log=lambda m: None)


def test_teacher_class_vectors_of_another_dimension_are_refused(data_dir, tmp_path):
    from clipdistill.engine.distill.step import DistillStep

    run = build_run(load_run_config(_config(data_dir, tmp_path)), log=lambda m: None)
    with pytest.raises(ValueError, match=r"dimension 7 but the teacher's image features have 48"):
        DistillStep(run.teacher, run.learner, torch.randn(5, 7))
    with pytest.raises(ValueError, match="needs a PromptKDStudent"):
        DistillStep(run.teacher, run.learner, run.step.teacher_class_vectors, recipe="promptkd")


# ------------------------------------------------------------------------------ command line


def _cli(*args, cwd, timeout=600):
    exe = Path(sys.executable).parent / "clipdistill"
    return subprocess.run([str(exe), *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)


def _write_config(data_dir: Path, out_dir: Path, path: Path, **sections) -> Path:
    import yaml

    cfg = _config(data_dir, out_dir, **sections)
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_cli_distill_and_its_errors(data_dir, tmp_path):
    config = _write_config(data_dir, tmp_path / "run", tmp_path / "run.yaml")
    proc = _cli("distill", "--config", str(config), "train.max_steps=2", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["step"] == 2 and summary["checkpoint"].endswith("step-000000002.safetensors")
    proc = _cli("distill", "--config", str(config), "optim.momentun=0.5", cwd=tmp_path)
    assert proc.returncode == 2
    assert "unknown config key 'optim.momentun'; did you mean 'optim.momentum'?" in proc.stderr


def test_cli_distill_help_lists_recipes(tmp_path):
    proc = _cli("distill", "--help", cwd=tmp_path)
    assert proc.returncode == 0 and "kdpl" in proc.stdout


def test_sigkill_then_resume_equals_uninterrupted(data_dir, tmp_path):
    """A run killed with SIGKILL at a random step and resumed ends with the uninterrupted run's parameters."""
    steps = 12
    sections = dict(train={"max_steps": steps, "checkpoint_every": 1, "keep_last": 2, "log_every": 1})
    full_cfg = _write_config(data_dir, tmp_path / "full", tmp_path / "full.yaml", **sections)
    proc = _cli("distill", "--config", str(full_cfg), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr

    killed_cfg = _write_config(data_dir, tmp_path / "killed", tmp_path / "killed.yaml", **sections)
    exe = Path(sys.executable).parent / "clipdistill"
    kill_after = int(np.random.default_rng().integers(2, steps - 2))  # a random step, as the issue asks
    child = subprocess.Popen([str(exe), "distill", "--config", str(killed_cfg)], cwd=tmp_path,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = tmp_path / "killed" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and child.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= kill_after:
            break
        time.sleep(0.01)
    if child.poll() is None:
        os.kill(child.pid, signal.SIGKILL)
    child.wait()
    killed_at = max(s for s, _ in ckpt.list_checkpoints(tmp_path / "killed" / "checkpoints"))
    proc = _cli("distill", "--config", str(killed_cfg), "--resume", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "resumed from" in proc.stderr or killed_at == steps

    full = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path / "full" / "checkpoints"))
    resumed = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path / "killed" / "checkpoints"))
    assert full["step"] == resumed["step"] == steps
    for key, value in full["learner"].items():
        assert torch.equal(value, resumed["learner"][key]), key
    for key, value in full["optimizer"]["state"].items():
        for name, tensor in value.items():
            assert torch.equal(tensor, resumed["optimizer"]["state"][key][name]), (key, name)


# ------------------------------------------------------------------------------ embedding API


def _embedding_parts(data_dir, tmp_path):
    from clipdistill.engine.models.class_vectors import encode_class_names
    from clipdistill.engine.models import build_student, build_teacher, get_tokenizer
    from clipdistill.engine.prompts import build_learner
    from clipdistill.engine.distill.step import DistillStep

    torch.manual_seed(0)
    teacher = build_teacher("clipdistill-tiny-teacher", None)
    vectors = encode_class_names(teacher.encode_text, get_tokenizer("clipdistill-tiny-teacher"), CLASSES,
                                 ["a photo of a {}."])
    learner = build_learner("coop", build_student("clipdistill-tiny-student", None),
                            tokenizer=get_tokenizer("clipdistill-tiny-student"), class_names=CLASSES, n_ctx=2)
    return DistillStep(teacher, learner, vectors, recipe="kdpl")


def test_embedding_api_from_a_hand_written_loop(data_dir, tmp_path):
    step = _embedding_parts(data_dir, tmp_path)
    params = step.trainable_parameters()
    assert set(params) == {"prompts.ctx"}
    optimizer = torch.optim.SGD(params.values(), lr=0.5)
    torch.manual_seed(1)
    images = torch.randn(6, 3, 32, 32)
    losses = []
    for _ in range(8):
        parts = step(images, images)
        assert set(parts) == {"kd", "loss"}
        optimizer.zero_grad()
        parts["loss"].backward()
        optimizer.step()
        losses.append(parts["loss"].item())
    assert losses[-1] < losses[0]
    state = step.state_to_save()
    fresh = _embedding_parts(data_dir, tmp_path)
    fresh.load_saved_state(state)
    assert fresh(images, images)["loss"].item() == pytest.approx(step(images, images)["loss"].item(), rel=1e-6)


def test_embedding_api_from_a_compiled_loop(data_dir, tmp_path):
    step = _embedding_parts(data_dir, tmp_path)
    optimizer = torch.optim.SGD(step.trainable_parameters().values(), lr=0.5)
    compiled = torch.compile(step)
    torch.manual_seed(1)
    images = torch.randn(6, 3, 32, 32)
    eager_first = step(images, images)["loss"].item()
    losses = []
    for _ in range(4):
        parts = compiled(images, images)
        optimizer.zero_grad()
        parts["loss"].backward()
        optimizer.step()
        losses.append(parts["loss"].item())
    assert losses[0] == pytest.approx(eager_first, rel=1e-4)
    assert losses[-1] < losses[0]


# ------------------------------------------------------------------------------ checkpoints


def test_checkpoint_roundtrip_is_atomic_and_pruned(tmp_path):
    state = {"a": torch.arange(3.0), "nested": {"b": [1, 2.5, None, "x"], 3: torch.ones(2, dtype=torch.int64)},
             "t": (1, float("inf")), "np": np.arange(4, dtype=np.int32)}
    for step in (1, 2, 3):
        ckpt.save_checkpoint(tmp_path, step, state, keep_last=2)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [2, 3]
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]
    back = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path))
    assert torch.equal(back["a"], state["a"]) and back["nested"]["b"] == [1, 2.5, None, "x"]
    assert torch.equal(back["nested"][3], state["nested"][3]) and back["t"] == (1, float("inf"))
    assert np.array_equal(back["np"], state["np"])


def test_checkpoint_refuses_garbage_and_objects(tmp_path):
    (tmp_path / "step-000000001.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ckpt.CheckpointError, match="unreadable"):
        ckpt.load_checkpoint(tmp_path / "step-000000001.safetensors")
    with pytest.raises(TypeError, match="cannot store object"):
        ckpt.save_checkpoint(tmp_path, 2, {"bad": object()})


def test_rng_state_roundtrip():
    import random

    state = ckpt.rng_state()
    first = (torch.rand(3), random.random(), np.random.rand())
    ckpt.set_rng_state(state)
    second = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(first[0], second[0]) and first[1:] == second[1:]


# ------------------------------------------------------------------------------ GPU


@pytest.mark.gpu
def test_kdpl_step_on_gpu_in_bf16(data_dir, tmp_path):
    cfg = load_run_config(_config(data_dir, tmp_path, train={"device": "cuda", "precision": "bf16"}))
    run = build_run(cfg, log=lambda m: None)
    summary = Trainer(run, log=lambda m: None).fit()
    assert np.isfinite(summary["loss/loss"])
    assert all(p.dtype == torch.float32 for p in run.step.trainable_parameters().values())


def test_distill_function_returns_the_summary(data_dir, tmp_path):
    summary = distill(load_run_config(_config(data_dir, tmp_path, train={"max_steps": 1})), log=lambda m: None)
    assert summary["step"] == 1 and Path(summary["checkpoint"]).is_file()


def test_model_selection_on_held_out_unlabeled_images(data_dir, tmp_path):
    """data.holdout_fraction keeps images out of training; the best held-out KL's state is saved."""
    cfg = load_run_config(_config(data_dir, tmp_path, data={"holdout_fraction": 0.25},
                                  train={"max_steps": 4, "checkpoint_every": 2}))
    run = build_run(cfg, log=lambda m: None)
    held = {run.heldout_loader.samples.location(i) for i in range(len(run.heldout_loader.samples))}
    train = {run.loader.samples.location(i) for i in range(len(run.loader.samples))}
    assert len(held) == 5 and len(train) == 15 and not held & train
    trainer = Trainer(run, log=lambda m: None)
    trainer.fit()
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = [x for x in lines if "heldout/kl" in x]
    assert [x["step"] for x in evals] == [2, 4]
    best = ckpt.load_checkpoint(tmp_path / "best.safetensors")
    best_kl = min(x["heldout/kl"] for x in evals)
    assert best["best"]["kl"] == pytest.approx(best_kl) and trainer.best == best["best"]
    assert best["step"] == [x["step"] for x in evals if x["heldout/kl"] == best_kl][0]
    assert set(best["learner"]) == set(run.step.state_to_save())
    with pytest.raises(ConfigError, match=r"data\.holdout_fraction must be in \[0, 1\)"):
        load_run_config(_config(data_dir, tmp_path), ["data.holdout_fraction=1.5"])
