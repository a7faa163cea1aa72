"""The shared readers (engine/io.py): class-name files, templates, devices, a model's image spec.

Every error is a ConfigError naming the setting (or flag) the value came from.
"""
from __future__ import annotations

import pytest
import torch

from clipdistill.engine.config import ConfigError
from clipdistill.engine.io import image_spec, read_class_names, read_templates, resolve_device
from clipdistill.engine.templates import templates_for

# ------------------------------------------------------------------------------ class names


def test_shipped_vocabulary():
    names = read_class_names("builtin:imagenet21k")  # raises on empty lines and duplicates
    assert len(names) >= 20_000
    with pytest.raises(ConfigError, match="unknown built-in vocabulary 'nope'"):
        read_class_names("builtin:nope")


def test_class_names_one_per_line_stripped(tmp_path):
    path = tmp_path / "classes.txt"
    path.write_text("cat\n  sea lion  \ngolden retriever\n")
    assert read_class_names(path) == ["cat", "sea lion", "golden retriever"]
    assert read_class_names(str(path)) == ["cat", "sea lion", "golden retriever"]


def test_empty_lines_and_duplicates_name_their_lines(tmp_path):
    path = tmp_path / "classes.txt"
    path.write_text("cat\n\ndog\ncat\n")
    with pytest.raises(ConfigError, match=r"^data\.class_names: .*classes\.txt: line 2 is empty; "
                                          r"line 4 repeats 'cat' \(first on line 1\)$"):
        read_class_names(path)
    with pytest.raises(ConfigError, match=r"^--class-names: .*line 2 is empty"):
        read_class_names(path, what="--class-names")


def test_more_than_five_problems_are_counted(tmp_path):
    path = tmp_path / "classes.txt"
    path.write_text("cat\n" + "\n" * 7 + "dog\n")
    with pytest.raises(ConfigError, match=r"line 2 is empty; .*line 6 is empty \(and 2 more\)$"):
        read_class_names(path)


def test_missing_or_empty_class_file(tmp_path):
    with pytest.raises(ConfigError, match=r"data\.class_names: class-name file .*nope\.txt.* does not exist"):
        read_class_names(tmp_path / "nope.txt")
    with pytest.raises(ConfigError, match="does not exist"):
        read_class_names(tmp_path)  # a folder is not a class-name file
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ConfigError, match=r"empty\.txt holds no class names"):
        read_class_names(empty)


# ------------------------------------------------------------------------------ templates


def test_shipped_template_set_by_name():
    assert read_templates("generic") == list(templates_for("generic"))


def test_template_file_with_one_placeholder_per_line(tmp_path):
    path = tmp_path / "templates.txt"
    path.write_text("a photo of a {}.\n\n  a drawing of a {}.  \n")
    assert read_templates(str(path)) == ["a photo of a {}.", "a drawing of a {}."]


def test_template_file_without_a_placeholder_is_refused(tmp_path):
    path = tmp_path / "templates.txt"
    path.write_text("a photo of a {}.\na photo\n")
    with pytest.raises(ConfigError, match=r"^data\.templates: each template needs exactly one '\{\}'.*'a photo'"):
        read_templates(str(path))
    with pytest.raises(ConfigError, match=r"^--templates: "):
        read_templates(str(path), what="--templates")


def test_unknown_template_set(tmp_path):
    with pytest.raises(ConfigError, match=r"data\.templates: 'nope' is neither a file nor a shipped template set"):
        read_templates("nope")


# ------------------------------------------------------------------------------ devices


def test_auto_device_is_cuda_when_visible_else_cpu(monkeypatch):
    expected = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("auto") == expected and resolve_device(None) == expected
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu") and resolve_device(torch.device("cpu")).type == "cpu"


def test_cuda_without_cuda_names_the_key(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"^train\.device='cuda' but no CUDA device is available$"):
        resolve_device("cuda")
    with pytest.raises(ConfigError, match=r"^--device='cuda:1' but no CUDA device"):
        resolve_device("cuda:1", what="--device")


# ------------------------------------------------------------------------------ image spec


def test_image_spec_falls_back_to_openai_normalization(student_clip):
    from open_clip import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    visual = student_clip.visual
    visual.image_mean, visual.image_std = None, None
    size, mean, std = image_spec(student_clip)
    side = visual.image_size[0] if isinstance(visual.image_size, (tuple, list)) else visual.image_size
    assert size == side == 32
    assert mean == tuple(OPENAI_DATASET_MEAN) and std == tuple(OPENAI_DATASET_STD)


def test_image_spec_reads_what_the_tower_records(student_clip):
    student_clip.visual.image_mean, student_clip.visual.image_std = (0.5, 0.5, 0.5), [0.25, 0.25, 0.25]
    assert image_spec(student_clip)[1:] == ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
