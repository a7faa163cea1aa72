"""Evaluation (engine/evaluation/evaluate.py, the eval command): labeled folders and their refusals, the eval
command on tiny models and generated images, and the held-out model-selection metric.

The metrics themselves (engine/distill/metrics.py) are tested in test_metrics.py."""
from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clipdistill.engine.distill.metrics import agreement_kl, harmonic_mean
from clipdistill.engine.evaluation.evaluate import (EvalInputError, heldout_agreement_kl, holdout_split, is_better,
                                                    scan_labeled_folder)

_spec = importlib.util.spec_from_file_location("_eval_data", Path(__file__).with_name("_eval_data.py"))
data = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(data)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return data.World(tmp_path_factory.mktemp("eval"))


run_cli = data.run_cli


# ------------------------------------------------------------------------------ model selection rule


def test_selection_rule_and_holdout_split(world):
    from clipdistill.loaders.sources import resolve_source

    assert is_better("kl", 0.1, 0.2) and not is_better("kl", 0.3, 0.2) and is_better("kl", 0.3, None)
    assert is_better("agreement", 60.0, 50.0) and not is_better("agreement", 40.0, 50.0)
    assert not is_better("kl", float("nan"), 0.2)
    with pytest.raises(ValueError, match="selection metric"):
        is_better("accuracy", 1.0, 0.0)
    samples = resolve_source(world.unlabeled, cache_dir=world.cache)
    train, heldout = holdout_split(samples, 0.3, seed=5)
    again_train, again_heldout = holdout_split(samples, 0.3, seed=5)
    assert len(heldout) == 2 and len(train) == 5
    assert heldout.paths == again_heldout.paths and train.paths == again_train.paths
    assert sorted(train.paths + heldout.paths) == sorted(samples.paths)
    assert train.paths == sorted(train.paths)  # original order kept
    with pytest.raises(ValueError, match="leaves none"):
        holdout_split(samples, 0.99)


# ------------------------------------------------------------------------------ labeled folders


def test_scan_labeled_folder_follows_the_names_file(world, tmp_path):
    folder = scan_labeled_folder(world.labeled, world.names)
    assert folder.class_names == data.CLASS_NAMES
    assert len(folder.samples) == 14
    for path, label in zip(folder.samples.paths, folder.labels):
        assert path.split("/")[0] == data.CLASS_NAMES[label].replace(" ", "_")
    # Another order of the names gives other labels (the names file is the label order) ...
    reordered = list(reversed(data.CLASS_NAMES))
    folder_r = scan_labeled_folder(world.labeled, reordered)
    assert folder_r.class_names == reordered
    assert dict(zip(folder_r.samples.paths, (reordered[i] for i in folder_r.labels))) == \
        dict(zip(folder.samples.paths, (data.CLASS_NAMES[i] for i in folder.labels)))
    # ... without names the folders, sorted, with underscores read as spaces.
    assert scan_labeled_folder(world.labeled).class_names == sorted(data.CLASS_NAMES)
    # folder<TAB>name lines map folders to other names.
    mapped = tmp_path / "mapped.txt"
    mapped.write_text("".join(f"{n.replace(' ', '_')}\tclass {i}\n" for i, n in enumerate(data.CLASS_NAMES)))
    assert scan_labeled_folder(world.labeled, mapped).class_names == [f"class {i}" for i in range(5)]


def test_refuses_an_empty_class(tmp_path):
    root = data.labeled_folder(tmp_path / "d", ["cat", "dog"], [2, 1], seed=0)
    (root / "empty_one").mkdir()
    with pytest.raises(EvalInputError, match=r"\['empty_one'\] hold no images"):
        scan_labeled_folder(root)
    with pytest.raises(EvalInputError, match="hold no images"):
        scan_labeled_folder(root, ["cat", "dog", "empty one"])


