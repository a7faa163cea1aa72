"""The data-free recipe in the engine's trainer: ``clipdistill distill --recipe datafree``.

A tiny synthetic set (Fourier generator, the random-init tiny teacher) is made once per module; the
student is timm's ``test_efficientnet`` (batch norm included) at 32 px. These check mechanics: the run
takes its teacher and class names from the set, selects on a held-out synthetic set, resumes exactly
after SIGKILL, and its student goes through export, predict and eval with the trainer's numbers; the
old commands run the recipe; a checkpoint of the old loop loads.
"""
from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from clipdistill.engine.config.run import load_run_config
from clipdistill.engine.config.schema import ConfigError
from clipdistill.engine.datafree import synthesize
from clipdistill.engine.datafree.dataset import read_synthetic_set
from clipdistill.engine.datafree.student import TimmStudent, build_timm_backbone
from clipdistill.engine.distill.step import DistillStep
from clipdistill.engine.evaluation.export import ExportError, read_distilled, rebuild_learner
from clipdistill.engine.io import image_spec
from clipdistill.engine.models import TINY_TEACHER, Teacher, get_tokenizer
from clipdistill.engine.training import checkpoint as ckpt
from clipdistill.engine.training.trainer import distill
from clipdistill.kernels.kd_loss import kd_loss_reference

_spec = importlib.util.spec_from_file_location("_kill", Path(__file__).with_name("_kill.py"))
_kill = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_kill)

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "datafree_9a0249b"
STUDENT = "test_efficientnet"
CLASSES = ("cat", "dog", "sea lion")


def _set(out: Path, *, per_class: int, seed: int, diversifier: str) -> Path:
    plan = synthesize.SynthesisPlan(
        teacher=TINY_TEACHER, teacher_weights=None, class_names=CLASSES, diversifier=diversifier,
        generator="fourier", per_class=per_class, seed=seed, steps=2, n_cutouts=2, contrastive_steps=2)
    teacher = synthesize.load_teacher(TINY_TEACHER, None, "cpu")
    synthesize.synthesize(plan, out, teacher, get_tokenizer(TINY_TEACHER), batch_size=12, progress=False)
    return out


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    return (_set(root / "train", per_class=4, seed=0, diversifier="contrastive"),
            _set(root / "held", per_class=2, seed=1, diversifier="mix"))


def _overrides(train: Path, held: Path, out: Path, **extra) -> list[str]:
    keys = {"data.train": str(train), "data.heldout": str(held), "student.name": STUDENT,
            "learner.options.image_size": 32, "data.batch_size": 4, "data.backend": "torch", "data.workers": 1,
            "train.epochs": 2, "train.checkpoint_every": 2, "train.log_every": 1, "train.out_dir": str(out),
            "train.progress": False, **extra}
    return [f"{k}={json.dumps(v) if isinstance(v, str) else v}" for k, v in keys.items()]


def test_the_recipe_trains_with_the_sets_teacher_and_names_and_selects_on_the_held_out_set(sets, tmp_path):
    train, held = sets
    cfg = load_run_config(None, _overrides(train, held, tmp_path / "run"), recipe="datafree")
    assert cfg.teacher.name == "ViT-B-32"  # the recipe's default, which the set's plan replaces
    logged: list[str] = []
    summary = distill(cfg, log=logged.append)
    assert any("the one data.train was synthesized with" in m for m in logged)
    state = ckpt.load_checkpoint(summary["checkpoint"])
    assert state["config"]["teacher"] == {"name": TINY_TEACHER, "weights": None, "precision": None,
                                          "cache": None, "prompts": None}
    assert state["config"]["method"] == "datafree" and state["step"] == 6  # 12 images / 4, 2 epochs
    # the whole network trains and is saved: backbone, batch-norm statistics, head, logit scale
    assert any(k.startswith("backbone.") and k.endswith("running_mean") for k in state["learner"])
    assert {"head.weight", "head.bias", "scale"} <= set(state["learner"])
    teacher_scale = float(synthesize.load_teacher(TINY_TEACHER, None, "cpu").logit_scale)
    assert float(state["learner"]["scale"]) == pytest.approx(teacher_scale)  # it scores at the teacher's scale
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "heldout/kl" in r] == [2, 4, 6]
    assert (tmp_path / "run" / "best.safetensors").is_file()
    vectors, header = ckpt.load_class_vectors(summary["checkpoint"], state["class_vectors"])
    assert header["class_names"] == list(CLASSES) and vectors.shape == (3, 48)


