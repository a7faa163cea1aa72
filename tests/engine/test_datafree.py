"""Data-free distillation: diversifiers, generators, synthesis (resumable), report (the student's
recipe: test_datafree_recipe.py).

Tiny random-init models on the CPU (the teacher from tests/engine/conftest.py, a timm
``test_resnet`` student, a random-init diffusers VQModel). A random teacher sees little in its
images, so these tests check mechanics and directions (objectives fall, similarities rise,
spreads order), not accuracy.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from clipdistill.engine.datafree import diversify, generators, report, synthesize
from clipdistill.engine.models import TINY_TEACHER, Teacher

HAS_DIFFUSERS = generators.diffusers_available()
needs_diffusers = pytest.mark.skipif(
    not HAS_DIFFUSERS, reason="diffusers is not installed (pip install 'clipdistill[datafree]')"
)
GENERATOR_NAMES = [
    "pixel",
    "fourier",
    pytest.param("vqgan", marks=needs_diffusers),
]


@pytest.fixture(autouse=True)
def _one_thread():
    # The CPU machine is shared; these are small problems where threads do not pay.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def teacher(_teacher_clip) -> Teacher:
    return Teacher(copy.deepcopy(_teacher_clip))


@pytest.fixture
def teacher_tokenizer():
    from clipdistill.engine.models import get_tokenizer

    return get_tokenizer(TINY_TEACHER)


@pytest.fixture
def styled(teacher, teacher_tokenizer, class_names):
    from clipdistill.engine.models.towers import TextTower

    return diversify.StyledPrompts(TextTower.of(teacher.model), teacher_tokenizer, class_names)


def _cli(argv: list[str]) -> int:
    """Run the data-free commands through the real command line; the exit code."""
    from clipdistill.engine.cli import main

    return main(argv)


# ----------------------------------------------------------------------------- prompts


def test_style_slot_is_found_by_position_not_by_placeholder_word(styled, class_names, teacher_tokenizer):
    # "x-wing fighter" tokenizes its "x" to the placeholder's id: the slot must still be position 2.
    assert "x-wing fighter" in class_names
    placeholder_id = int(teacher_tokenizer([diversify.PLACEHOLDER])[0, 1])
    x_wing = styled.token_ids[class_names.index("x-wing fighter")]
    assert (x_wing == placeholder_id).sum() == 2
    assert styled.style_start == 2
    # Splicing in the placeholder's own embedding must reproduce open_clip's encode_text exactly.
    tower = styled.tower
    own = tower.token_embedding.weight[placeholder_id].detach().view(1, 1, -1).expand(len(class_names), 1, -1)
    with torch.no_grad():
        spliced = styled.encode_pairs(own, torch.arange(len(class_names)))
        reference = torch.nn.functional.normalize(styled.tower.encode_tokens(styled.token_ids).float(), dim=-1)
    torch.testing.assert_close(spliced, reference, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", diversify.DIVERSIFIERS)
@pytest.mark.parametrize("count", [1, 7])
def test_each_diversifier_yields_the_requested_number_of_distinct_prompts(kind, count, styled, teacher_tokenizer, class_names):
    maker = diversify.build_diversifier(kind, styled.tower, teacher_tokenizer, class_names, contrastive_steps=3)
    bank = maker.styles(count, seed=11)
    assert len(bank) == count == len(bank.seeds) == len(bank.descriptions)
    assert bank.embeddings.shape == (count, 1, styled.tower.width)
    assert torch.isfinite(bank.embeddings).all()
    assert len(set(bank.seeds)) == count and len(set(bank.descriptions)) == count
    with torch.no_grad():
        features = styled.encode_grid(bank.embeddings)  # (S, C, D)
    assert features.shape[:2] == (count, len(class_names))
    prompts = features.reshape(count * len(class_names), -1)
    distances = torch.cdist(prompts.double(), prompts.double())
    off_diagonal = ~torch.eye(prompts.shape[0], dtype=torch.bool)
    assert distances[off_diagonal].min() > 1e-6, "two styled prompts encode identically"
    # A style is a function of its seed: the same run seed gives the same bank.
    again = maker.styles(count, seed=11)
    torch.testing.assert_close(again.embeddings, bank.embeddings, rtol=0, atol=0)


def test_mix_prompt_is_a_convex_combination_of_dictionary_words(styled, teacher_tokenizer):
    mix = diversify.MixPrompt(styled.tower, teacher_tokenizer, words_per_style=3)
    bank = mix.styles(5, seed=3)
    for style, description in zip(bank.embeddings, bank.descriptions, strict=True):
        parts = [p.rsplit(" ", 1) for p in description.split(" + ")]
        words, weights = [w for w, _ in parts], torch.tensor([float(x) for _, x in parts])
        assert len(words) == 3 and abs(float(weights.sum()) - 1) < 0.02 and (weights >= 0).all()
        rows = mix.word_embeddings[[mix.words.index(w) for w in words]]
        torch.testing.assert_close(style[0], weights @ rows, rtol=0, atol=0.01 * float(rows.norm(dim=1).max()))


def test_random_prompt_matches_the_token_table_statistics(styled):
    random_prompt = diversify.RandomPrompt(styled.tower)
    bank = random_prompt.styles(400, seed=5).embeddings[:, 0]
    table = styled.tower.token_embedding.weight.detach()
    # 400 draws: the per-dimension mean within ~4 standard errors, the overall std within 10%.
    assert (bank.mean(0) - table.mean(0)).abs().max() < 4 * float(table.std(0).max()) / 400**0.5 * 1.5
    assert abs(float(bank.std()) / float(table.std()) - 1) < 0.1


def test_contrastive_objective_decreases_and_spreads_further_than_random(styled, teacher_tokenizer):
    contrastive = diversify.ContrastivePrompt(styled, teacher_tokenizer, steps=25, lr=2e-3)
    bank = contrastive.styles(6, seed=0)
    for trace in bank.losses:  # each style's objective: first step vs the final full evaluation
        assert trace[-1] < trace[0]
    random_bank = diversify.RandomPrompt(styled.tower).styles(6, seed=0)
    # Same seed, same initial draws: contrastive style j starts at random style j.
    assert bank.seeds == random_bank.seeds
    with torch.no_grad():
        spread_contrastive = diversify.style_spread(styled.encode_grid(bank.embeddings))
        spread_random = diversify.style_spread(styled.encode_grid(random_bank.embeddings))
        # The class term keeps most styled prompts nearest their own class anchor.
        feats = styled.encode_grid(bank.embeddings)
        kept = (torch.einsum("scd,kd->sck", feats, contrastive.anchors).argmax(-1) == torch.arange(feats.shape[1])).float().mean()
    assert spread_contrastive > spread_random
    assert kept >= 0.6
    # Norms stay within the token table's range.
    assert float(bank.embeddings.norm(dim=-1).max()) <= contrastive.max_norm * (1 + 1e-5)


def test_style_bank_round_trip_and_key_check(tmp_path, styled):
    bank = diversify.RandomPrompt(styled.tower).styles(3, seed=2)
    bank.save(tmp_path / "styles.safetensors", {"seed": 2})
    loaded = diversify.StyleBank.load(tmp_path / "styles.safetensors", {"seed": 2})
    torch.testing.assert_close(loaded.embeddings, bank.embeddings, rtol=0, atol=0)
    assert loaded.seeds == bank.seeds and loaded.descriptions == bank.descriptions
    with pytest.raises(ValueError, match="other settings"):
        diversify.StyleBank.load(tmp_path / "styles.safetensors", {"seed": 3})


# ----------------------------------------------------------------------------- generators


@pytest.mark.parametrize("name", GENERATOR_NAMES)
def test_each_generator_raises_the_teachers_similarity_to_its_prompt(name, teacher, styled):
    torch.manual_seed(0)
    bank = diversify.RandomPrompt(styled.tower).styles(3, seed=1)
    with torch.no_grad():
        targets = styled.encode_pairs(bank.embeddings, torch.tensor([0, 2, 4]))
    gen = generators.build_generator(name, 32, vqgan="tiny")
    seeds = [7, 8, 9]
    with torch.no_grad():
        before = (generators.teacher_image_features(teacher, gen.render(gen.init_params(seeds))) * targets).sum(-1)
    images, after = gen.generate(teacher, targets, seeds, steps=12, n_cutouts=4)
    assert images.shape == (3, 3, 32, 32)
    assert torch.isfinite(images).all() and images.min() >= 0 and images.max() <= 1
    assert (after > before).all(), f"{name}: similarity before {before.tolist()} after {after.tolist()}"
    # The teacher was not touched.
    assert not any(p.requires_grad for p in teacher.parameters())


def _gens(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def test_cutouts_shapes_order_and_per_image_independence():
    torch.manual_seed(0)
    images = torch.rand(3, 3, 40, 48)  # not square, not the teacher's side
    cut = generators.Cutouts(24, n_cutouts=5)
    views = cut(images, _gens([1, 2, 3]))
    assert views.shape == (5 * 3, 3, 24, 24) and torch.isfinite(views).all()
    # Image 0's views depend on its own seed only, whatever its batch-mates are.
    other = cut(images[[0, 2]], _gens([1, 9]))
    torch.testing.assert_close(other.view(5, 2, 3, 24, 24)[:, 0], views.view(5, 3, 3, 24, 24)[:, 0], rtol=0, atol=0)
    # Deterministic under a seed; per-image boxes: the same picture with two seeds gives other views.
    torch.testing.assert_close(cut(images, _gens([1, 2, 3])), views, rtol=0, atol=0)
    twins = cut(images[[0, 0]], _gens([4, 5])).view(5, 2, 3, 24, 24)
    assert (twins[:, 0] - twins[:, 1]).abs().amax(dim=(1, 2, 3)).min() > 1e-3
    # Varied scales: the crops' sides spread over [cut_min, 1] of the shorter side.
    frac = cut.cut_min + (1 - cut.cut_min) * cut.draw(_gens(range(20)), torch.device("cpu"))[..., 0]
    assert frac.min() < 0.6 and frac.max() > 0.9
    with pytest.raises(ValueError, match="one generator per image"):
        cut(images, _gens([1]))
    with pytest.raises(ValueError, match="unknown cutout augmentation"):
        generators.Cutouts(24, augment="kornia")


def test_cutout_geometry_against_direct_references():
    torch.manual_seed(0)
    images = torch.rand(2, 3, 16, 16)
    off = generators.CutoutAugment(flip_p=0, sharpness_p=0, affine_p=0, perspective_p=0, jitter_p=0, noise=0)
    # Whole-image crops with nothing else: the image itself (identity resampling).
    same = generators.Cutouts(16, n_cutouts=2, cut_min=1.0, augment=off)(images, _gens([0, 1]))
    torch.testing.assert_close(same, images.repeat(2, 1, 1, 1), rtol=0, atol=1e-5)
    # Always flipped: the mirror image.
    flip = dataclasses.replace(off, flip_p=1.0)
    flipped = generators.Cutouts(16, n_cutouts=1, cut_min=1.0, augment=flip)(images, _gens([0, 1]))
    torch.testing.assert_close(flipped, images.flip(-1), rtol=0, atol=1e-5)
    # A half-size crop at 2x: each output pixel pair samples one input pixel region (bilinear reference).
    half = generators.Cutouts(16, n_cutouts=1, cut_min=0.5, cut_pow=1e9, augment=off)  # u**huge -> 0: side 0.5
    u = half.draw(_gens([3]), torch.device("cpu")).view(1, -1)
    ex = 0.5
    cx, cy = ((2 * u[0, 1] - 1) * (1 - ex)).item(), ((2 * u[0, 2] - 1) * (1 - ex)).item()
    theta = torch.tensor([[[ex, 0.0, cx], [0.0, ex, cy]]])
    reference = torch.nn.functional.grid_sample(
        images[:1], torch.nn.functional.affine_grid(theta, (1, 3, 16, 16), align_corners=False),
        mode="bilinear", padding_mode="border", align_corners=False)
    torch.testing.assert_close(half(images[:1], _gens([3])), reference, rtol=0, atol=1e-5)
    # The color matrix keeps gray gray (hue rotation and saturation fix the luma axis).
    cut = generators.Cutouts(16, augment=dataclasses.replace(off, jitter_p=1.0, hue=0.3, saturation=0.5))
    matrices = cut.color_matrices(cut.draw(_gens([5]), torch.device("cpu")).view(-1, 23))
    gray = torch.full((3,), 0.4)
    torch.testing.assert_close(matrices @ gray, gray.expand(matrices.shape[0], 3), rtol=0, atol=1e-5)
    assert (matrices - torch.eye(3)).abs().amax() > 1e-3
    # Sharpness (kornia's, as RandomSharpness(0.3) draws it): keeps a flat image flat; otherwise each view
    # is s + f (x - s), f ~ U(0, 0.3), s the 3x3 SMOOTH average clamped to [0, 1] inside and x on the border.
    sharp = generators.Cutouts(16, n_cutouts=4, cut_min=1.0, augment=dataclasses.replace(off, sharpness_p=1.0))
    flat = torch.full((1, 3, 16, 16), 0.3)
    torch.testing.assert_close(sharp(flat, _gens([0])), flat.expand(4, 3, 16, 16), rtol=0, atol=1e-6)
    board = (torch.arange(16)[:, None] + torch.arange(16)[None, :]).remainder(2).float().expand(1, 3, 16, 16) * 0.5 + 0.25
    x = board[0].double().numpy()
    factors = sharp.draw(_gens([0]), torch.device("cpu")).view(4, -1)[:, 18].double().numpy() * 0.3
    assert (factors >= 0).all() and (factors <= 0.3).all()
    expected = np.empty((4, 3, 16, 16))
    for view, f in enumerate(factors):
        s = x.copy()
        for i in range(1, 15):
            for j in range(1, 15):
                s[:, i, j] = np.clip((x[:, i - 1:i + 2, j - 1:j + 2].sum(axis=(1, 2)) + 4 * x[:, i, j]) / 13, 0, 1)
        expected[view] = (1 - f) * s + f * x
    got = sharp(board, _gens([0]))
    torch.testing.assert_close(got.double(), torch.from_numpy(expected), rtol=0, atol=1e-5)
    assert (got.std(dim=(1, 2, 3)) < board.std() - 1e-3).all()  # factors below 1 soften, never sharpen
    noisy = generators.Cutouts(16, n_cutouts=8, cut_min=1.0, augment=dataclasses.replace(off, noise=0.1))
    sigma = (noisy(flat, _gens([0])) - 0.3).std(dim=(1, 2, 3))
    assert (sigma < 0.1 * 1.1).all() and sigma.max() - sigma.min() > 0.01


def test_spherical_distance_matches_the_angle():
    a = torch.nn.functional.normalize(torch.randn(9, 5, dtype=torch.float64), dim=-1)
    b = torch.nn.functional.normalize(torch.randn(9, 5, dtype=torch.float64), dim=-1)
    angle = torch.arccos((a * b).sum(-1).clamp(-1, 1))
    torch.testing.assert_close(generators.spherical_distance(a, b), angle.square() / 2, rtol=1e-9, atol=1e-12)


@needs_diffusers
def test_vqgan_decoder_loads_from_local_files_only(tmp_path):
    from safetensors.torch import save_file

    model = generators.tiny_vqgan(seed=3)
    model.save_pretrained(tmp_path / "folder")  # diffusers layout: config.json + safetensors
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "vq.safetensors"))
    config = {k: v for k, v in dict(model.config).items() if not k.startswith("_")}
    (tmp_path / "vq.json").write_text(json.dumps(config))
    latents = torch.randn(1, 8, 16, 16)
    with torch.no_grad():
        expected = model.decode(latents).sample
        for source in (tmp_path / "folder", tmp_path / "vq.safetensors"):
            torch.testing.assert_close(generators.load_vqgan(source).decode(latents).sample, expected)
    with pytest.raises(FileNotFoundError, match="never downloaded"):
        generators.load_vqgan(tmp_path / "missing")


# ----------------------------------------------------------------------------- synthesis


def _plan(class_names, **overrides) -> synthesize.SynthesisPlan:
    settings = dict(teacher=TINY_TEACHER, teacher_weights=None, class_names=tuple(class_names),
                    diversifier="random", generator="fourier", per_class=3, seed=0, steps=3, n_cutouts=2)
    settings.update(overrides)
    return synthesize.SynthesisPlan(**settings)


def _check_complete(out: Path, plan: synthesize.SynthesisPlan) -> list[dict]:
    entries = synthesize.read_manifest(out / synthesize.MANIFEST_FILE)
    keys = [(e["class_index"], e["style_index"]) for e in entries]
    assert len(keys) == len(set(keys)) == len(plan.class_names) * plan.per_class
    assert len({e["path"] for e in entries}) == len(entries)
    on_disk = sorted(str(p.relative_to(out)) for p in (out / synthesize.IMAGES_DIR).rglob("*.png"))
    assert on_disk == sorted(e["path"] for e in entries)
    assert not [p for p in out.rglob(".*tmp*")], "temporary files left behind"
    return entries


def test_interrupted_synthesize_resumes_without_duplicates(tmp_path, teacher, teacher_tokenizer, class_names):
    plan = _plan(class_names)
    out = tmp_path / "set"
    first = synthesize.synthesize(plan, out, teacher, teacher_tokenizer, batch_size=4, limit=7, progress=False)
    assert (first.generated, first.complete) == (7, False)
    # Round-robin order: after 7 images every class has its style 0.
    done = synthesize.read_manifest(out / synthesize.MANIFEST_FILE)
    assert {e["class_index"] for e in done if e["style_index"] == 0} == set(range(len(class_names)))

    # Simulate crashes: a torn last line, a listed image whose file vanished, an orphan image file.
    manifest = out / synthesize.MANIFEST_FILE
    vanished = done[1]
    (out / vanished["path"]).unlink()
    orphan = out / synthesize.image_relpath(4, class_names[4], 2)
    orphan.parent.mkdir(parents=True, exist_ok=True)
    orphan.write_bytes(b"not a png: a crash before the manifest line")
    with open(manifest, "a") as handle:
        handle.write('{"path": "images/0000-cat/0000-00001.png", "class_ind')

    second = synthesize.synthesize(plan, out, teacher, teacher_tokenizer, batch_size=4, progress=False)
    assert second.dropped == {"missing_image": 1, "duplicate": 0, "torn": 1}
    assert second.existing == 6 and second.generated == 15 - 6 and second.complete
    entries = _check_complete(out, plan)
    assert orphan.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # regenerated over itself
    for entry in entries:
        assert entry["prompt"].endswith(f"style of a {entry['class']}.")
        assert entry["style_seed"] == diversify.style_seed(plan.seed, entry["style_index"])

    # A third run has nothing to do; a different plan is refused.
    third = synthesize.synthesize(plan, out, teacher, teacher_tokenizer, progress=False)
    assert (third.generated, third.complete) == (0, True)
    with pytest.raises(ValueError, match="other settings"):
        synthesize.synthesize(_plan(class_names, per_class=4), out, teacher, teacher_tokenizer, progress=False)

    # The folder is an ordinary source for the loaders.
    from clipdistill.loaders import resolve_source

    samples = resolve_source(out, cache_dir=tmp_path / "cache")
    assert len(samples) == len(entries)


def test_synthesized_images_match_a_fresh_uninterrupted_run(tmp_path, teacher, teacher_tokenizer, class_names):
    # Same plan, same batches: an image is a function of its seeds, whatever ran before.
    plan = _plan(class_names[:2], per_class=2)
    a, b = tmp_path / "a", tmp_path / "b"
    synthesize.synthesize(plan, a, teacher, teacher_tokenizer, batch_size=2, progress=False)
    synthesize.synthesize(plan, b, teacher, teacher_tokenizer, batch_size=2, limit=2, progress=False)
    synthesize.synthesize(plan, b, teacher, teacher_tokenizer, batch_size=2, progress=False)
    for entry in synthesize.read_manifest(a / synthesize.MANIFEST_FILE):
        assert (a / entry["path"]).read_bytes() == (b / entry["path"]).read_bytes()


def test_one_default_generator_fails_fast_without_weights(tmp_path, teacher, teacher_tokenizer, class_names, capsys):
    from clipdistill.engine.commands import datafree

    parser = argparse.ArgumentParser()
    datafree.register(parser.add_subparsers())
    parsed = parser.parse_args(["synthesize", "--classes", "c.txt", "--out", "o"])
    assert synthesize.SynthesisPlan.generator == parsed.generator == generators.DEFAULT_GENERATOR == "vqgan"
    assert parsed.augment == synthesize.SynthesisPlan.augment == "vqgan-clip"
    plan = _plan(class_names, generator=generators.DEFAULT_GENERATOR)
    with pytest.raises(ValueError, match="--vqgan.*convert-vqgan"):
        synthesize.synthesize(plan, tmp_path / "lib", teacher, teacher_tokenizer, progress=False)
    classes = tmp_path / "classes.txt"
    classes.write_text("cat\ndog\n")
    capsys.readouterr()
    assert _cli(["synthesize", "--class-names", str(classes), "--out-dir", str(tmp_path / "cli"),
                 "--teacher", TINY_TEACHER]) == 2
    assert re.match(r"^clipdistill synthesize: error: .*--vqgan DIR.*clipdistill convert-vqgan CKPT --out-dir DIR",
                    capsys.readouterr().err)
    assert _cli(["synthesize", "--class-names", str(classes), "--out-dir", str(tmp_path / "cli"),
                 "--vqgan", str(tmp_path / "no")]) == 2
    assert "--vqgan" in capsys.readouterr().err
    assert not (tmp_path / "lib").exists() and not (tmp_path / "cli").exists()  # nothing written


def test_the_cutout_set_is_part_of_the_plan(tmp_path, teacher, teacher_tokenizer, class_names):
    plan = _plan(class_names[:2], per_class=1, augment="crops")
    synthesize.synthesize(plan, tmp_path / "s", teacher, teacher_tokenizer, progress=False)
    assert json.loads((tmp_path / "s" / synthesize.PLAN_FILE).read_text())["augment"] == "crops"
    with pytest.raises(ValueError, match="differs in \\['augment'\\]"):
        synthesize.synthesize(_plan(class_names[:2], per_class=1), tmp_path / "s", teacher, teacher_tokenizer,
                              progress=False)
    with pytest.raises(ValueError, match="unknown cutout augmentation"):
        synthesize.synthesize(_plan(class_names[:2], augment="kornia"), tmp_path / "t", teacher, teacher_tokenizer)


def test_a_set_made_before_per_image_cutouts_reads_but_does_not_resume(tmp_path, teacher, teacher_tokenizer, class_names):
    plan = _plan(class_names[:2], per_class=1)
    out = tmp_path / "old"
    synthesize.synthesize(plan, out, teacher, teacher_tokenizer, progress=False)
    stored = json.loads((out / synthesize.PLAN_FILE).read_text())
    del stored["augment"]  # what today's main writes
    (out / synthesize.PLAN_FILE).write_text(json.dumps(stored))
    from clipdistill.engine.datafree.dataset import SyntheticImages

    assert SyntheticImages(out).plan.augment == synthesize.LEGACY_AUGMENT and len(SyntheticImages(out)) == 2
    with pytest.raises(ValueError, match="earlier clipdistill.*new --out folder"):
        synthesize.synthesize(_plan(class_names[:2], per_class=2), out, teacher, teacher_tokenizer, progress=False)


def test_read_class_names(tmp_path):
    # The data-free commands read class files with the engine's one reader (clipdistill.engine.io).
    from clipdistill.engine.io import read_class_names

    path = tmp_path / "classes.txt"
    path.write_text("# comment\ncat\n  sea lion \n")
    assert read_class_names(path, what="--classes") == ["cat", "sea lion"]
    path.write_text("cat\n\nsea lion\n")
    with pytest.raises(ValueError, match=r"--classes: .*line 2 is empty"):
        read_class_names(path, what="--classes")
    path.write_text("cat\ncat\n")
    with pytest.raises(ValueError, match="repeats"):
        read_class_names(path, what="--classes")


# ----------------------------------------------------------------------------- report


def test_pairwise_cosine_distance_against_a_float64_reference():
    features = torch.nn.functional.normalize(torch.randn(7, 5), dim=-1)
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2])
    expected_pairs = [1 - float(features[i].double() @ features[j].double()) for i in range(7) for j in range(i + 1, 7)]
    assert report.pairwise_cosine_distance(features) == pytest.approx(sum(expected_pairs) / len(expected_pairs), abs=1e-6)
    result = report.diversity(features, labels, ["a", "b", "c", "d"])
    assert set(result["per_class"]) == {"a", "b", "c"}  # "d" has no images
    b = 1 - float(features[3].double() @ features[4].double())
    assert result["per_class"]["b"] == pytest.approx(b, abs=1e-6)
    assert report.pairwise_cosine_distance(features[:1].repeat(4, 1)) == pytest.approx(0, abs=1e-6)


# ----------------------------------------------------------------------------- commands


def test_commands_register_without_heavy_imports():
    import subprocess
    import sys

    code = (
        "import argparse, sys\n"
        "from clipdistill.engine.commands import datafree as cli\n"
        "parser = argparse.ArgumentParser(); cli.register(parser.add_subparsers())\n"
        "args = parser.parse_args(['synthesize', '--classes', 'c.txt', '--out', 'o'])\n"
        "assert args.diversifier == 'contrastive' and args.generator == 'vqgan' and callable(args.func)\n"
        "heavy = [m for m in ('open_clip', 'timm', 'diffusers') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    from clipdistill.engine.commands import datafree as cli

    assert cli.DIVERSIFIERS == diversify.DIVERSIFIERS and cli.GENERATORS == generators.GENERATORS


def test_readme_data_free_commands_parse():
    # The README's data-free walk-through uses only arguments the commands accept.
    import shlex

    from clipdistill.engine.cli import build_parser

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    block = readme.split("### Data-free distillation", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    lines = [ln for ln in block.replace("\\\n", " ").splitlines() if ln.startswith("clipdistill ")]
    assert [ln.split()[1] for ln in lines] == ["convert-vqgan", "synthesize", "synthesize", "datafree-report",
                                               "distill", "eval", "export", "predict"]
    parser = build_parser()
    for line in lines:
        args = parser.parse_args(shlex.split(line)[1:])
        assert callable(args.func)
        if args.command == "synthesize":
            assert args.generator == "vqgan" and args.vqgan and args.augment == "vqgan-clip"
        if args.command == "distill":  # the overrides make a valid datafree run config
            from clipdistill.engine.commands.distill import run_config_from_args

            cfg = run_config_from_args(args)
            assert cfg.method == "datafree" and cfg.data.train == "syn/" and cfg.data.heldout == "held/"
        if args.command == "eval":
            assert args.domains and args.few_shot == 5 and args.checkpoint.endswith("best.safetensors")
