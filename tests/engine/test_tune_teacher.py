"""clipdistill tune-teacher (PromptKD's first stage): shots, tuning, the file, the tuned teacher, refusals.

The accuracy test needs a teacher whose image features separate the classes but whose
zero-shot prompts with the target names do not: the tiny teacher is pretrained briefly,
CLIP-style, with captions that name the six shape classes with other words (the demo's
student vocabulary). Zero-shot with "a photo of a circle." is then at chance, and prompt
tuning on 16 shots per class has to find the classes. A random-init teacher is a poor
substrate: PromptSRC's published regularization pulls the prompts back towards its chance
predictions, and without it SGD escapes the initial plateau only erratically.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from clipdistill.engine.cli import main
from clipdistill.engine.commands.demo import (CLASSES, STUDENT_WORDS, make_dataset, pretrain_clip, render_image,
                                              to_tensor)
from clipdistill.engine.models import TINY_TEACHER, get_tokenizer, load_clip
from clipdistill.engine.models.tuned import (FORMAT, TunedTeacher, load_tuned_teacher, read_tuned_header,
                                             tuned_teacher_class_vectors)
from clipdistill.engine.prompts import build_learner
from clipdistill.engine.templates import templates_for
from clipdistill.engine.training.tune_teacher import (TuneSettings, TuneTeacherInputError, draw_shots,
                                                      labeled_accuracy, tune_teacher)

SIDE = 32  # the tiny teacher's input size
SMALL_PROMPTS = {"n_text_ctx": 4, "text_depth": 3, "n_vision_ctx": 4, "vision_depth": 3}  # 3-layer towers
FAST = dict(warmup_epochs=0, min_scale=0.5, backend="torch", workers=0)


def write_labeled(root: Path, counts: dict[str, int], seed: int) -> Path:
    """A labeled folder of generated shape images: ``counts`` maps a class of CLASSES to its image count."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for name, n in counts.items():
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(render_image(CLASSES.index(name), rng, side=SIDE)).save(folder / f"{i:03d}.png")
    return root


@pytest.fixture(scope="module", autouse=True)
def _one_thread():  # module scope: in force before the module-scoped tuning fixtures run
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the CI machine is shared; these models are tiny
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> dict:
    """16 training and 20 held-out images per class, and a teacher pretrained with other words."""
    root = tmp_path_factory.mktemp("tune_teacher")
    train = write_labeled(root / "train", {name: 16 for name in CLASSES}, seed=0)
    test = write_labeled(root / "test", {name: 20 for name in CLASSES}, seed=1)
    torch.manual_seed(0)
    clip = load_clip(TINY_TEACHER, None)
    images, labels = make_dataset(40, seed=5)
    from clipdistill.engine.io import image_spec as _image_preprocess

    size, mean, std = _image_preprocess(clip)
    pretrain_clip(clip, get_tokenizer(TINY_TEACHER), to_tensor(images, size, mean, std), torch.from_numpy(labels),
                  words=STUDENT_WORDS, steps=60, batch_size=32, lr=2e-3, seed=1)
    from safetensors.torch import save_file

    weights = root / "teacher.safetensors"
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(weights))
    return {"root": root, "train": train, "test": test, "weights": str(weights)}


@pytest.fixture(scope="module")
def tuned(shapes):
    """The teacher tuned on 16 shots per class (the published loss weights), evaluated before and after."""
    settings = TuneSettings(shots=16, seed=1, epochs=20, lr=0.05, batch_size=16, **FAST)
    result = tune_teacher(TINY_TEACHER, shapes["weights"], shapes["train"], out=shapes["root"] / "tuned.safetensors",
                          learner_options=SMALL_PROMPTS, settings=settings, device="cpu",
                          eval_data=shapes["test"], log=lambda m: None)
    return result


# ------------------------------------------------------------------------------ accuracy


def test_tuning_raises_held_out_accuracy_well_above_chance(tuned):
    # Observed (torch 2.x CPU): zero-shot 17-23 %, tuned 58-66 % on 120 held-out images; chance 16.7 %.
    before, after = tuned.eval["zero_shot_top1"], tuned.eval["tuned_top1"]
    assert before < 35.0, f"the pretrained-with-other-words teacher should be near chance zero-shot, got {before}"
    assert after >= 40.0 and after >= before + 20.0, (before, after)
    assert np.isfinite(list(tuned.losses.values())).all() and tuned.losses["ce"] < 1.6  # ln 6 = 1.79 at chance
    assert set(tuned.losses) == {"ce", "scl_image", "scl_text", "scl_logits", "loss"}


