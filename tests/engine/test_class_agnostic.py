"""KDPL's class-agnostic variant: per-batch top-K selection over a vocabulary (tiny models, CPU)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clipdistill.engine.models.class_vectors import encode_class_names
from clipdistill.engine.config import ConfigError
from clipdistill.engine.models import build_student, build_teacher, get_tokenizer
from clipdistill.engine.prompts import build_learner
from clipdistill.engine.distill.step import DistillStep
from clipdistill.engine.io import read_class_names

VOCAB = read_class_names("builtin:imagenet21k")[:40]


@pytest.fixture(scope="module")
def parts():
    torch.manual_seed(0)
    teacher = build_teacher("clipdistill-tiny-teacher", None)
    vectors = encode_class_names(teacher.encode_text, get_tokenizer("clipdistill-tiny-teacher"), VOCAB,
                                 ["a photo of a {}."])
    return teacher, vectors


def _step(parts, kind="coop", k=5, **options):
    teacher, vectors = parts
    learner = build_learner(kind, build_student("clipdistill-tiny-student", None),
                            tokenizer=get_tokenizer("clipdistill-tiny-student"), class_names=VOCAB,
                            **(options or {"n_ctx": 2}))
    return DistillStep(teacher, learner, vectors, recipe="kdpl", top_k=k)


def _reference_topk(step, teacher_features, weights, k):
    logits = step.student_logit_scale * F.normalize(teacher_features.double(), dim=-1) \
        @ step.teacher_class_vectors.double().t()
    probs = logits.softmax(-1).numpy()
    w = np.ones(len(probs)) if weights is None else weights.double().numpy()
    mean = (w[:, None] * probs).sum(0) / w.sum()
    order = sorted(range(len(mean)), key=lambda i: (-mean[i], i))
    return order[:k]


@pytest.mark.parametrize("batch", [1, 6])
def test_topk_matches_a_reference_from_the_same_logits(parts, batch):
    step = _step(parts, k=7)
    torch.manual_seed(batch)
    features = step.teacher.encode_image(torch.randn(batch, 3, 32, 32))
    weights = None if batch == 1 else torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 1.0])
    got = step.select_classes(features, weights)
    assert got.dtype == torch.int64 and got.shape == (7,)
    assert got.tolist() == _reference_topk(step, features, weights, 7)


def test_padded_rows_do_not_vote(parts):
    step = _step(parts, k=3)
    torch.manual_seed(3)
    features = step.teacher.encode_image(torch.randn(4, 3, 32, 32))
    with_padding = step.select_classes(torch.cat([features, torch.randn(2, features.shape[1]) * 50]),
                                       torch.tensor([1.0, 1, 1, 1, 0, 0]))
    assert with_padding.tolist() == step.select_classes(features).tolist()


def test_ties_resolve_to_the_lower_index_every_time(parts):
    teacher, vectors = parts
    tied = vectors.clone()
    tied[10] = tied[3]  # two vocabulary entries with identical vectors: identical probabilities
    tied[25] = tied[3]
    step = DistillStep(teacher, _step(parts).student, tied, recipe="kdpl", top_k=len(VOCAB))
    features = F.normalize(tied[3:4].clone(), dim=-1)  # an image exactly at the tied vector
    first = step.select_classes(features).tolist()
    assert first[:3] == [3, 10, 25]
    for _ in range(3):
        assert step.select_classes(features).tolist() == first


TOPK_WORKER = r'''
import json, os, sys
import torch
from clipdistill.engine.models.class_vectors import encode_class_names
from clipdistill.engine.models import build_student, build_teacher, get_tokenizer
from clipdistill.engine.prompts import build_learner
from clipdistill.engine.distill.step import DistillStep
torch.distributed.init_process_group("gloo", init_method="env://")
rank = torch.distributed.get_rank()
case = json.load(open(sys.argv[1]))
torch.manual_seed(0)
teacher = build_teacher("clipdistill-tiny-teacher", None)
vocab = case["vocab"]
vectors = encode_class_names(teacher.encode_text, get_tokenizer("clipdistill-tiny-teacher"), vocab,
                             ["a photo of a {}."])
learner = build_learner("coop", build_student("clipdistill-tiny-student", None),
                        tokenizer=get_tokenizer("clipdistill-tiny-student"), class_names=vocab, n_ctx=2)
step = DistillStep(teacher, learner, vectors, recipe="kdpl", top_k=case["k"])
features = torch.tensor(case["features"][rank])
weights = torch.tensor(case["weights"][rank])
json.dump(step.select_classes(features, weights).tolist(), open(os.path.join(sys.argv[2], f"rank{rank}.json"), "w"))
torch.distributed.barrier()  # then destroy: see _gloo.py
torch.distributed.destroy_process_group()
'''


def test_two_ranks_pick_the_same_classes_as_one_process(parts, tmp_path):
    """Each rank votes with its own rows (rank 1 holds padding); the all-reduced choice is the same
    on both ranks and equals one process's choice over the whole batch."""
    import importlib.util
    import json
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("_gloo", Path(__file__).with_name("_gloo.py"))
    gloo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gloo)

    step = _step(parts, k=6)
    torch.manual_seed(11)
    features = step.teacher.encode_image(torch.randn(8, 3, 32, 32))
    weights = torch.tensor([1.0, 1, 1, 1, 1, 0, 0, 0])
    case = tmp_path / "case.json"
    case.write_text(json.dumps({"vocab": VOCAB, "k": 6, "features": [features[:4].tolist(), features[4:].tolist()],
                                "weights": [weights[:4].tolist(), weights[4:].tolist()]}))
    gloo.run_ranks(TOPK_WORKER, [str(case), str(tmp_path)], tmp_path)
    chosen = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    want = step.select_classes(features, weights).tolist()
    assert chosen[0] == chosen[1] == want
    # Rank 0's rows alone choose differently: the other rank's vote counts.
    assert step.select_classes(features[:4]).tolist() != want or \
        step.select_classes(features[4:5]).tolist() != want