def test_refuses_class_names_that_do_not_match_the_folder(world):
    with pytest.raises(EvalInputError, match=r"class 'sea lions' has no folder 'sea lions' \(folder 'sea_lion'\?\)"):
        scan_labeled_folder(world.labeled, ["cat", "golden retriever", "sea lions", "x-wing fighter", "tulip"])
    with pytest.raises(EvalInputError, match="folder 'tulip' has no class name"):
        scan_labeled_folder(world.labeled, data.CLASS_NAMES[:4])
    # The eval command says the same and exits with 2.
    assert run_cli("eval", "--data", world.labeled, "--class-names", world.other_names, "--teacher",
                   data.TINY_TEACHER, "--device", "cpu") == 2


# ------------------------------------------------------------------------------ the eval command


def _direct_logits(world, learner, names, images):
    """Teacher, zero-shot student and distilled student logits computed by hand on the same tensors."""
    from clipdistill.engine.models import get_tokenizer
    from clipdistill.engine.models.class_vectors import encode_class_names

    templates = ["a photo of a {}."]
    teacher = world.teacher()
    vt = encode_class_names(teacher.encode_text, get_tokenizer(data.TINY_TEACHER), names, templates)
    clip = world.student_clip()
    vs = encode_class_names(clip.encode_text, get_tokenizer(data.TINY_STUDENT), names, templates)
    with torch.no_grad():
        teacher_logits = teacher.encode_image(images) @ vt.t()
        zero_shot = F.normalize(clip.encode_image(images), dim=-1) @ vs.t()
        distilled = learner(images).logits
    return {"teacher": teacher_logits, "student_zero_shot": zero_shot, "student_distilled": distilled}


def _accuracies(logits: torch.Tensor, labels: torch.Tensor) -> dict:
    m = math.ceil(logits.shape[1] / 2)
    base, novel = labels < m, labels >= m
    b = 100.0 * (logits[base, :m].argmax(-1) == labels[base]).double().mean().item()
    n = 100.0 * (logits[novel, m:].argmax(-1) + m == labels[novel]).double().mean().item()
    return {"top1": 100.0 * (logits.argmax(-1) == labels).double().mean().item(), "base": b, "novel": n}


def test_eval_numbers_equal_a_direct_computation(world, tmp_path, capsys):
    """Cross-dataset, base-to-novel and unlabeled agreement of all three models, through the CLI."""
    checkpoint, learner = world.distilled("coop", {"n_ctx": 4, "init_words": "a photo of a"}, out="eval_coop")
    out = tmp_path / "report.json"
    rc = run_cli("eval", "--data", world.labeled, "--class-names", world.names, "--data", world.labeled_other,
                 "--class-names", world.other_names, "--checkpoint", checkpoint, "--base-to-novel",
                 "--unlabeled", world.unlabeled, "--device", "cpu", "--workers", "1", "--batch-size", "4",
                 "--cache-dir", world.cache, "--out", out)
    assert rc == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[0].startswith("top-1 accuracy (%)") and "distilled student" in printed[0]
    assert any(line.startswith("average") for line in printed)
    report = json.loads(out.read_text())
    assert json.loads(printed[-1]) == report  # the table, then one line of JSON
    assert set(report["models"]) == {"teacher", "student_zero_shot", "student_distilled"}
    assert report["models"]["student_distilled"]["learner"] == "coop"

    from clipdistill.engine.evaluation.export import read_distilled
    from clipdistill.engine.evaluation.export import rebuild_learner as build_learner

    distilled = read_distilled(checkpoint)
    for entry, root, names in ((report["datasets"][0], world.labeled, data.CLASS_NAMES),
                               (report["datasets"][1], world.labeled_other, data.OTHER_NAMES)):
        folder = scan_labeled_folder(root, names)
        ids, images = data.loader_images(folder.samples)
        labels = torch.from_numpy(folder.labels)[ids]
        # The distilled student on another dataset: the same prompts before other names.
        names_learner = build_learner(distilled, world.student_clip(), class_names=names)
        for model, logits in _direct_logits(world, names_learner, names, images).items():
            expected = _accuracies(logits, labels)
            assert entry["top1"][model] == pytest.approx(expected["top1"], abs=1e-9), (entry["name"], model)
            b2n = entry["base_to_novel"][model]
            assert b2n["base"] == pytest.approx(expected["base"], abs=1e-9)
            assert b2n["novel"] == pytest.approx(expected["novel"], abs=1e-9)
            assert b2n["hm"] == pytest.approx(harmonic_mean(expected["base"], expected["novel"]), abs=1e-9)
        assert entry["base_to_novel"]["base_classes"] == names[: math.ceil(len(names) / 2)]
    for model in report["models"]:
        mean = np.mean([d["top1"][model] for d in report["datasets"]])
        assert report["cross_dataset"]["average"][model] == pytest.approx(mean)

    # Agreement and KL on unlabeled images; KDPL scores the teacher with the student's logit scale.
    from clipdistill.loaders.sources import resolve_source

    _, images = data.loader_images(resolve_source(world.unlabeled, cache_dir=world.cache))
    logits = _direct_logits(world, learner, data.CLASS_NAMES, images)
    scale = float(learner.logit_scale)
    assert report["models"]["teacher"]["logit_scale"] == pytest.approx(scale)
    for model in ("student_zero_shot", "student_distilled"):
        student_logits = logits[model] * (scale if model == "student_zero_shot" else 1.0)
        expected = agreement_kl(logits["teacher"] * scale, student_logits)
        assert report["unlabeled"][model]["agreement"] == pytest.approx(expected["agreement"])
        assert report["unlabeled"][model]["kl"] == pytest.approx(expected["kl"], rel=1e-5)
    assert report["unlabeled"]["images"] == 7


