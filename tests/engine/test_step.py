"""One distillation step (engine/distill/step.py): the KDPL loss against a direct computation, refusals,
the embedding API from hand-written and compiled loops, and the explicit-logits symmetric KL."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from clipdistill.engine.config.run import load_run_config
from clipdistill.engine.distill.step import DistillStep, symmetric_kl_from_logits
from clipdistill.engine.training.builder import build_run

CLASSES = ["circle", "square", "triangle", "cross", "ring"]


def test_kdpl_loss_matches_a_direct_computation(shape_data, tiny_run_config, tmp_path):
    """One step's KDPL loss equals 0.5 KL(t||s) + 0.5 KL(s||t) computed by hand from the models."""
    cfg = load_run_config(tiny_run_config(shape_data, tmp_path))
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


def test_teacher_class_vectors_of_another_dimension_are_refused(shape_data, tiny_run_config, tmp_path):
    run = build_run(load_run_config(tiny_run_config(shape_data, tmp_path)), log=lambda m: None)
    with pytest.raises(ValueError, match=r"dimension 7 but the teacher's image features have 48"):
        DistillStep(run.teacher, run.learner, torch.randn(5, 7))
    with pytest.raises(ValueError, match=r"recipe 'promptkd' needs a student scored against the teacher's class vectors .*, got CoOp"):
        DistillStep(run.teacher, run.learner, run.step.teacher_class_vectors, recipe="promptkd")


# ------------------------------------------------------------------------------ embedding API


def _embedding_parts():
    from clipdistill.engine.models import build_student, build_teacher, get_tokenizer
    from clipdistill.engine.models.class_vectors import encode_class_names
    from clipdistill.engine.prompts import build_learner

    torch.manual_seed(0)
    teacher = build_teacher("clipdistill-tiny-teacher", None)
    vectors = encode_class_names(teacher.encode_text, get_tokenizer("clipdistill-tiny-teacher"), CLASSES,
                                 ["a photo of a {}."])
    learner = build_learner("coop", build_student("clipdistill-tiny-student", None),
                            tokenizer=get_tokenizer("clipdistill-tiny-student"), class_names=CLASSES, n_ctx=2)
    return DistillStep(teacher, learner, vectors, recipe="kdpl")


def test_embedding_api_from_a_hand_written_loop():
    step = _embedding_parts()
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
    fresh = _embedding_parts()
    fresh.load_saved_state(state)
    assert fresh(images, images)["loss"].item() == pytest.approx(step(images, images)["loss"].item(), rel=1e-6)


def test_embedding_api_from_a_compiled_loop():
    step = _embedding_parts()
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


# ------------------------------------------------------------------------------ explicit-logits KL


def _reference_kl(student, teacher, forward, reverse, temperature, weights):
    """forward KL(t||s) + reverse KL(s||t) per row in float64, then the (weighted) mean."""
    ls = F.log_softmax(student.double() / temperature, -1)
    lt = F.log_softmax(teacher.double() / temperature, -1)
    rows = forward * (lt.exp() * (lt - ls)).sum(-1) + reverse * (ls.exp() * (ls - lt)).sum(-1)
    return rows.mean() if weights is None else (weights.double() * rows).sum() / weights.double().sum()


@pytest.mark.parametrize("forward, reverse, temperature", [(0.5, 0.5, 1.0), (1.0, 0.0, 2.0), (0.0, 1.0, 0.5)])
@pytest.mark.parametrize("weighted", [False, True])
def test_symmetric_kl_from_logits_equals_float64_reference(forward, reverse, temperature, weighted):
    generator = torch.Generator().manual_seed(7)
    student = torch.randn(6, 5, generator=generator) * 3
    teacher = torch.randn(6, 5, generator=generator) * 3
    weights = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 1.0]) if weighted else None
    got = symmetric_kl_from_logits(student, teacher, forward_weight=forward, reverse_weight=reverse,
                                   temperature=temperature, row_weights=weights)
    expected = _reference_kl(student, teacher, forward, reverse, temperature, weights)
    assert got.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-7)
    assert symmetric_kl_from_logits(teacher.clone(), teacher).abs().item() < 1e-6