def test_the_loss_is_the_forward_kl_at_the_teachers_scale_plus_the_feature_term(teacher_clip):
    teacher = Teacher(teacher_clip)
    torch.manual_seed(0)
    student = TimmStudent(build_timm_backbone(STUDENT), 48, image_size=32, logit_scale=float(teacher.logit_scale))
    vectors = torch.nn.functional.normalize(torch.randn(5, 48), dim=-1)
    step = DistillStep(teacher, student, vectors, recipe="datafree", temperature=2.0, feature_weight=0.5)
    side = image_spec(teacher.model)[0]
    t_images, s_images = torch.randn(4, 3, side, side), torch.randn(4, 3, 32, 32)
    student.eval()  # batch norm in eval mode: the reference sees the same features
    parts = step(t_images, s_images)
    with torch.no_grad():
        features_t = teacher.encode_image(t_images)
        features_s = student.project(s_images)
    scale = float(teacher.logit_scale)
    expected = kd_loss_reference(features_s, features_t, vectors, logit_scale=scale, teacher_logit_scale=scale,
                                 temperature=2.0, forward_weight=1.0, reverse_weight=0.0, reduction="batchmean",
                                 temperature_squared=True)
    torch.testing.assert_close(parts["kd"].detach(), expected.float(), rtol=1e-5, atol=1e-6)
    cosine = torch.nn.functional.cosine_similarity(features_s, features_t, dim=-1)
    torch.testing.assert_close(parts["feature"].detach(), 0.5 * (1 - cosine).mean(), rtol=1e-5, atol=1e-6)
    parts["loss"].backward()
    assert all(p.grad is not None for p in student.parameters())  # nothing in it is frozen


def test_padding_rows_stay_out_of_the_backbones_batch_statistics():
    torch.manual_seed(0)
    student = TimmStudent(build_timm_backbone(STUDENT), 8, image_size=32).train()
    images = torch.randn(4, 3, 32, 32)
    mask = torch.tensor([True, True, True, False])
    reference = TimmStudent(build_timm_backbone(STUDENT), 8, image_size=32).train()
    reference.load_state_dict(student.state_dict())
    out = student.project(images, mask)
    expected = reference.project(images[:3])
    torch.testing.assert_close(out[:3], expected)
    assert torch.equal(out[3], torch.zeros(8))
    for (name, a), (_, b) in zip(student.named_buffers(), reference.named_buffers()):
        assert torch.equal(a, b), name


def test_a_single_image_in_training_passes_on_running_statistics():
    """An epoch's last batch may hold one real image; a batch norm over its 1x1 map has no statistics."""
    torch.manual_seed(0)
    student = TimmStudent(build_timm_backbone(STUDENT), 8, image_size=32).train()
    before = {k: v.clone() for k, v in student.state_dict().items()}
    one = student.project(torch.randn(1, 3, 32, 32))
    padded = student.project(torch.randn(3, 3, 32, 32), torch.tensor([False, True, False]))
    assert torch.isfinite(one).all() and torch.isfinite(padded).all() and student.training
    assert all(m.training for m in student.modules())  # the batch norms are back in training mode
    for key, value in student.state_dict().items():  # and their statistics were not updated by it
        assert torch.equal(value, before[key]), key


