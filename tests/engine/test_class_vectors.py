"""Class vectors: template-averaged teacher text features, cached on disk and refused for other keys."""
from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F

from clipdistill.engine.models import TINY_TEACHER, Teacher
from clipdistill.engine.models.class_vectors import (ClassVectorKey, ClassVectorKeyMismatch, cached_class_vectors,
                                                     encode_class_names, load_class_vectors, save_class_vectors,
                                                     teacher_class_vectors)
from clipdistill.engine.templates import check_templates, templates_for

TEMPLATES = ("a photo of a {}.", "a sketch of a {}.", "{} in the wild.")


def test_class_vectors_are_normalized_template_means(teacher_clip, tokenizer, class_names):
    teacher = Teacher(teacher_clip)
    # batch_size 4 with 3 templates: one class per batch, and C = 5 does not divide evenly
    vectors = encode_class_names(teacher.encode_text, tokenizer, class_names, TEMPLATES, batch_size=4)
    assert vectors.shape == (5, 48) and vectors.dtype == torch.float32
    with torch.no_grad():
        reference = torch.stack([
            F.normalize(
                F.normalize(teacher_clip.encode_text(tokenizer([t.format(n) for t in TEMPLATES])).double(), dim=-1).mean(0),
                dim=-1,
            )
            for n in class_names
        ])
    assert torch.allclose(vectors.double(), reference, atol=1e-5)
    assert torch.isfinite(vectors).all()


def test_cache_miss_then_hit(tmp_path, class_names):
    key = ClassVectorKey.make(TINY_TEACHER, None, class_names, TEMPLATES)
    calls = []

    def compute(n=len(class_names)):
        calls.append(1)
        return F.normalize(torch.randn(n, 48), dim=-1)

    first, hit = cached_class_vectors(compute, key, cache_dir=tmp_path)
    assert not hit and len(calls) == 1
    second, hit = cached_class_vectors(compute, key, cache_dir=tmp_path)
    assert hit and len(calls) == 1
    assert torch.equal(first, second)
    stored = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert stored["names"] == class_names and stored["templates"] == list(TEMPLATES)
    assert stored["model"] == TINY_TEACHER and stored["weights"] is None
    # other names in the same directory: a different file, computed afresh
    _, hit = cached_class_vectors(lambda: compute(3), ClassVectorKey.make(TINY_TEACHER, None, class_names[:3], TEMPLATES),
                                  cache_dir=tmp_path)
    assert not hit and len(calls) == 2 and len(list(tmp_path.glob("*.safetensors"))) == 2


def test_cache_made_for_other_names_is_refused(tmp_path, class_names):
    path = tmp_path / "imagenet_vectors"
    key = ClassVectorKey.make(TINY_TEACHER, None, class_names, TEMPLATES)
    save_class_vectors(path, F.normalize(torch.randn(5, 48), dim=-1), key)
    other_names = ClassVectorKey.make(TINY_TEACHER, None, ["cat", "dog", "sea lion", "x-wing fighter", "tulip"], TEMPLATES)
    with pytest.raises(ClassVectorKeyMismatch, match=r"names\[1\].*'golden retriever'.*'dog'"):
        cached_class_vectors(lambda: pytest.fail("must not recompute over a refused cache"), other_names, path=path)
    with pytest.raises(ClassVectorKeyMismatch, match="names: cache has 5, wanted 2"):
        load_class_vectors(path, ClassVectorKey.make(TINY_TEACHER, None, class_names[:2], TEMPLATES))
    with pytest.raises(ClassVectorKeyMismatch, match="templates"):
        load_class_vectors(path, ClassVectorKey.make(TINY_TEACHER, None, class_names, TEMPLATES[:1]))
    with pytest.raises(ClassVectorKeyMismatch, match="model"):
        load_class_vectors(path, ClassVectorKey.make("ViT-B-32", None, class_names, TEMPLATES))
    with pytest.raises(FileNotFoundError):
        load_class_vectors(tmp_path / "absent", key)


def test_tensor_file_from_another_key_is_refused(tmp_path, class_names):
    a, b = tmp_path / "a", tmp_path / "b"
    key_a = ClassVectorKey.make(TINY_TEACHER, None, class_names, TEMPLATES)
    key_b = ClassVectorKey.make(TINY_TEACHER, "openai", class_names, TEMPLATES)
    save_class_vectors(a, torch.randn(5, 48), key_a)
    save_class_vectors(b, torch.randn(5, 48), key_b)
    os.replace(tmp_path / "b.safetensors", tmp_path / "a.safetensors")
    with pytest.raises(ClassVectorKeyMismatch, match="does not belong"):
        load_class_vectors(a, key_a)


def test_teacher_class_vectors_are_cached_per_weights_file(tmp_path, teacher_clip, tokenizer, class_names):
    weights = tmp_path / "teacher.pt"
    torch.save(teacher_clip.state_dict(), weights)
    teacher = Teacher(teacher_clip)
    kwargs = dict(model_name=TINY_TEACHER, weights=str(weights), cache_dir=tmp_path / "cache")
    first = teacher_class_vectors(teacher, tokenizer, class_names, TEMPLATES, **kwargs)
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 1
    again = teacher_class_vectors(teacher, tokenizer, class_names, TEMPLATES, **kwargs)
    assert torch.equal(first, again)
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 1
    # a rewritten checkpoint at the same path is other weights: a new cache entry
    torch.save(teacher_clip.state_dict(), weights)
    os.utime(weights, ns=(1, 1))
    teacher_class_vectors(teacher, tokenizer, class_names, TEMPLATES, **kwargs)
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 2
    # K selected names of a vocabulary: gather the cached vectors, encode nothing
    index = torch.tensor([4, 0])
    assert torch.equal(first[index], first.index_select(0, index))


def test_templates():
    assert templates_for("Oxford-Pets") == ("a photo of a {}, a type of pet.",)
    assert templates_for("dtd") == ("{} texture.",)
    ensemble = templates_for("imagenet_80")
    assert len(ensemble) == 80
    check_templates(ensemble)
    with pytest.raises(KeyError, match="known"):
        templates_for("mnist-of-doom")
    with pytest.raises(ValueError, match="exactly one"):
        check_templates(["a photo of a {} and a {}."])


def test_teacher_class_vectors_take_the_key_from_the_teacher(tmp_path, class_names):
    """A Teacher from build_teacher records its model name and weights: no need to repeat them."""
    from clipdistill.engine.models import build_teacher, get_tokenizer

    torch.manual_seed(0)
    teacher = build_teacher(TINY_TEACHER, None)
    tokenizer = get_tokenizer(TINY_TEACHER)
    vectors = teacher_class_vectors(teacher, tokenizer, class_names, ["a photo of a {}."], cache_dir=tmp_path)
    (cached,) = tmp_path.glob("*.json")
    assert json.loads(cached.read_text())["model"] == TINY_TEACHER
    again = teacher_class_vectors(teacher, tokenizer, class_names, ["a photo of a {}."], model_name=TINY_TEACHER,
                                  weights=None, cache_dir=tmp_path)  # the same key: the same file
    assert torch.equal(vectors, again) and len(list(tmp_path.glob("*.json"))) == 1
    with pytest.raises(ValueError, match="model_name= and weights="):
        teacher_class_vectors(teacher.model, tokenizer, class_names, ["a photo of a {}."], cache_dir=tmp_path)
