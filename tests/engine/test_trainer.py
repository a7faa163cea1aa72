"""The training loop end to end (engine/training/trainer.py, builder.py): every learner, recipes, resume,
refusals, the ``distill`` command and function (tiny models, CPU).

The run configuration is the ``tiny_run_config`` factory of conftest.py, on its ``shape_data`` images.
"""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from clipdistill.engine.config import ConfigError
from clipdistill.engine.config.run import load_run_config
from clipdistill.engine.training import checkpoint as ckpt
from clipdistill.engine.training.builder import build_run
from clipdistill.engine.training.trainer import NonFiniteLossError, Trainer, distill
from clipdistill.loaders.loader import dali_available

_spec = importlib.util.spec_from_file_location("_kill", Path(__file__).with_name("_kill.py"))
_kill = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_kill)

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
def test_kdpl_runs_end_to_end_for_every_learner(kind, shape_data, tiny_run_config, tmp_path):
    cfg = load_run_config(tiny_run_config(shape_data, tmp_path,
                                          learner={"kind": kind, "options": LEARNER_OPTIONS[kind]}))
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


def test_promptkd_runs_end_to_end(shape_data, tiny_run_config, tmp_path):
    cfg = load_run_config(tiny_run_config(shape_data, tmp_path, recipe="promptkd",
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


def test_resume_in_process_equals_uninterrupted(shape_data, tiny_run_config, tmp_path):
    sections = dict(train={"max_steps": 6, "checkpoint_every": 3})
    full = load_run_config(tiny_run_config(shape_data, tmp_path / "full", **sections))
    run = build_run(full, log=lambda m: None)
    Trainer(run, log=lambda m: None).fit()
    expected = _learner_snapshot(run)

    part = load_run_config(tiny_run_config(shape_data, tmp_path / "part", **sections))
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
    resumed_cfg = load_run_config(tiny_run_config(shape_data, tmp_path / "part",
                                                  train={"max_steps": 6, "checkpoint_every": 3, "resume": True}))
    resumed = build_run(resumed_cfg, log=lambda m: None)
    trainer = Trainer(resumed, log=lambda m: None)
    trainer.fit()
    assert trainer.global_step == 6
    got = _learner_snapshot(resumed)
    for k in expected:
        assert torch.equal(expected[k], got[k]), k


def test_resume_refuses_a_checkpoint_of_another_config(shape_data, tiny_run_config, tmp_path):
    Trainer(build_run(load_run_config(tiny_run_config(shape_data, tmp_path)), log=lambda m: None),
            log=lambda m: None).fit()
    other = load_run_config(tiny_run_config(shape_data, tmp_path, optim={"lr": 0.5}, train={"resume": True}))
    with pytest.raises(ConfigError, match=r"optim\.lr"):
        Trainer(build_run(other, log=lambda m: None), log=lambda m: None).fit()


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(shape_data, tiny_run_config, tmp_path):
    cfg = load_run_config(tiny_run_config(shape_data, tmp_path, train={"max_steps": 8, "checkpoint_every": 2,
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


def test_gradient_accumulation_counts_optimizer_steps(shape_data, tiny_run_config, tmp_path):
    cfg = load_run_config(tiny_run_config(shape_data, tmp_path, optim={"grad_accum": 2, "clip_grad_norm": 1.0},
                                          train={"max_steps": None, "epochs": 2}))
    run = build_run(cfg, log=lambda m: None)
    trainer = Trainer(run, log=lambda m: None)
    assert len(run.loader) == 3 and trainer.total_steps == 3  # 2 epochs x 3 batches / 2
    summary = trainer.fit()
    # 6 micro-batches of 8 rows; the last batch of each epoch holds 4 images and 4 padding rows.
    assert summary["step"] == 3 and summary["images_seen"] == 40


def test_distill_function_returns_the_summary(shape_data, tiny_run_config, tmp_path):
    summary = distill(load_run_config(tiny_run_config(shape_data, tmp_path, train={"max_steps": 1})),
                      log=lambda m: None)
    assert summary["step"] == 1 and Path(summary["checkpoint"]).is_file()


def test_model_selection_on_held_out_unlabeled_images(shape_data, tiny_run_config, tmp_path):
    """data.holdout_fraction keeps images out of training; the best held-out KL's state is saved."""
    cfg = load_run_config(tiny_run_config(shape_data, tmp_path, data={"holdout_fraction": 0.25},
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
        load_run_config(tiny_run_config(shape_data, tmp_path), ["data.holdout_fraction=1.5"])


# ---------------------------------------------------------------------- refusals of build_run


def test_missing_class_file_and_bad_class_names(shape_data, tiny_run_config, tmp_path):
    with pytest.raises(ConfigError, match=r"class-name file .*nope\.txt.* does not exist"):
        build_run(load_run_config(tiny_run_config(shape_data, tmp_path),
                                  [f"data.class_names={tmp_path}/nope.txt"]))
    bad = tmp_path / "classes.txt"
    bad.write_text("cat\n\ndog\ncat\n")
    with pytest.raises(ConfigError, match=r"line 2 is empty; line 4 repeats 'cat' \(first on line 1\)"):
        build_run(load_run_config(tiny_run_config(shape_data, tmp_path), [f"data.class_names={bad}"]))


def test_folder_without_valid_images_is_a_clear_error(shape_data, tiny_run_config, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match=r"(?i)no (valid )?images|empty"):
        build_run(load_run_config(tiny_run_config(shape_data, tmp_path), [f"data.train={empty}"]),
                  log=lambda m: None)


# ------------------------------------------------------------------------------- command line


def _cli(*args, cwd, timeout=600):
    exe = Path(sys.executable).parent / "clipdistill"
    return subprocess.run([str(exe), *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)


def _write_config(cfg: dict, path: Path) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(cfg))
    return path


def test_cli_distill_and_its_errors(shape_data, tiny_run_config, tmp_path):
    config = _write_config(tiny_run_config(shape_data, tmp_path / "run"), tmp_path / "run.yaml")
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


@pytest.mark.parametrize("backend", [
    "torch",
    # DALI's variant (three more runs of the command) is in the slow tier, which CI runs too.
    pytest.param("dali-cpu", marks=[pytest.mark.slow,
                                    pytest.mark.skipif(not dali_available(), reason="NVIDIA DALI is not installed")]),
])
def test_sigkill_then_resume_equals_uninterrupted(shape_data, tiny_run_config, tmp_path, backend):
    """A run killed with SIGKILL at a random step and resumed ends with the uninterrupted run's parameters,
    with each CPU loader backend (two decoding workers)."""
    steps = 12
    sections = dict(train={"max_steps": steps, "checkpoint_every": 1, "keep_last": 2, "log_every": 1},
                    data={"backend": backend, "workers": 2})
    full_cfg = _write_config(tiny_run_config(shape_data, tmp_path / "full", **sections), tmp_path / "full.yaml")
    proc = _cli("distill", "--config", str(full_cfg), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr

    killed_cfg = _write_config(tiny_run_config(shape_data, tmp_path / "killed", **sections),
                               tmp_path / "killed.yaml")
    kill_after = int(np.random.default_rng().integers(2, steps - 2))  # a random step, as the issue asks
    _kill.run_then_sigkill(["distill", "--config", str(killed_cfg)], cwd=tmp_path,
                           metrics=tmp_path / "killed" / "metrics.jsonl", after_lines=kill_after)
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


# ---------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
def test_kdpl_step_on_gpu_in_bf16(shape_data, tiny_run_config, tmp_path):
    cfg = load_run_config(tiny_run_config(shape_data, tmp_path, train={"device": "cuda", "precision": "bf16"}))
    run = build_run(cfg, log=lambda m: None)
    summary = Trainer(run, log=lambda m: None).fit()
    assert np.isfinite(summary["loss/loss"])
    assert all(p.dtype == torch.float32 for p in run.step.trainable_parameters().values())


def test_warmup_covering_the_whole_run_warns(shape_data, tiny_run_config, tmp_path):
    """optim.warmup_epochs longer than train.max_steps: one WARNING naming the key and both step counts."""
    def messages(optim):
        cfg = load_run_config(tiny_run_config(shape_data, tmp_path, optim=optim))
        logged = []
        trainer = Trainer(build_run(cfg, log=lambda m: None), log=logged.append)
        return trainer, [m for m in logged if m.startswith("WARNING")]

    trainer, warned = messages({"warmup_steps": 0, "warmup_epochs": 2})
    assert trainer.total_steps == 3 and trainer.core.warmup_steps >= 3  # the user's setting is kept
    assert len(warned) == 1 and "optim.warmup_epochs=2" in warned[0]
    assert f"{trainer.core.warmup_steps} warm-up steps" in warned[0] and "3 optimizer steps" in warned[0]
    assert messages({"warmup_steps": 1})[1] == []