def test_eval_teacher_row_is_the_named_teacher_not_the_runs(world, tmp_path, capsys, monkeypatch):
    """--teacher-weights other than the run's: the teacher row scores that teacher, not the run's class vectors."""
    from clipdistill.engine.distill.metrics import agreement_kl
    from clipdistill.engine.models import build_teacher, get_tokenizer, load_clip
    from clipdistill.engine.models.class_vectors import encode_class_names
    from clipdistill.loaders.sources import resolve_source

    checkpoint, learner = world.distilled("coop", {"n_ctx": 4, "init_words": "a photo of a"}, out="eval_other")
    torch.manual_seed(5)
    other = data.save_weights(load_clip(data.TINY_TEACHER, None), tmp_path / "other_teacher.safetensors")
    common = ("eval", "--data", world.labeled, "--class-names", world.names, "--checkpoint", checkpoint,
              "--unlabeled", world.unlabeled, "--device", "cpu", "--workers", "1", "--batch-size", "4",
              "--cache-dir", tmp_path / "cache")
    assert run_cli(*common) == 0  # caches the run's teacher's class vectors
    capsys.readouterr()
    # The run's (stored) vectors stand in as unrelated ones: the other teacher's row must not read them.
    from clipdistill.engine.evaluation import evaluate as evaluate_module

    monkeypatch.setattr(evaluate_module, "distilled_teacher_vectors",
                        lambda *a, **k: F.normalize(torch.randn(len(data.CLASS_NAMES), 48), dim=-1))
    assert run_cli(*common, "--teacher-weights", other) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["models"]["teacher"]["weights"] == str(other)

    _, images = data.loader_images(resolve_source(world.unlabeled, cache_dir=world.cache))
    teacher = build_teacher(data.TINY_TEACHER, str(other))
    vt = encode_class_names(teacher.encode_text, get_tokenizer(data.TINY_TEACHER), data.CLASS_NAMES,
                            ["a photo of a {}."])
    scale = float(learner.logit_scale)
    with torch.no_grad():
        teacher_logits = teacher.encode_image(images) @ vt.t() * scale
    expected = agreement_kl(teacher_logits, learner(images).logits)
    assert report["unlabeled"]["student_distilled"]["kl"] == pytest.approx(expected["kl"], rel=1e-5)
    assert report["unlabeled"]["student_distilled"]["agreement"] == pytest.approx(expected["agreement"])


