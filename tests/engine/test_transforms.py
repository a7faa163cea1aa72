"""The public input transforms (engine/transforms.py) render exactly what the engine's loader does."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from clipdistill.engine.io import image_spec
from clipdistill.engine.transforms import ImageTransform, PairedViews, student_transform, teacher_transform
from clipdistill.loaders import CenterCrop, ImageLoader, OutputSpec, RandomResizedCrop


@pytest.fixture
def picture(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, size=(37, 53, 3), dtype=np.uint8)  # odd, not square
    path = tmp_path / "images" / "a.png"
    path.parent.mkdir()
    Image.fromarray(pixels).save(path)
    return path


@pytest.mark.parametrize("view", [CenterCrop(), CenterCrop(0.875), RandomResizedCrop()], ids=repr)
def test_transform_equals_the_loaders_rendering(picture, view):
    transform = ImageTransform(24, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3), crop_fraction=getattr(view, "crop_fraction", 1.0))
    loader = ImageLoader(picture.parent, global_batch_size=1, transform=view, backend="torch", workers=0, seed=3,
                         interpolation="bicubic", outputs=(OutputSpec("x", 24, transform.mean, transform.std),))
    batch = next(iter(loader))
    with Image.open(picture) as image:
        if isinstance(view, CenterCrop):
            mine = transform(image)
        else:
            mine = transform(image, tuple(int(v) for v in batch.crops[0]), bool(batch.flips[0]))
    assert mine.shape == (3, 24, 24) and mine.dtype == torch.float32
    torch.testing.assert_close(mine, batch.images["x"][0], rtol=0, atol=1e-6)


def test_transform_renders_16_bit_pixels_as_the_loaders_do(tmp_path):
    """Reproduction: image.convert("RGB") clipped a 16-bit grey PNG to white; the loaders scale it by 1/257."""
    path = tmp_path / "images" / "deep.png"
    path.parent.mkdir()
    Image.fromarray(np.random.default_rng(1).integers(0, 65536, size=(29, 41), dtype=np.uint16)).save(path)
    transform = ImageTransform(16, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    loader = ImageLoader(path.parent, global_batch_size=1, transform=CenterCrop(), backend="torch", workers=0,
                         interpolation="bicubic", outputs=(OutputSpec("x", 16, transform.mean, transform.std),))
    with Image.open(path) as image:
        assert image.mode.startswith("I;16")
        mine = transform(image)
    torch.testing.assert_close(mine, next(iter(loader)).images["x"][0], rtol=0, atol=1e-6)
    assert mine.max() < 1.9  # white is (1 - 0.5) / 0.25 = 2 everywhere


def test_teacher_and_student_transforms_read_each_models_input(teacher_clip, student_clip):
    from clipdistill.engine.models import TINY_STUDENT, Teacher, get_tokenizer
    from clipdistill.engine.prompts import CoOp

    teacher, learner = Teacher(teacher_clip), CoOp(student_clip, get_tokenizer(TINY_STUDENT), ["a", "b"])
    assert (teacher_transform(teacher).size, teacher_transform(teacher).mean) == image_spec(teacher_clip)[:2]
    assert (student_transform(learner).size, student_transform(learner).std) == image_spec(student_clip)[::2]
    assert student_transform(student_clip) == student_transform(learner)
    with pytest.raises(TypeError, match="not a CLIP model"):
        teacher_transform(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="interpolation"):
        teacher_transform(teacher, interpolation="nearest")


def test_paired_views_show_both_models_one_view(picture):
    big, small = ImageTransform(32, (0.5,) * 3, (0.25,) * 3), ImageTransform(16, (0.5,) * 3, (0.25,) * 3)
    views = PairedViews(big, small)
    with Image.open(picture) as image:
        image = image.convert("RGB")
        torch.manual_seed(0)
        first = views(image)
        torch.manual_seed(0)
        again = views(image)
        other = views(image)
        # the small view of the same crop: the big one downsampled, to within resampling differences
        down = torch.nn.functional.interpolate(first[0][None], size=16, mode="area", antialias=False)[0]
        assert (down - first[1]).abs().mean() < 0.35 * (first[1] - first[1].mean()).abs().mean()
        assert all(torch.equal(a, b) for a, b in zip(first, again))
        assert not torch.equal(first[0], other[0])
        center = PairedViews(big, small, train=False)(image)
        assert torch.equal(center[0], big(image)) and torch.equal(center[1], small(image))