def test_student_encodes_exactly_k_names(parts, monkeypatch):
    from clipdistill.engine.models import towers

    step = _step(parts, k=5)
    seen = []
    real_encode = towers.TextTower.encode

    def spy(self, embedded, tokens, *args, **kwargs):
        seen.append(tokens.shape[0])
        return real_encode(self, embedded, tokens, *args, **kwargs)

    monkeypatch.setattr(towers.TextTower, "encode", spy)
    images = torch.randn(3, 3, 32, 32)
    out = step(images, images)
    out["loss"].backward()
    assert seen == [5]
    assert step.last_selection.shape == (5,)
    assert step.student.prompts.ctx.grad is not None


def test_loss_runs_over_the_k_columns_renormalized(parts):
    step = _step(parts, k=4)
    torch.manual_seed(5)
    images = torch.randn(3, 3, 32, 32)
    loss = step(images, images)["kd"]
    idx = step.last_selection
    with torch.no_grad():
        scale = step.student_logit_scale
        t = scale * F.normalize(step.teacher.encode_image(images), dim=-1) @ step.teacher_class_vectors[idx].t()
        s = scale * F.normalize(step.student.encode_image(images), dim=-1) @ step.student.class_features(idx).t()
        lt, ls = F.log_softmax(t.double(), -1), F.log_softmax(s.double(), -1)
        expected = (0.5 * (lt.exp() * (lt - ls)).sum(-1) + 0.5 * (ls.exp() * (ls - lt)).sum(-1)).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("kind,options", [("vpt", {"n_tokens": 2, "depth": 1}),
                                          ("cocoop", {"n_ctx": 2}),
                                          ("promptsrc", {"n_text_ctx": 2, "text_depth": 1,
                                                         "n_vision_ctx": 2, "vision_depth": 1})])
def test_other_learners_take_the_selection(parts, kind, options):
    step = _step(parts, kind=kind, k=4, **options)
    images = torch.randn(2, 3, 32, 32)
    out = step(images, images)
    out["loss"].backward()
    assert torch.isfinite(out["loss"])
    assert all(p.grad is not None for p in step.trainable_parameters().values())


def test_bad_k_is_refused(parts):
    teacher, vectors = parts
    with pytest.raises(ValueError, match=r"top_k=41 must be between 1 and the vocabulary size 40"):
        DistillStep(teacher, _step(parts).student, vectors, recipe="kdpl", top_k=41)


def test_kdpl_ca_recipe_end_to_end_and_vocabulary_too_small(tmp_path):
    from PIL import Image

    from clipdistill.engine.commands.demo import render_image
    from clipdistill.engine.config.run import load_run_config
    from clipdistill.engine.training.builder import build_run
    from clipdistill.engine.training.trainer import Trainer

    rng = np.random.default_rng(0)
    (tmp_path / "images").mkdir()
    for i in range(6):
        Image.fromarray(render_image(i % 6, rng, side=40)).save(tmp_path / "images" / f"{i}.jpg")
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(VOCAB) + "\n")
    config = {
        "recipe": "kdpl-ca",
        "teacher": {"name": "clipdistill-tiny-teacher", "weights": None},
        "student": {"name": "clipdistill-tiny-student", "weights": None},
        "learner": {"kind": "coop", "options": {"n_ctx": 2, "init_words": None}},
        "data": {"train": str(tmp_path / "images"), "class_names": str(vocab), "batch_size": 1,
                 "backend": "torch", "workers": 0},
        "loss": {"top_k": 5},
        "train": {"max_steps": 3, "device": "cpu", "out_dir": str(tmp_path / "run"), "progress": False,
                  "log_every": 1},
    }
    cfg = load_run_config(config)
    assert cfg.method == "kdpl" and cfg.loss.top_k == 5
    run = build_run(cfg, log=lambda m: None)
    summary = Trainer(run, log=lambda m: None).fit()
    assert summary["step"] == 3 and np.isfinite(summary["loss/kd"])
    assert run.step.last_selection.shape == (5,)
    with pytest.raises(ConfigError, match=r"loss\.top_k=1000 exceeds the 40 names"):
        build_run(load_run_config(config, ["loss.top_k=1000"]), log=lambda m: None)


def test_shipped_vocabulary_is_what_the_builder_makes():
    from clipdistill.engine.vocabulary import build_vocabulary

    pytest.importorskip("timm")
    assert build_vocabulary() == read_class_names("builtin:imagenet21k")