# ------------------------------------------------------------------------------ shots


def test_shots_are_drawn_per_class_with_the_seed(tmp_path):
    root = write_labeled(tmp_path / "data", {"circle": 9, "square": 7, "ring": 12}, seed=3)
    first = draw_shots(root, None, shots=4, seed=7)
    again = draw_shots(root, None, shots=4, seed=7)
    other = draw_shots(root, None, shots=4, seed=8)
    assert first.samples.paths == again.samples.paths
    assert first.samples.paths != other.samples.paths
    assert first.per_class == [4, 4, 4]
    assert first.class_names == ["circle", "ring", "square"]  # the sorted folder names
    assert np.array_equal(first.labels, np.repeat([0, 1, 2], 4))
    for label, name in enumerate(first.class_names):
        picked = [p for p, y in zip(first.samples.paths, first.labels) if y == label]
        assert all(p.startswith(f"{name}/") for p in picked) and len(set(picked)) == 4
    # A class's draw depends on the seed and its own folder only: removing another class changes nothing.
    for path in (root / "square").iterdir():
        path.unlink()
    (root / "square").rmdir()
    fewer = draw_shots(root, None, shots=4, seed=7)
    keep = [p for p in first.samples.paths if not p.startswith("square/")]
    assert fewer.samples.paths == keep


def test_short_classes_error_use_all_or_skip(tmp_path):
    root = write_labeled(tmp_path / "data", {"circle": 5, "square": 2, "ring": 5}, seed=4)
    with pytest.raises(TuneTeacherInputError, match=r"'square' has 2.*--on-short-class"):
        draw_shots(root, None, shots=4, seed=0)
    all_of_them = draw_shots(root, None, shots=4, seed=0, on_short_class="use-all")
    assert all_of_them.per_class == [4, 4, 2]  # circle, ring, square
    assert all_of_them.short == {"square": 2}
    skipped = draw_shots(root, None, shots=4, seed=0, on_short_class="skip")
    assert skipped.class_names == ["circle", "ring"] and skipped.skipped == ["square"]
    assert np.array_equal(skipped.labels, np.repeat([0, 1], 4))
    with pytest.raises(TuneTeacherInputError, match="leaves none"):
        draw_shots(root, None, shots=9, seed=0, on_short_class="skip")
    with pytest.raises(TuneTeacherInputError, match="at least 1"):
        draw_shots(root, None, shots=0, seed=0)
    with pytest.raises(TuneTeacherInputError, match="on_short_class"):
        draw_shots(root, None, shots=2, seed=0, on_short_class="drop")


def test_bad_labeled_folders_and_class_name_files_are_refused(tmp_path):
    root = write_labeled(tmp_path / "data", {"circle": 3, "square": 3}, seed=5)
    (root / "ring").mkdir()
    with pytest.raises(TuneTeacherInputError, match=r"'ring'.*hold no images"):
        draw_shots(root, None, shots=2, seed=0)
    (root / "ring").rmdir()

    names = tmp_path / "names.txt"
    names.write_text("circle\nsquare\ncircle\n")
    with pytest.raises(TuneTeacherInputError, match=r"line 3 repeats 'circle'"):
        draw_shots(root, names, shots=2, seed=0)
    names.write_text("circle\n\nsquare\n")
    with pytest.raises(TuneTeacherInputError, match=r"line 2 is empty"):
        draw_shots(root, names, shots=2, seed=0)
    names.write_text("circle\nsquares\n")
    with pytest.raises(TuneTeacherInputError, match=r"'squares'"):
        draw_shots(root, names, shots=2, seed=0)
    names.write_text("square\ncircle\n")  # label order follows the file
    assert draw_shots(root, names, shots=2, seed=0).class_names == ["square", "circle"]
    with pytest.raises(FileNotFoundError, match="class-name file"):
        draw_shots(root, tmp_path / "missing.txt", shots=2, seed=0)
    with pytest.raises(FileNotFoundError):
        draw_shots(tmp_path / "nowhere", None, shots=2, seed=0)


