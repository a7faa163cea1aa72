"""Loading teachers and students: configs, local checkpoints, clear errors, the frozen teacher."""
from __future__ import annotations


import pytest
import torch

from clipdistill.engine import models
from clipdistill.engine.models import Teacher, build_student, build_teacher, load_clip

from clipdistill.engine.models import TINY_STUDENT as STUDENT
from clipdistill.engine.models import TINY_TEACHER as TEACHER


def test_shipped_configs_are_registered_with_open_clip():
    assert {STUDENT, TEACHER} <= set(models.shipped_model_names())
    assert {STUDENT, TEACHER} <= set(models.list_model_names())
    assert models.import_open_clip() is models.import_open_clip()


def test_tiny_models_are_small(_student_clip, _teacher_clip):
    for model in (_student_clip, _teacher_clip):
        assert sum(p.numel() for p in model.parameters()) < 8_000_000
    assert _student_clip.visual.output_dim == 32 and _teacher_clip.visual.output_dim == 48


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def test_load_local_safetensors(tmp_path, student_clip):
    from safetensors.torch import save_file

    path = tmp_path / "student.safetensors"
    save_file({k: v.contiguous() for k, v in student_clip.state_dict().items()}, str(path))
    loaded = load_clip(STUDENT, str(path))
    _assert_same_weights(student_clip, loaded)
    images = torch.randn(2, 3, 32, 32)
    assert torch.equal(loaded.encode_image(images), student_clip.encode_image(images))


def test_load_local_pt_with_weights_only(tmp_path, student_clip):
    path = tmp_path / "student.pt"
    torch.save({"state_dict": student_clip.state_dict()}, path)
    _assert_same_weights(student_clip, load_clip(STUDENT, str(path)))


class _NotATensor:
    pass


def test_pt_with_python_objects_is_refused(tmp_path, student_clip):
    path = tmp_path / "pickled.pt"
    torch.save({"state_dict": student_clip.state_dict(), "extra": _NotATensor()}, path)
    with pytest.raises(RuntimeError, match="weights_only"):
        load_clip(STUDENT, str(path))


def test_checkpoint_of_another_architecture_is_refused(tmp_path, teacher_clip):
    path = tmp_path / "teacher.pt"
    torch.save(teacher_clip.state_dict(), path)
    with pytest.raises(RuntimeError, match="does not fit model"):
        load_clip(STUDENT, str(path))


def test_missing_checkpoint_file_says_what_to_do(tmp_path):
    missing = tmp_path / "nowhere" / "student.safetensors"
    with pytest.raises(FileNotFoundError, match="does not exist") as info:
        load_clip(STUDENT, str(missing))
    assert str(missing) in str(info.value) and "weights=None" in str(info.value)


def test_unknown_model_name_suggests_close_names():
    with pytest.raises(ValueError, match="unknown model name") as info:
        load_clip("clipdistill-tiny-studnet")
    assert STUDENT in str(info.value) and "add_model_config" in str(info.value)


def test_unknown_tag_lists_known_tags():
    with pytest.raises(ValueError, match="neither a checkpoint file nor a pretrained tag") as info:
        load_clip("ViT-B-32", "no-such-tag")
    assert "openai" in str(info.value)


def test_missing_weights_offline_says_what_to_do(monkeypatch):
    open_clip = models.import_open_clip()

    def offline(*args, **kwargs):
        raise OSError("cannot find the requested files in the local cache")

    # The real call retries for about a minute without network; fail at once instead.
    monkeypatch.setattr(open_clip.factory, "download_pretrained", offline)
    with pytest.raises(RuntimeError, match="could not be downloaded") as info:
        load_clip("ViT-B-32", "openai")
    assert "local path" in str(info.value)


def test_teacher_is_frozen_and_stays_in_eval(teacher_clip, images):
    teacher = Teacher(teacher_clip)
    assert all(not p.requires_grad for p in teacher.parameters())
    teacher.train()
    assert not teacher.training and not any(m.training for m in teacher.modules())
    with torch.enable_grad():
        features = teacher.encode_image(images)
    assert not features.requires_grad and features.dtype == torch.float32
    assert torch.allclose(features.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert torch.allclose(features, torch.nn.functional.normalize(teacher_clip.encode_image(images), dim=-1))
    class_vectors = torch.nn.functional.normalize(torch.randn(5, 48), dim=-1)
    logits = teacher.logits(images, class_vectors, logit_scale=100.0)
    assert logits.shape == (3, 5) and not logits.requires_grad


def test_build_teacher_and_student_on_cpu():
    teacher = build_teacher(TEACHER, None)
    assert isinstance(teacher, Teacher) and teacher.model.visual.conv1.weight.dtype == torch.float32
    student = build_student(STUDENT, None)
    assert all(not p.requires_grad for p in student.parameters())


@pytest.mark.gpu
def test_teacher_runs_bf16_on_gpu(cuda_device):
    teacher = build_teacher(TEACHER, None, device=cuda_device)
    assert teacher.input_dtype == torch.bfloat16
    features = teacher.encode_image(torch.randn(2, 3, 32, 32, device=cuda_device))
    assert features.dtype == torch.float32 and torch.isfinite(features).all()