def _cli(*args, cwd, timeout=600):
    exe = Path(sys.executable).parent / "clipdistill"
    return subprocess.run([str(exe), *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)


def test_sigkill_then_resume_equals_uninterrupted(sets, tmp_path):
    train, held = sets
    common = ["distill", "--recipe", "datafree", *_overrides(train, held, tmp_path / "x", **{
        "train.checkpoint_every": 1, "train.epochs": 3})]
    full = [*common, "train.out_dir=" + str(tmp_path / "full")]
    proc = _cli(*full, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    killed = [*common, "train.out_dir=" + str(tmp_path / "killed")]
    kill_after = int(np.random.default_rng().integers(2, 7))  # a random step of 9
    # Two metrics lines a step (the losses, then the held-out selection before the checkpoint): after
    # step k's, the checkpoints of steps 1 .. k-1 are written.
    _kill.run_then_sigkill(killed, cwd=tmp_path, metrics=tmp_path / "killed" / "metrics.jsonl",
                           after_lines=2 * kill_after)
    killed_at = max(step for step, _ in ckpt.list_checkpoints(tmp_path / "killed" / "checkpoints"))
    proc = _cli(*killed, "--resume", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert killed_at == 9 or f"(step {killed_at})" in proc.stderr  # it resumed where the kill left it
    a = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path / "full" / "checkpoints"))
    b = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path / "killed" / "checkpoints"))
    assert a["step"] == b["step"] == 9
    assert set(a["learner"]) == set(b["learner"])
    for key, value in a["learner"].items():  # the whole network, batch-norm statistics included
        assert torch.equal(value, b["learner"][key]), key
    for key, value in a["optimizer"]["state"].items():
        for name, tensor in value.items():
            assert torch.equal(tensor, b["optimizer"]["state"][key][name]), (key, name)
    assert load_file(str(tmp_path / "full" / "best.safetensors")).keys() == \
        load_file(str(tmp_path / "killed" / "best.safetensors")).keys()