def test_bad_settings_are_refused_before_any_work(tmp_path):
    root = write_labeled(tmp_path / "data", {"circle": 2, "square": 2}, seed=6)
    run = dict(out=tmp_path / "t.safetensors", device="cpu", log=lambda m: None)
    with pytest.raises(TuneTeacherInputError, match=r"--depth 9.*3 layers"):
        tune_teacher(TINY_TEACHER, None, root, settings=TuneSettings(shots=2, epochs=1, **FAST), **run)
    with pytest.raises(TuneTeacherInputError, match=r"\.safetensors"):
        tune_teacher(TINY_TEACHER, None, root, **{**run, "out": tmp_path / "t.pt"})
    with pytest.raises(TuneTeacherInputError, match="warmup_epochs"):
        tune_teacher(TINY_TEACHER, None, root, settings=TuneSettings(epochs=1, warmup_epochs=1), **run)
    with pytest.raises(TuneTeacherInputError, match="unknown parts"):
        tune_teacher(TINY_TEACHER, None, root, settings=TuneSettings(loss_weights={"scl_txt": 1.0}), **run)
    assert not (tmp_path / "t.safetensors").exists()


# ------------------------------------------------------------------------------ the file and the tuned teacher


def test_save_load_round_trip_gives_identical_features(tuned, shapes):
    header = read_tuned_header(tuned.path)
    assert header["teacher"] == {"name": TINY_TEACHER, "weights": shapes["weights"], "init_seed": None,
                                 "weights_size": os.path.getsize(shapes["weights"])}
    assert header["learner"] == {"kind": "promptsrc", "options": {**SMALL_PROMPTS},
                                 "prompt_placement": "before_ln_pre"}
    assert header["frozen_templates"] == list(templates_for("imagenet_60"))  # PromptSRC's published target
    assert header["class_names"] == sorted(CLASSES) and header["templates"] == ["a photo of a {}."]
    assert header["shots"]["per_class"] == [16] * 6 and {"torch", "open_clip", "clipdistill"} <= set(header["versions"])

    loaded = load_tuned_teacher(tuned.path, device="cpu")
    in_memory = tuned.teacher
    images = torch.randn(5, 3, SIDE, SIDE)
    assert torch.equal(loaded.encode_image(images), in_memory.encode_image(images))
    assert torch.equal(loaded.class_vectors(), in_memory.class_vectors())
    saved, now = loaded.learner.state_to_save(), in_memory.learner.state_to_save()
    assert saved.keys() == now.keys() and all(torch.equal(saved[k], now[k]) for k in saved)


def test_gpa_mean_is_a_fraction_of_the_epochs_as_in_distill(tmp_path):
    """tune-teacher's gpa_mean is learner.gpa_mean's unit: 0.5 of 4 epochs centres the aggregation on epoch 2."""
    from clipdistill.engine.commands.tune_teacher import register

    parser = register(argparse.ArgumentParser().add_subparsers())
    assert parser.get_default("gpa_mean") == TuneSettings().gpa_mean == 0.75  # 15 of the published 20 epochs
    root = write_labeled(tmp_path / "data", {"circle": 2, "bar": 2}, seed=8)
    run = dict(out=tmp_path / "t.safetensors", learner_options=SMALL_PROMPTS, device="cpu", log=lambda m: None)
    with pytest.raises(TuneTeacherInputError, match=r"gpa_mean is a fraction.*got 15"):
        tune_teacher(TINY_TEACHER, None, root, settings=TuneSettings(shots=2, epochs=20, gpa_mean=15, **FAST), **run)
    result = tune_teacher(TINY_TEACHER, None, root,
                          settings=TuneSettings(shots=2, epochs=4, batch_size=4, gpa_mean=0.5, **FAST), **run)
    header = read_tuned_header(result.path)
    assert header["settings"]["gpa_mean"] == 0.5 and header["gpa_mean_epoch"] == 2.0