def test_symmetric_kl_from_logits_passes_gradients_to_the_student_only():
    generator = torch.Generator().manual_seed(8)
    student = (torch.randn(4, 3, generator=generator) * 2).requires_grad_()
    teacher = (torch.randn(4, 3, generator=generator) * 2).requires_grad_()
    symmetric_kl_from_logits(student, teacher).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None


# ------------------------------------------------------------------------------ state_dict


def test_state_dict_holds_the_learner_only_and_loads_strictly():
    """What a trainer embedding the step checkpoints (Lightning, HF): the prompts, not the frozen models."""
    step = _embedding_parts()
    state = step.state_dict()
    assert set(state) == {f"student.{key}" for key in step.state_to_save()} == {"student.prompts.ctx"}
    assert set(step.state_dict(None, "p.")) == {"p.student.prompts.ctx"}  # nn.Module's positional form
    with torch.no_grad():
        step.student.prompts.ctx.add_(1.0)
    fresh = _embedding_parts()
    fresh.load_state_dict(step.state_dict())  # strict: the teacher and the backbone are not missing
    assert torch.equal(fresh.student.prompts.ctx, step.student.prompts.ctx)

    holder = torch.nn.ModuleDict({"step": step, "head": torch.nn.Linear(2, 2)})  # a trainer's module
    assert set(holder.state_dict()) == {"step.student.prompts.ctx", "head.weight", "head.bias"}
    other = torch.nn.ModuleDict({"step": _embedding_parts(), "head": torch.nn.Linear(2, 2)})
    other.load_state_dict(holder.state_dict())
    assert torch.equal(other["step"].student.prompts.ctx, step.student.prompts.ctx)

    full = torch.nn.Module.state_dict(step)  # an older checkpoint, saved with the frozen parts
    assert any(key.startswith("teacher.") for key in full) and any(key.startswith("student.clip.") for key in full)
    _embedding_parts().load_state_dict(full)
    with pytest.raises(RuntimeError, match=r'Unexpected key\(s\) in state_dict: "student.bogus"'):
        fresh.load_state_dict({**step.state_dict(), "student.bogus": torch.zeros(1)})
    with pytest.raises(RuntimeError, match=r'Missing key\(s\) in state_dict: "student.prompts.ctx"'):
        fresh.load_state_dict({})


def test_a_projector_converted_to_sync_batch_norm_is_refused_naming_synchronize():
    """Lightning's sync_batchnorm=True runs convert_sync_batchnorm: PromptKD's projector says what to do instead."""
    from clipdistill.engine.models import build_student, build_teacher, get_tokenizer
    from clipdistill.engine.models.class_vectors import encode_class_names
    from clipdistill.engine.parallel.batchnorm import synchronize
    from clipdistill.engine.prompts import build_learner

    def promptkd_step() -> DistillStep:
        torch.manual_seed(0)
        teacher = build_teacher("clipdistill-tiny-teacher", None)
        vectors = encode_class_names(teacher.encode_text, get_tokenizer("clipdistill-tiny-teacher"), CLASSES,
                                     ["a photo of a {}."])
        learner = build_learner("promptkd", build_student("clipdistill-tiny-student", None),
                                teacher_dim=vectors.shape[1], depth=1)
        return DistillStep(teacher, learner, vectors, recipe="promptkd")

    images = torch.randn(4, 3, 32, 32)
    converted = torch.nn.SyncBatchNorm.convert_sync_batchnorm(promptkd_step())
    with pytest.raises(TypeError, match=r"SyncBatchNorm.*call clipdistill\.engine\.parallel\.batchnorm\.synchronize"):
        converted(images)
    assert torch.isfinite(synchronize(promptkd_step())(images)["loss"])  # the way it names works (one process)