def test_export_predict_and_eval_use_the_trained_student(sets, tmp_path):
    train, held = sets
    run = tmp_path / "run"
    summary = distill(load_run_config(None, _overrides(train, held, run), recipe="datafree"), log=lambda m: None)
    best = ckpt.load_checkpoint(run / "best.safetensors")
    out = tmp_path / "student.safetensors"
    proc = _cli("export", str(run), "--out", str(out), cwd=tmp_path)  # a run folder: its best.safetensors
    assert proc.returncode == 0, proc.stderr
    assert read_distilled(out).header["source"]["checkpoint"] == str((run / "best.safetensors").resolve())
    line = json.loads(proc.stdout.strip().splitlines()[-1])
    assert line["method"] == "datafree" and line["learner"] == "timm" and line["class_vectors"] == "teacher"
    # the export's class vectors are those the run trained against
    vectors, _ = ckpt.load_class_vectors(run / "best.safetensors", best["class_vectors"])
    assert torch.equal(vectors, ckpt.load_class_vectors(summary["checkpoint"],
                                                        ckpt.load_checkpoint(summary["checkpoint"])["class_vectors"])[0])
    assert torch.equal(load_file(str(out))["class_vectors"], vectors)
    proc = _cli("predict", str(held / "images"), "--checkpoint", str(out), "--top-k", "2", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(x) for x in proc.stdout.splitlines()]
    assert len(records) == 6 and all(r["top"][0]["class"] in CLASSES for r in records)
    # eval's agreement and KL on the held-out set equal the trainer's selection figures for best
    proc = _cli("eval", "--checkpoint", str(out), "--unlabeled", str(held / "images"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["unlabeled"]["student_distilled"]["kl"] == pytest.approx(best["best"]["kl"], rel=1e-4, abs=1e-6)
    assert report["unlabeled"]["student_distilled"]["agreement"] == pytest.approx(best["best"]["agreement"])
    assert "student_zero_shot" not in report["models"]  # a timm student has no zero-shot row


def test_the_old_commands_run_the_recipe(sets, tmp_path):
    train, held = sets
    proc = _cli("distill-datafree", "--data", str(train), "--eval-data", str(held), "--out-dir", str(tmp_path / "r"),
                "--student", STUDENT, "--image-size", "32", "--epochs", "1", "--batch-size", "6",
                "--feature-weight", "0.1", "--no-progress", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "distill --recipe datafree" in proc.stderr
    config = json.loads((tmp_path / "r" / "config.json").read_text())
    assert config["method"] == "datafree" and config["data"]["heldout"] == str(held)
    assert config["loss"]["feature_weight"] == 0.1 and config["learner"]["options"] == {"image_size": 32}
    # the set's teacher named alone keeps its (random-init) weights, as the old command's default
    assert config["teacher"]["name"] == TINY_TEACHER and config["teacher"]["weights"] is None
    proc = _cli("distill-datafree", "--data", str(train), "--out-dir", str(tmp_path / "t"), "--student", STUDENT,
                "--image-size", "32", "--epochs", "1", "--batch-size", "6", "--teacher", TINY_TEACHER, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "t" / "config.json").read_text())["teacher"]["weights"] is None
    # a listed image only (not a stray file in the folder), agreement and each one's top-1 on the intended class
    stray = next((held / "images").rglob("*.png"))
    shutil.copy(stray, stray.with_name("not-listed.png"))
    proc = _cli("datafree-eval", "--checkpoint", str(tmp_path / "r"), "--data", str(held), cwd=tmp_path)
    stray.with_name("not-listed.png").unlink()
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["images"] == 6 and 0 <= result["agreement"] <= 100 and result["kl"] >= 0
    assert 0 <= result["teacher_prompt_class_top1"] <= 100 and 0 <= result["student_prompt_class_top1"] <= 100


def test_bad_inputs_are_named_before_any_model_is_built(sets, tmp_path):
    train, held = sets
    proc = _cli("distill", "--recipe", "datafree", *_overrides(train, held, tmp_path / "r", **{
        "student.name": "resnet_181"}), cwd=tmp_path)
    assert proc.returncode == 2 and "student.name: 'resnet_181' is not a timm model" in proc.stderr
    for key in ("data.shots=2", "data.base_classes_only=true", "student.precision=fp16",
                "learner.options.image_size=0"):
        with pytest.raises(ConfigError, match=key.split("=")[0].replace(".", r"\.")):
            load_run_config(None, [key], recipe="datafree")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not safetensors")
    proc = _cli("distill", "--recipe", "datafree", *_overrides(train, held, tmp_path / "j", **{
        "student.weights": str(junk)}), cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"clipdistill distill: error: student.weights: {str(junk)!r} cannot be read as safetensors (Error while "
        f"deserializing header: header too large)"]
    with pytest.raises(ConfigError, match="method 'datafree' and learner.kind=timm go together"):
        load_run_config(None, ["learner.kind=coop"], recipe="datafree")
    with pytest.raises(ConfigError, match="data.heldout .* data.holdout_fraction"):
        load_run_config(None, [f"data.heldout={held}", "data.holdout_fraction=0.1"], recipe="datafree")
    plain = tmp_path / "plain"
    shutil.copytree(train / "images", plain)
    cfg = load_run_config(None, _overrides(plain, held, tmp_path / "p"), recipe="datafree")
    with pytest.raises(ConfigError, match="is not a synthetic set .* data.class_names"):
        distill(cfg, log=lambda m: None)


def test_a_set_that_grew_does_not_change_a_resumed_run(sets, tmp_path):
    train, held = sets
    grown = tmp_path / "grown"
    shutil.copytree(train, grown)
    run = tmp_path / "run"
    distill(load_run_config(None, _overrides(grown, held, run, **{"train.epochs": 1}), recipe="datafree"),
            log=lambda m: None)
    with open(grown / synthesize.MANIFEST_FILE, "a", encoding="utf-8") as fh:  # synthesis went on
        entry = json.loads((grown / synthesize.MANIFEST_FILE).read_text().splitlines()[0])
        fh.write(json.dumps({**entry, "path": entry["path"].replace(".png", "-more.png")}) + "\n")
    shutil.copy(grown / entry["path"], grown / entry["path"].replace(".png", "-more.png"))
    assert len(read_synthetic_set(grown).samples) == 13
    logged: list[str] = []
    summary = distill(load_run_config(None, _overrides(grown, held, run, **{"train.epochs": 2, "train.resume": True}),
                                      recipe="datafree"), log=logged.append)
    assert any("resumed from" in m for m in logged)
    assert summary["images_seen"] == 24  # 12 images, 2 epochs: the saved list


def test_a_checkpoint_of_the_old_loop_loads_and_scores_as_that_code_did(tmp_path, monkeypatch):
    folder = tmp_path / "old"
    shutil.copytree(FIXTURE, folder)
    checkpoint = next((folder / "student").glob("step-*.safetensors"))
    expected = load_file(str(folder / "expected.safetensors"))
    with pytest.raises(ExportError, match="'syn'.* cannot be read here. Restore that set"):
        read_distilled(checkpoint)  # the class names are the set's, recorded by a relative path
    monkeypatch.chdir(folder)
    distilled = read_distilled(checkpoint)
    assert distilled.method == "datafree" and distilled.class_names == list(CLASSES)
    learner = rebuild_learner(distilled, build_timm_backbone(distilled.student_name), class_names=CLASSES)
    mean = torch.tensor(learner.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(learner.image_std).view(1, 3, 1, 1)
    with torch.no_grad():
        logits = learner((expected["images"] - mean) / std, distilled.teacher_vectors).logits
    torch.testing.assert_close(logits, expected["logits"], rtol=1e-5, atol=1e-5)
    out = folder / "exported.safetensors"
    proc = _cli("export", str(checkpoint), "--out", str(out), cwd=folder)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1])["classes"] == 3


def _tinted_domains(root: Path, contrasts=(0.6, 0.3)) -> Path:
    """ROOT/<domain>/<class>/<images>: each class a hue in noise (folder sea_lion for "sea lion")."""
    from PIL import Image

    rng = np.random.default_rng(3)
    for d, contrast in enumerate(contrasts):
        for c, name in enumerate(CLASSES):
            folder = root / f"domain{d}" / name.replace(" ", "_")
            folder.mkdir(parents=True)
            for i in range(3):
                pixels = rng.uniform(0, 255 * (1 - contrast), (36, 40, 3))
                pixels[..., c] += 255 * contrast
                Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{i}.png")
    return root


def test_the_student_is_judged_per_domain_and_after_few_shot_tuning(sets, tmp_path):
    train, held = sets
    run = tmp_path / "run"
    distill(load_run_config(None, _overrides(train, held, run), recipe="datafree"), log=lambda m: None)
    best = run / "best.safetensors"
    before = best.read_bytes()
    root = _tinted_domains(tmp_path / "domains")
    common = ("--checkpoint", str(best), "--device", "cpu", "--workers", "1", "--batch-size", "4")
    proc = _cli("eval", "--domains", str(root), *common, "--few-shot", "2", "--few-shot-epochs", "3",
                "--few-shot-lr", "0.01", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(report["models"]) == {"teacher", "student_distilled", "student_few_shot"}
    assert [d["name"] for d in report["datasets"]] == ["domain0", "domain1"]
    assert report["domains"]["few_shot"]["domain"] == "domain0"
    whole = TimmStudent(build_timm_backbone(STUDENT), 48, image_size=32)
    assert report["domains"]["few_shot"]["parameters"] == sum(p.numel() for p in whole.parameters())
    assert set(report["domains"]["few_shot"]["average_other_domains"]) >= {"student_distilled", "student_few_shot"}
    # each domain's figures are eval --data's on that folder alone
    for entry in report["datasets"]:
        alone = _cli("eval", "--data", str(root / entry["name"]), *common, cwd=tmp_path)
        assert alone.returncode == 0, alone.stderr
        single = json.loads(alone.stdout.strip().splitlines()[-1])["datasets"][0]["top1"]
        assert single == {k: v for k, v in entry["top1"].items() if k != "student_few_shot"}
    assert best.read_bytes() == before  # the tuning works on a copy


def test_a_teacher_cache_of_the_set_replays_the_live_teachers_run(sets, tmp_path):
    """cache-teacher on a synthetic set (its manifest's images, its teacher and names), then the run on it:
    the same losses as the live teacher's run (the cache stores features in half precision)."""
    from clipdistill.engine.training.teacher_cache import build_teacher_cache

    train, held = sets
    keys = [k for k in _overrides(train, held, tmp_path / "live", **{"train.epochs": 1}) if "heldout" not in k]
    summary = build_teacher_cache(load_run_config(None, keys, recipe="datafree"), views=1, out=tmp_path / "cache",
                                  log=lambda m: None, progress=False)
    assert summary["images"] == 12 and summary["complete"]
    distill(load_run_config(None, keys, recipe="datafree"), log=lambda m: None)
    cached = [*keys, f"teacher.cache={tmp_path / 'cache'}", f"train.out_dir={tmp_path / 'cached'}"]
    distill(load_run_config(None, cached, recipe="datafree"), log=lambda m: None)

    def losses(run):
        return [json.loads(x)["loss/kd"] for x in (run / "metrics.jsonl").read_text().splitlines()]

    assert losses(tmp_path / "cached") == pytest.approx(losses(tmp_path / "live"), rel=2e-3)


def test_print_config_shows_the_sets_teacher_and_reads_back(sets, tmp_path):
    train, held = sets
    proc = _cli("distill", "--recipe", "datafree", f"data.train={train}", "--print-config", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    (tmp_path / "run.yaml").write_text(proc.stdout)
    cfg = load_run_config(str(tmp_path / "run.yaml"))
    assert cfg.method == "datafree" and cfg.teacher.name == TINY_TEACHER and cfg.teacher.weights is None


def test_the_diversity_report_runs_on_the_sets(sets, tmp_path):
    train, held = sets
    out = tmp_path / "report" / "diversity.json"
    proc = _cli("datafree-report", str(train), str(held), "--out", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert set(result["sets"]) == {"contrastive/fourier", "mix/fourier"}
    for entry in result["sets"].values():
        assert set(entry["per_class"]) == set(CLASSES) and 0 <= entry["overall"] <= 2
    assert result["plot"] and Path(result["plot"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_run_with_another_teacher_resumes_with_it(sets, tmp_path):
    train, held = sets
    run = tmp_path / "run"
    keys = [k for k in _overrides(train, held, run, **{"train.epochs": 1}) if "heldout" not in k]
    logged: list[str] = []
    distill(load_run_config(None, [*keys, "teacher.name=clipdistill-tiny-student", "teacher.weights=null"],
                            recipe="datafree"), log=logged.append)
    assert any("WARNING: data.train was synthesized with teacher" in m for m in logged)
    resumed = [*keys, "train.epochs=2", "train.resume=true"]
    summary = distill(load_run_config(None, resumed, recipe="datafree"), log=lambda m: None)
    state = ckpt.load_checkpoint(summary["checkpoint"])
    assert state["step"] == 6
    assert (state["config"]["teacher"]["name"], state["config"]["teacher"]["weights"]) == ("clipdistill-tiny-student",
                                                                                          None)


def test_student_weights_that_do_not_fit_are_named_before_the_teacher_is_built(sets, tmp_path):
    from safetensors.torch import save_file

    train, held = sets
    misfit = tmp_path / "resnet.safetensors"
    save_file({k: v.contiguous() for k, v in build_timm_backbone("test_resnet").state_dict().items()}, str(misfit))
    out = tmp_path / "r"
    proc = _cli("distill", "--recipe", "datafree", *_overrides(train, held, out, **{"student.weights": str(misfit)}),
                cwd=tmp_path)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"clipdistill distill: error: student.weights: student.weights {str(misfit)!r} does "
                               f"not fit timm {STUDENT!r}")
    assert not (out / "class_vectors").exists()  # no teacher was built


def test_each_synthetic_set_keeps_its_own_saved_list(sets, tmp_path):
    from clipdistill.engine.training.sources import image_source

    train, held = sets
    lists = str(tmp_path / "lists")
    first = image_source(str(train), "data.train", lists=lists, resuming=True)
    second = image_source(str(held), "data.train", lists=lists, resuming=True)
    assert (len(first), len(second)) == (12, 6)
    assert len(image_source(str(train), "data.train", lists=lists, resuming=True)) == 12