def test_random_init_teacher_round_trips_through_its_seed(tmp_path):
    root = write_labeled(tmp_path / "data", {"circle": 3, "bar": 3, "cross": 3}, seed=7)
    result = tune_teacher(TINY_TEACHER, None, root, out=tmp_path / "t.safetensors", learner_options=SMALL_PROMPTS,
                          settings=TuneSettings(shots=2, seed=5, epochs=2, batch_size=4, **FAST), device="cpu",
                          log=lambda m: None)
    rng_before = torch.get_rng_state()
    loaded = load_tuned_teacher(result.path, device="cpu")
    assert torch.equal(torch.get_rng_state(), rng_before)  # loading leaves the caller's RNG stream alone
    images = torch.randn(4, 3, SIDE, SIDE)
    assert torch.equal(loaded.encode_image(images), result.teacher.encode_image(images))
    assert torch.equal(loaded.class_vectors(), result.teacher.class_vectors())


def test_class_vectors_come_from_the_loaded_prompts_once(tuned, shapes):
    loaded = load_tuned_teacher(tuned.path, device="cpu")
    vectors = tuned_teacher_class_vectors(loaded, None)
    assert vectors.shape == (6, 48) and vectors.dtype == torch.float32
    assert torch.allclose(vectors.norm(dim=-1), torch.ones(6), atol=1e-5)
    assert tuned_teacher_class_vectors(loaded, loaded.class_names) is vectors  # cached, not recomputed

    # The same backbone and learner options, prompts NOT loaded (the mistake PromptKD's tracker reports),
    # and plain zero-shot vectors: both differ from the tuned ones.
    clip = load_clip(TINY_TEACHER, shapes["weights"])
    # Seeded: the untuned deep prompts are a random draw, and the global stream here depends on which
    # tests ran before; the bar was 0.05 with an unseeded draw, and one test order gave 0.044.
    torch.manual_seed(0)
    untuned = build_learner("promptsrc", clip, tokenizer=get_tokenizer(TINY_TEACHER),
                            class_names=loaded.class_names, **SMALL_PROMPTS)
    with torch.no_grad():
        before_loading = untuned.class_features().float()
        zero_shot = untuned.frozen.get(untuned.clip, None)
    # Observed max differences 0.040-0.049 over draws seeded 0-3 (0.049 and 0.056 with eeb4a4a's code
    # for seeds 0 and 1): the bar is half of the smallest.
    assert (vectors - before_loading).abs().max() > 0.02
    # PromptSRC's scl_text term keeps the tuned text features near the frozen ones (observed max
    # difference 0.03): they differ, but the tuning mostly moves the image side.
    assert (vectors - zero_shot).abs().max() > 0.01
    # Loading the saved prompts into that learner and only then encoding gives exactly what the teacher returns.
    from safetensors.torch import load_file

    untuned.load_saved_state({k[len("learner/"):]: v for k, v in load_file(tuned.path).items()})
    with torch.no_grad():
        assert torch.allclose(untuned.class_features().float(), vectors, atol=1e-6)

    # Other names: the shared learned context, in the order given.
    subset = ["ring", "circle"]
    assert torch.allclose(loaded.class_vectors(subset), vectors[[loaded.class_names.index(n) for n in subset]],
                          atol=1e-6)
    with pytest.raises(TypeError, match="learned text prompts"):
        loaded.encode_text(torch.zeros(1, 16, dtype=torch.long))


def test_tuned_teacher_is_frozen_and_serves_the_distill_step(tuned, student_clip):
    from clipdistill.engine.distill.step import DistillStep

    teacher = load_tuned_teacher(tuned.path, device="cpu")
    assert isinstance(teacher, TunedTeacher)
    assert not any(p.requires_grad for p in teacher.parameters())
    teacher.train()
    assert not teacher.training and not teacher.learner.training and not teacher.model.training
    assert teacher.logit_scale.dtype == torch.float32 and teacher.logit_scale.dim() == 0
    assert teacher.model.visual.output_dim == 48 and teacher.model.visual.image_size in (32, (32, 32))
    images = torch.randn(3, 3, SIDE, SIDE, requires_grad=True)
    features = teacher.encode_image(images)
    assert features.shape == (3, 48) and features.dtype == torch.float32 and not features.requires_grad
    assert torch.allclose(features.norm(dim=-1), torch.ones(3), atol=1e-5)

    student = build_learner("promptkd", student_clip, teacher_dim=48, n_ctx=2, depth=1, projector="ln_mlp")
    step = DistillStep(teacher, student, tuned_teacher_class_vectors(teacher), recipe="promptkd",
                       loss_backend="torch")
    parts = step(torch.randn(4, 3, SIDE, SIDE))
    parts["loss"].backward()
    assert torch.isfinite(parts["loss"])
    assert all(p.grad is not None for p in student.trainable_parameters().values())
    assert all(p.grad is None for p in teacher.parameters())