def test_eval_without_a_distilled_student(world, capsys):
    rc = run_cli("eval", "--data", world.labeled, "--teacher", data.TINY_TEACHER, "--teacher-weights",
                 world.teacher_weights, "--student", data.TINY_STUDENT, "--student-weights", world.student_weights,
                 "--device", "cpu", "--workers", "1", "--templates", "generic")
    assert rc == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(report["datasets"][0]["top1"]) == {"teacher", "student_zero_shot"}
    assert report["datasets"][0]["classes"] == 5 and "cross_dataset" not in report


def test_eval_refuses_promptkd_on_new_names_without_its_teacher(world, capsys):
    checkpoint, _ = world.distilled("promptkd", {"n_ctx": 2, "depth": 2}, out="eval_promptkd")
    rc = run_cli("eval", "--data", world.labeled_other, "--checkpoint", checkpoint, "--no-teacher",
                 "--device", "cpu", "--workers", "1")
    assert rc == 2
    assert "teacher's class vectors" in capsys.readouterr().err
    # With its teacher (recorded in the checkpoint), the same evaluation runs.
    rc = run_cli("eval", "--data", world.labeled_other, "--checkpoint", checkpoint, "--device", "cpu",
                 "--workers", "1")
    assert rc == 0


def test_eval_refuses_another_student_architecture(world, capsys):
    checkpoint, _ = world.distilled("vpt", {"n_tokens": 2, "depth": 2}, out="eval_vpt")
    rc = run_cli("eval", "--data", world.labeled, "--checkpoint", checkpoint, "--student", data.TINY_TEACHER,
                 "--device", "cpu", "--workers", "1")
    assert rc == 2
    err = capsys.readouterr().err
    assert data.TINY_STUDENT in err and data.TINY_TEACHER in err and "trained on student" in err


# ------------------------------------------------------------------------------ model selection


class _Batch:
    """The fields of a loader Batch that heldout_agreement_kl reads."""

    def __init__(self, images: dict, mask: torch.Tensor):
        self.images, self.mask = images, mask


@pytest.mark.parametrize("kind, options", [("coop", {"n_ctx": 4, "init_words": "a photo of a"}),
                                           ("promptkd", {"n_ctx": 2, "depth": 2})])
def test_heldout_agreement_kl_equals_direct_computation(world, kind, options):
    from clipdistill.engine.distill.step import DistillStep

    _, learner = world.distilled(kind, options, out=f"heldout_{kind}")
    teacher = world.teacher()
    vectors = world.teacher_vectors(data.CLASS_NAMES)
    recipe = "promptkd" if kind == "promptkd" else "kdpl"
    step = DistillStep(teacher, learner, vectors, recipe=recipe)
    step.train()
    state_before = {k: v.clone() for k, v in learner.state_to_save().items()}
    generator = torch.Generator().manual_seed(4)
    images = torch.randn(6, 3, 32, 32, generator=generator)
    mask = torch.tensor([True, True, False, True, True, False])  # padding rows are skipped
    batches = [_Batch({"student": images[:3]}, mask[:3]), images[3:5], (images[5:6], images[5:6])]

    got = heldout_agreement_kl(step, batches)

    assert step.training and learner.training  # its mode is given back
    for key, value in learner.state_to_save().items():  # batch-norm statistics untouched (eval mode)
        assert torch.equal(value, state_before[key]), key
    learner.eval()
    kept = images[[0, 1, 3, 4, 5]]
    with torch.no_grad():
        t = teacher.encode_image(kept).double() @ vectors.double().t()
        if kind == "promptkd":
            s = learner(kept, vectors).logits.double()
            t = t * float(teacher.logit_scale)
        else:
            s = learner(kept).logits.double()
            t = t * float(learner.logit_scale)
    pt, ps = F.softmax(t, -1), F.softmax(s, -1)
    assert got["images"] == 5
    assert got["kl"] == pytest.approx((pt * (pt.log() - ps.log())).sum(-1).mean().item(), rel=1e-4)
    assert got["agreement"] == pytest.approx(100.0 * (t.argmax(-1) == s.argmax(-1)).double().mean().item())
