"""Export and predict: one safetensors file per student, the same predictions as the in-memory
student (without the teacher), and a refusal, naming what differs, for every file that does not fit."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from clipdistill.engine.evaluation import export
from clipdistill.engine.evaluation.export import ExportError, export_student, load_export, read_distilled

_spec = importlib.util.spec_from_file_location("_eval_data", Path(__file__).with_name("_eval_data.py"))
data = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(data)

KINDS = [
    ("coop", {"n_ctx": 4, "init_words": "a photo of a"}),
    ("cocoop", {"n_ctx": 2}),
    ("vpt", {"n_tokens": 2, "depth": 2}),
    ("maple", {"n_ctx": 2, "depth": 2}),
    ("promptsrc", {"n_text_ctx": 2, "text_depth": 2, "n_vision_ctx": 2, "vision_depth": 2}),
    ("promptkd", {"n_ctx": 2, "depth": 2, "projector": "conv_bn"}),
]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return data.World(tmp_path_factory.mktemp("export"))


run_cli = data.run_cli


def _predict_lines(capsys, *argv) -> list[dict]:
    assert run_cli("predict", *argv, "--device", "cpu", "--workers", "1", "--batch-size", "3") == 0
    return [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]


def _in_memory_probabilities(world, learner, kind, images):
    learner.eval()
    with torch.no_grad():
        if kind == "promptkd":
            logits = learner(images, world.teacher_vectors(data.CLASS_NAMES)).logits
        else:
            logits = learner(images).logits
    return logits.float().softmax(-1)


@pytest.mark.parametrize("kind, options", KINDS, ids=[k for k, _ in KINDS])
def test_export_then_predict_equals_the_in_memory_student(world, capsys, kind, options, tmp_path):
    checkpoint, learner = world.distilled(kind, options, out=f"run_{kind}")
    out = tmp_path / f"{kind}.safetensors"
    assert run_cli("export", "--checkpoint", checkpoint, "--out", out, "--device", "cpu") == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["learner"] == kind and summary["classes"] == 5

    # One file: the learner's state, the class vectors and a JSON header; no backbone by default.
    with safe_open(str(out), framework="pt") as fh:
        header = json.loads(fh.metadata()["header"])
        keys = set(fh.keys())
    assert {k[len("learner."):] for k in keys if k.startswith("learner.")} == set(learner.state_to_save())
    assert not any(k.startswith("backbone.") for k in keys)
    assert header["student"]["name"] == data.TINY_STUDENT and header["student"]["weights_sha256"]
    assert header["teacher"]["name"] == data.TINY_TEACHER
    assert header["class_names"] == data.CLASS_NAMES and header["templates"] == ["a photo of a {}."]
    # the recipe's learner preset fills what the test leaves out (e.g. CoCoOp's "a photo of a" init)
    assert header["learner"]["kind"] == kind and header["learner"]["options"].items() >= options.items()
    assert header["learner"]["prompt_placement"] == "before_ln_pre"
    assert header["method"] in ("kdpl", "promptkd")
    assert set(header["versions"]) == {"clipdistill", "open_clip", "torch"}
    expected_space = {"promptkd": "teacher", "cocoop": None}.get(kind, "student")
    assert header["class_vectors"] == expected_space and ("class_vectors" in keys) == (expected_space is not None)
    if kind == "promptkd":  # the projector's batch-norm statistics travel with it
        assert "learner.projector.layers.1.running_var" in keys

    lines = _predict_lines(capsys, world.unlabeled, "--checkpoint", out, "--top-k", "3", "--cache-dir", world.cache)
    ids, images = data.loader_images(export.image_samples([str(world.unlabeled)], cache_dir=world.cache))
    probabilities = _in_memory_probabilities(world, learner, kind, images)
    assert len(lines) == len(ids) == 7
    samples = export.image_samples([str(world.unlabeled)], cache_dir=world.cache)
    for line, sid, row in zip(lines, ids.tolist(), probabilities):
        assert line["image"] == samples.location(sid)  # input order
        scores, indices = row.topk(3)
        assert [t["index"] for t in line["top"]] == indices.tolist()
        assert [t["class"] for t in line["top"]] == [data.CLASS_NAMES[i] for i in indices.tolist()]
        torch.testing.assert_close(torch.tensor([t["score"] for t in line["top"]]), scores, rtol=1e-5, atol=1e-6)


def test_predict_loads_no_teacher(world, capsys, tmp_path, forbid):
    checkpoint, _ = world.distilled("promptkd", {"n_ctx": 2, "depth": 2}, out="run_noteacher")
    out = tmp_path / "pkd.safetensors"
    assert run_cli("export", "--checkpoint", checkpoint, "--out", out, "--device", "cpu") == 0
    capsys.readouterr()
    from clipdistill.engine.models.clip import build_teacher

    forbid(build_teacher, "predict must not load the teacher")
    images = sorted(str(p) for p in world.unlabeled.glob("*.png"))[:2]
    lines = _predict_lines(capsys, *images, "--checkpoint", out, "--top-k", "1")
    assert [line["image"] for line in lines] == images
    assert all(len(line["top"]) == 1 and 0 < line["top"][0]["score"] <= 1 for line in lines)


def test_self_contained_export_of_a_random_init_student(world, tmp_path):
    """A student without weights (random init) can be exported only with its backbone inside."""
    from clipdistill.engine.evaluation.export import construct_learner
    from clipdistill.engine.models import build_student, get_tokenizer

    torch.manual_seed(11)
    clip = build_student(data.TINY_STUDENT, None)
    learner = construct_learner("coop", clip, tokenizer=get_tokenizer(data.TINY_STUDENT),
                                class_names=data.CLASS_NAMES, templates=["a photo of a {}."], teacher_dim=None,
                                options={"n_ctx": 3})
    kwargs = dict(method="kdpl", student={"name": data.TINY_STUDENT, "weights": None},
                  teacher={"name": data.TINY_TEACHER, "weights": None}, learner_kind="coop",
                  learner_options={"n_ctx": 3}, class_names=data.CLASS_NAMES, templates=["a photo of a {}."])
    with pytest.raises(ExportError, match="include_backbone"):
        export_student(tmp_path / "a.safetensors", learner, **kwargs)
    path = export_student(tmp_path / "a.safetensors", learner, include_backbone=True, **kwargs)
    loaded = load_export(path)
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    learner.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded.classifier(images), learner(images).logits, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------ refusals


@pytest.fixture(scope="module")
def coop_export(world, tmp_path_factory):
    checkpoint, _ = world.distilled("coop", {"n_ctx": 4, "init_words": "a photo of a"}, out="run_refusals")
    out = tmp_path_factory.mktemp("exports") / "coop.safetensors"
    export.export_from_checkpoint(checkpoint, out)
    return out


def _rewrite(src: Path, dst: Path, edit_header=None, edit_tensors=None) -> Path:
    with safe_open(str(src), framework="pt") as fh:
        metadata = dict(fh.metadata())
    tensors = load_file(str(src))
    header = json.loads(metadata["header"])
    if edit_header:
        edit_header(header)
    if edit_tensors:
        edit_tensors(tensors)
    metadata["header"] = json.dumps(header)
    save_file(tensors, str(dst), metadata=metadata)
    return dst


def test_refuses_another_student_architecture(world, coop_export, capsys):
    with pytest.raises(ExportError, match=rf"trained on student '{data.TINY_STUDENT}'.*'{data.TINY_TEACHER}'"):
        load_export(coop_export, expect_student=data.TINY_TEACHER)
    assert run_cli("predict", world.unlabeled, "--checkpoint", coop_export, "--student", data.TINY_TEACHER,
                   "--device", "cpu") == 2
    assert "prompts do not carry over between architectures" in capsys.readouterr().err


def test_refuses_an_open_clip_version_that_changes_shapes(coop_export, tmp_path):
    def older(header):
        header["versions"]["open_clip"] = "2.0.0"
        header["backbone_shapes"]["positional_embedding"] = [77, 64]

    path = _rewrite(coop_export, tmp_path / "old.safetensors", edit_header=older)
    with pytest.raises(ExportError) as info:
        load_export(path)
    message = str(info.value)
    assert "open_clip 3" in message and "(open_clip 2.0.0)" in message
    assert "positional_embedding: (77, 64) in the file, (16, 64) now" in message


def test_refuses_learner_state_that_does_not_fit(coop_export, tmp_path):
    def longer(tensors):
        tensors["learner.prompts.ctx"] = torch.randn(6, 64)

    path = _rewrite(coop_export, tmp_path / "bad.safetensors", edit_tensors=longer)
    with pytest.raises(ExportError, match=r"prompts\.ctx: \(6, 64\) in the file, \(4, 64\) now"):
        load_export(path)


def test_refuses_other_student_weights(world, coop_export, tmp_path):
    weights = load_file(str(world.student_weights))
    weights["logit_scale"] = weights["logit_scale"] + 1.0
    other = tmp_path / "other_student.safetensors"
    save_file(weights, str(other))
    with pytest.raises(ExportError, match="not those the prompts were trained on: SHA-256"):
        load_export(coop_export, student_weights=str(other))
    assert load_export(coop_export, student_weights=str(world.student_weights)).class_names == data.CLASS_NAMES

    def moved(header):
        header["student"]["weights"] = str(tmp_path / "gone.safetensors")

    path = _rewrite(coop_export, tmp_path / "moved.safetensors", edit_header=moved)
    with pytest.raises(ExportError, match="does not exist here.*--student-weights"):
        load_export(path)


def test_refuses_files_that_are_not_exports(world, coop_export, tmp_path):
    checkpoint, _ = world.distilled("coop", {"n_ctx": 4}, out="run_not_export")
    with pytest.raises(ExportError, match="is a training checkpoint; export it first"):
        load_export(checkpoint)
    with pytest.raises(ExportError, match="neither a clipdistill export"):
        read_distilled(world.student_weights)
    with pytest.raises(ExportError, match="is already an export file"):
        export.export_from_checkpoint(coop_export, tmp_path / "again.safetensors")


def test_refuses_class_specific_context_for_other_names(world):
    checkpoint, _ = world.distilled("coop", {"n_ctx": 2, "class_specific": True}, out="run_csc")
    distilled = read_distilled(checkpoint)
    from clipdistill.engine.evaluation.export import build_backbone
    from clipdistill.engine.evaluation.export import rebuild_learner as build_learner

    clip = build_backbone(distilled)
    assert build_learner(distilled, clip, class_names=data.CLASS_NAMES) is not None
    with pytest.raises(ExportError, match="class-specific"):
        build_learner(distilled, clip, class_names=data.OTHER_NAMES)


def test_predict_reports_unreadable_images_in_place(world, coop_export, capsys, tmp_path):
    import shutil

    good = sorted(world.unlabeled.glob("*.png"))[:2]
    folder = tmp_path / "mixed"
    folder.mkdir()
    for i, path in enumerate(good):
        shutil.copy(path, folder / f"{i * 2}.png")
    (folder / "1.png").write_bytes(b"not an image at all")
    lines = _predict_lines(capsys, folder, "--checkpoint", coop_export, "--top-k", "2")
    assert [Path(line["image"]).name for line in lines] == ["0.png", "1.png", "2.png"]
    assert "error" in lines[1] and "top" not in lines[1]
    assert all(len(lines[i]["top"]) == 2 for i in (0, 2))


# ------------------------------------------------------------------------------ hostile headers (issue 18, item 8)


def _names(value):
    def edit(header):
        header["class_names"] = value
    return edit


def _int32_vectors(tensors):
    tensors["class_vectors"] = (tensors["class_vectors"] * 100).to(torch.int32)


@pytest.mark.parametrize("edit_header, edit_tensors, message", [
    # Reproduction: the string "abcdef" gave classes "a".."f" (and a 6 x D tensor passed).
    (_names("abcdef"), None, r"'class_names' must be a non-empty list of strings, found 'abcdef'"),
    (_names([]), None, r"'class_names' must be a non-empty list"),
    (_names(["circle", "", "b", "c", "d"]), None, r"class name 1 must be a non-empty string, found ''"),
    (_names(["circle", "square", None, "c", "d"]), None, r"class name 2 must be a non-empty string, found None"),
    (_names(["circle", "square", "circle", "c", "d"]), None, r"class name 2 repeats 'circle' \(first at 0\)"),
    (_names(["a", "b", "c", "d"]), None, r"class_vectors of shape \(5, 32\) for 4 class names"),
    # Reproduction: int32 class vectors gave a garbage prediction with score 1.0.
    (None, _int32_vectors, r"class_vectors must be a floating-point tensor, found torch\.int32"),
    (lambda h: h.update(class_vectors="teachers"), None, r"'class_vectors' must be .* found 'teachers'"),
    (lambda h: h.update(class_vectors=None), None, r"'class_vectors' says None, but the file holds"),
    (lambda h: h.update(templates="a photo of a {}."), None, r"'templates' must be a non-empty list"),
    (lambda h: h["learner"].update(kind=3), None, r"'learner\.kind' must be a non-empty string, found 3"),
    (lambda h: h.update(student="clipdistill-tiny-student"), None, r"'student' must be an object"),
    (lambda h: h["student"].update(weights=7), None, r"'student\.weights' must be a string or null, found 7"),
    (lambda h: h.update(backbone_shapes={"logit_scale": "[]"}), None, r"'backbone_shapes' must map"),
    (None, lambda t: t.update({"learner.prompts.ctx": t["learner.prompts.ctx"] > 0}),
     r"tensor 'learner\.prompts\.ctx' has dtype torch\.bool"),
    (lambda h: h["learner"].update(prompt_placement=["before_ln_pre"]), None,
     r"'learner\.prompt_placement' must be one of before_ln_pre, after_ln_pre or null, found \['before_ln_pre'\]"),
    (lambda h: h["learner"].update(prompt_placement="after_ln_post"), None,
     r"'learner\.prompt_placement' must be one of .* found 'after_ln_post'"),
], ids=["string", "empty", "empty-name", "null-name", "duplicate", "rows", "int32-vectors", "space", "space-null",
        "templates", "learner-kind", "student", "weights", "backbone-shapes", "bool-tensor", "placement-type",
        "placement"])
def test_refuses_hostile_export_headers(coop_export, tmp_path, capsys, edit_header, edit_tensors, message):
    path = _rewrite(coop_export, tmp_path / "hostile.safetensors", edit_header=edit_header, edit_tensors=edit_tensors)
    with pytest.raises(ExportError, match=message):
        read_distilled(path)
    assert run_cli("predict", tmp_path, "--checkpoint", path, "--device", "cpu") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("clipdistill predict: error: ") and "export header" in err[0], err


def test_a_null_source_header_reads(coop_export, tmp_path):
    """Reproduction: "source": null (allowed by the header check) crashed with AttributeError on .get."""
    path = _rewrite(coop_export, tmp_path / "no_source.safetensors", edit_header=lambda h: h.update(source=None))
    distilled = read_distilled(path)
    assert distilled.step is None and distilled.header["source"] is None


def test_refuses_an_embedded_backbone_that_does_not_fit(world, tmp_path, capsys):
    """Reproduction: an embedded backbone tensor of another shape ended in load_state_dict's traceback."""
    from clipdistill.engine.evaluation.export import construct_learner
    from clipdistill.engine.models import build_student, get_tokenizer

    clip = build_student(data.TINY_STUDENT, None)
    learner = construct_learner("coop", clip, tokenizer=get_tokenizer(data.TINY_STUDENT),
                                class_names=data.CLASS_NAMES, templates=["a photo of a {}."], teacher_dim=None,
                                options={"n_ctx": 2})
    path = export_student(tmp_path / "embedded.safetensors", learner, method="kdpl",
                          student={"name": data.TINY_STUDENT, "weights": None},
                          teacher={"name": data.TINY_TEACHER, "weights": None}, learner_kind="coop",
                          learner_options={"n_ctx": 2}, class_names=data.CLASS_NAMES,
                          templates=["a photo of a {}."], include_backbone=True)

    def reshape(tensors):
        tensors["backbone.positional_embedding"] = torch.randn(8, 64)

    def retype(tensors):
        tensors["backbone.logit_scale"] = tensors["backbone.logit_scale"].to(torch.int64)

    for edit, message in ((reshape, r"positional_embedding: \(8, 64\) in the file, \(16, 64\) now"),
                          (retype, r"logit_scale: torch\.int64 in the file, torch\.float32 expected")):
        bad = _rewrite(path, tmp_path / "bad.safetensors", edit_tensors=edit)
        with pytest.raises(ExportError, match=rf"embedded backbone does not fit .*{message}"):
            load_export(bad)
        assert run_cli("predict", tmp_path, "--checkpoint", bad, "--device", "cpu") == 2
        assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_export_refuses_student_weights_of_another_architecture_in_one_line(world, tmp_path, capsys):
    """Reproduction: a checkpoint whose student weights do not fit its student architecture (here the
    teacher's weights) ended `clipdistill export` in open_clip's multi-line RuntimeError traceback."""
    from clipdistill.engine.training import checkpoint as ckpt

    checkpoint, _ = world.distilled("coop", {"n_ctx": 2}, out="run_mismatch")
    state = ckpt.load_checkpoint(checkpoint)
    state["config"]["student"]["weights"] = str(world.teacher_weights)
    mismatched = ckpt.save_state(tmp_path / "step-000000001.safetensors", state)
    assert run_cli("export", mismatched, "--out", tmp_path / "e.safetensors", "--device", "cpu") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "do not build 'clipdistill-tiny-student'" in err[0] and "does not fit" in err[0], err