def test_non_tuned_files_are_refused(tmp_path, shapes):
    with pytest.raises(ValueError, match="not a tuned teacher"):
        load_tuned_teacher(shapes["weights"])
    with pytest.raises(FileNotFoundError):
        load_tuned_teacher(tmp_path / "missing.safetensors")
    (tmp_path / "garbage.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a readable"):
        read_tuned_header(tmp_path / "garbage.safetensors")


def test_labeled_accuracy_matches_the_tuning_report(tuned, shapes):
    teacher = load_tuned_teacher(tuned.path, device="cpu")
    assert labeled_accuracy(teacher, teacher.class_vectors(), shapes["test"]) == pytest.approx(tuned.eval["tuned_top1"])


# ------------------------------------------------------------------------------ command line


def _cli(argv: list[str]) -> int:
    return main(argv)


def test_cli_tunes_and_refuses_short_classes(tmp_path, capsys):
    root = write_labeled(tmp_path / "data", {"circle": 3, "triangle": 3, "bar": 1}, seed=8)
    names = tmp_path / "names.txt"
    names.write_text("circle\ntriangle\nbar\n")
    out = tmp_path / "tuned.safetensors"
    common = ["tune-teacher", "--teacher", TINY_TEACHER, "--data", str(root), "--class-names", str(names),
              "--shots", "2", "--epochs", "2", "--warmup-epochs", "0", "--batch-size", "4", "--depth", "3",
              "--device", "cpu", "--backend", "torch", "--workers", "0", "--out", str(out)]
    assert _cli(common) == 2
    err = capsys.readouterr().err
    assert "'bar' has 1" in err and "--on-short-class" in err and not out.exists()

    assert _cli(common + ["--on-short-class", "skip"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["class_names"] == ["circle", "triangle"] and summary["skipped"] == ["bar"]
    assert read_tuned_header(out)["class_names"] == ["circle", "triangle"]
    assert FORMAT == "clipdistill-tuned-teacher/1"


def test_promptkd_distills_from_the_tuned_teacher_end_to_end(tuned, shapes, tmp_path, forbid):
    """`promptkd` with teacher.prompts: class vectors from the loaded tuned prompts, never the cache."""
    import numpy as np

    from clipdistill.engine.config.run import load_run_config
    from clipdistill.engine.models.class_vectors import teacher_class_vectors
    from clipdistill.engine.training.builder import build_run
    from clipdistill.engine.training.trainer import Trainer

    forbid(teacher_class_vectors, "a tuned teacher's class vectors must not come from the class-vector cache")
    names = tmp_path / "classes.txt"
    names.write_text("\n".join(tuned.class_names) + "\n")
    config = {
        "recipe": "promptkd",
        "teacher": {"name": TINY_TEACHER, "weights": shapes["weights"], "prompts": tuned.path},
        "student": {"name": "clipdistill-tiny-student", "weights": None},
        "learner": {"kind": "promptkd", "options": {"n_ctx": 2, "depth": 2}},
        "data": {"train": str(shapes["test"]), "class_names": str(names), "batch_size": 8, "backend": "torch",
                 "workers": 0},
        "train": {"max_steps": 3, "device": "cpu", "out_dir": str(tmp_path / "run"), "progress": False,
                  "log_every": 1},
    }
    run = build_run(load_run_config(config), log=lambda m: None)
    expected = load_tuned_teacher(tuned.path, device="cpu")
    assert torch.allclose(run.step.teacher_class_vectors,
                          tuned_teacher_class_vectors(expected, tuned.class_names), atol=1e-6)
    summary = Trainer(run, log=lambda m: None).fit()
    assert summary["step"] == 3 and np.isfinite(summary["loss/kd"])
    with pytest.raises(Exception, match="were tuned on"):
        build_run(load_run_config(config, ["teacher.name=clipdistill-tiny-student"]), log=lambda m: None)
