"""Prompt learners: exact trainable sets, exact reproduction of open_clip with no prompts,
gradients to every prompt tensor and nothing else, gather-first class selection, saved state."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from clipdistill.engine import prompts as P  # the package re-exports every learner
from clipdistill.engine.models.towers import TextTower, encode_image

TEACHER_DIM = 48

# learner name -> (constructor, options with prompts, exact trainable names)
LEARNERS = {
    "coop": (P.CoOp, dict(n_ctx=4), {"prompts.ctx"}),
    "coop_class_specific": (P.CoOp, dict(n_ctx=3, class_specific=True), {"prompts.ctx"}),
    "cocoop": (
        P.CoCoOp,
        dict(n_ctx=4),
        {"prompts.ctx", "meta_net.0.weight", "meta_net.0.bias", "meta_net.2.weight", "meta_net.2.bias"},
    ),
    "vpt": (P.VPTDeep, dict(n_tokens=5, depth=2), {"vision_prompts"}),
    "maple": (
        P.MaPLe,
        dict(n_ctx=2, depth=3),
        {"prompts.ctx", "text_prompts"} | {f"projections.{i}.{p}" for i in range(3) for p in ("weight", "bias")},
    ),
    "ivlp": (P.IVLP, dict(n_text_ctx=4, text_depth=2, n_vision_ctx=3, vision_depth=3),
             {"prompts.ctx", "text_prompts", "vision_prompts"}),
    "promptsrc": (P.PromptSRC, dict(n_text_ctx=4, text_depth=3, n_vision_ctx=4, vision_depth=2),
                  {"prompts.ctx", "text_prompts", "vision_prompts"}),
    "promptkd": (
        P.PromptKDStudent,
        dict(n_ctx=4, depth=3),
        {"vision_prompts"} | {f"projector.layers.{i}.{p}" for i in (0, 1, 3) for p in ("weight", "bias")},
    ),
    "promptkd_ln_mlp": (
        P.PromptKDStudent,
        dict(n_ctx=2, depth=1, projector="ln_mlp", hidden_dim=40),
        {"vision_prompts"} | {f"projector.layers.{i}.{p}" for i in (0, 1, 3) for p in ("weight", "bias")},
    ),
}

# options with no prompt tokens (length or depth 0)
NO_PROMPTS = {
    "coop": (P.CoOp, dict(n_ctx=0)),
    "cocoop": (P.CoCoOp, dict(n_ctx=0)),
    "vpt_depth0": (P.VPTDeep, dict(n_tokens=8, depth=0)),
    "vpt_len0": (P.VPTDeep, dict(n_tokens=0, depth=3)),
    "maple_depth0": (P.MaPLe, dict(n_ctx=2, depth=0)),
    "maple_len0": (P.MaPLe, dict(n_ctx=0, depth=3)),
    "ivlp": (P.IVLP, dict(n_text_ctx=0, text_depth=0, n_vision_ctx=0, vision_depth=0)),
    "promptsrc": (P.PromptSRC, dict(n_text_ctx=4, text_depth=0, n_vision_ctx=4, vision_depth=0)),
    "promptkd": (P.PromptKDStudent, dict(n_ctx=4, depth=0)),
}


def build(cls, clip, tokenizer, class_names, **options):
    if cls is P.PromptKDStudent:
        return cls(clip, teacher_dim=TEACHER_DIM, **options)
    return cls(clip, tokenizer, class_names, **options)


def run(learner, images, class_indices=None):
    if isinstance(learner, P.PromptKDStudent):
        class_vectors = F.normalize(torch.randn(5, TEACHER_DIM, generator=torch.Generator().manual_seed(3)), dim=-1)
        return learner(images, class_vectors)
    return learner(images, class_indices)


@pytest.mark.parametrize("name", sorted(LEARNERS))
def test_trainable_set_is_exactly_the_prompts(name, student_clip, tokenizer, class_names):
    cls, options, expected = LEARNERS[name]
    learner = build(cls, student_clip, tokenizer, class_names, **options)
    trainable = learner.trainable_parameters()
    assert set(trainable) == expected
    assert all(p.requires_grad for p in trainable.values())
    trainable_ids = {id(p) for p in trainable.values()}
    others = [n for n, p in learner.named_parameters() if p.requires_grad and id(p) not in trainable_ids]
    assert others == []
    assert all(not p.requires_grad for p in learner.clip.parameters())
    saved = learner.state_to_save()
    assert not any(k.startswith("clip.") for k in saved)
    assert expected <= set(saved)


@pytest.mark.parametrize("name", sorted(LEARNERS))
def test_gradients_reach_every_prompt_tensor_and_nothing_else(name, student_clip, tokenizer, class_names, images):
    cls, options, _ = LEARNERS[name]
    # Seeded: CoCoOp's 2-unit meta-net can start with both ReLUs dead for some draws of the global
    # stream, which then depended on the tests run before this one.
    torch.manual_seed(0)
    learner = build(cls, student_clip, tokenizer, class_names, **options).train()
    output = run(learner, images)
    assert output.logits.shape == (3, 5) and torch.isfinite(output.logits).all()
    loss = F.cross_entropy(output.logits, torch.tensor([0, 3, 4]))
    if isinstance(learner, P.PromptSRC):
        loss = loss + sum(learner.self_regularization(images, output).values())
    loss.backward()
    for pname, parameter in learner.trainable_parameters().items():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, pname
        assert torch.isfinite(parameter.grad).all(), pname
    assert all(p.grad is None for p in learner.clip.parameters())


@pytest.mark.parametrize("name", sorted(NO_PROMPTS))
def test_no_prompt_tokens_reproduce_open_clip_exactly(name, student_clip, tokenizer, class_names, images):
    cls, options = NO_PROMPTS[name]
    learner = build(cls, student_clip, tokenizer, class_names, **options)
    reference = learner.clip  # open_clip's own forward on the very same (frozen) model
    with torch.no_grad():
        assert torch.equal(learner.encode_image(images), reference.encode_image(images))
        if isinstance(learner, P.PromptKDStudent):
            return
        expected_text = F.normalize(reference.encode_text(tokenizer([f"{n}." for n in class_names])), dim=-1)
        if isinstance(learner, P.VPTDeep):  # fixed prompts from its templates
            expected_text = F.normalize(reference.encode_text(tokenizer([f"a photo of a {n}." for n in class_names])), dim=-1)
        image_features = F.normalize(learner.encode_image(images), dim=-1)
        features = learner.class_features(image_features=image_features)
        if features.dim() == 3:  # CoCoOp: one set of class features per image
            for per_image in features:
                assert torch.equal(per_image, expected_text)
        elif isinstance(learner, P.VPTDeep):
            assert torch.allclose(features, expected_text, atol=1e-6)  # fixed prompts "a photo of a {}."
        else:
            assert torch.equal(features, expected_text)


def test_promptsrc_without_prompts_has_zero_self_regularization(student_clip, tokenizer, class_names, images):
    learner = P.PromptSRC(student_clip, tokenizer, class_names, n_text_ctx=0, text_depth=0, n_vision_ctx=0,
                          vision_depth=0, templates=("{}.",))
    with torch.no_grad():
        parts = learner.self_regularization(images, learner(images))
    assert set(parts) == {"scl_image", "scl_text", "scl_logits"}
    for value in parts.values():
        assert abs(value.item()) < 1e-6


@pytest.mark.parametrize("class_specific", [False, True])
def test_coop_from_a_photo_of_a_reproduces_open_clip_text(class_specific, student_clip, tokenizer, class_names):
    learner = P.CoOp(student_clip, tokenizer, class_names, n_ctx=None, init_words="a photo of a",
                     class_specific=class_specific)
    reference = learner.clip
    assert learner.prompts.n_ctx == 4
    expected = F.normalize(reference.encode_text(tokenizer([f"a photo of a {n}." for n in class_names])), dim=-1)
    with torch.no_grad():
        assert torch.equal(learner.class_features(), expected)
        # K selected names: compared with open_clip encoding the same K texts (same batch size)
        index = torch.tensor([4, 1])
        selected = tokenizer([f"a photo of a {class_names[i]}." for i in index.tolist()])
        assert torch.equal(learner.class_features(index), F.normalize(reference.encode_text(selected), dim=-1))


def test_maple_text_from_init_words_keeps_the_rest_of_the_phrase(student_clip, tokenizer, class_names):
    # MaPLe learns the first n_ctx tokens of "a photo of a"; the rest stay fixed words.
    learner = P.MaPLe(student_clip, tokenizer, class_names, n_ctx=2, depth=1, init_words="a photo of a")
    reference = learner.clip
    expected = F.normalize(reference.encode_text(tokenizer([f"a photo of a {n}." for n in class_names])), dim=-1)
    with torch.no_grad():
        assert torch.equal(learner.class_features(), expected)


@pytest.mark.parametrize("name", ["vpt", "maple", "ivlp", "promptkd"])
def test_vision_prompts_change_image_features(name, student_clip, tokenizer, class_names, images):
    cls, options, _ = LEARNERS[name]
    reference = copy.deepcopy(student_clip)
    learner = build(cls, student_clip, tokenizer, class_names, **options)
    with torch.no_grad():
        assert not torch.allclose(learner.encode_image(images), reference.encode_image(images))


def test_vision_prompts_with_avg_pooling_pool_only_image_tokens(student_clip, images):
    # With no prompts inserted, the prompted path equals open_clip's forward for 'avg' pooling too.
    student_clip.visual.pool_type = "avg"
    with torch.no_grad():
        assert torch.equal(encode_image(student_clip.visual, images, []), student_clip.visual(images))
        zeros = [torch.zeros(0, 64)]
        assert torch.equal(encode_image(student_clip.visual, images, zeros), student_clip.visual(images))


def _make_sequence_first(clip):
    for transformer in (clip.visual.transformer, clip.transformer):
        transformer.batch_first = False
        for block in transformer.resblocks:
            block.attn.batch_first = False
    return clip


def test_sequence_first_blocks_give_the_same_features(student_clip, tokenizer, class_names, images):
    torch.manual_seed(5)
    batch_first = P.IVLP(copy.deepcopy(student_clip), tokenizer, class_names, text_depth=2, vision_depth=2)
    seq_first = P.IVLP(_make_sequence_first(copy.deepcopy(student_clip)), tokenizer, class_names,
                       text_depth=2, vision_depth=2)
    seq_first.load_saved_state(batch_first.state_to_save())
    with torch.no_grad():
        a, b = batch_first(images), seq_first(images)
        assert torch.allclose(a.image_features, b.image_features, atol=1e-6)
        assert torch.allclose(a.class_features, b.class_features, atol=1e-6)
        # and with no prompts the sequence-first tower still matches open_clip's own (sequence-first) path
        plain = seq_first.clip
        assert torch.equal(encode_image(plain.visual, images, []), plain.encode_image(images))
        tokens = tokenizer(class_names)
        assert torch.equal(TextTower.of(plain).encode_tokens(tokens), plain.encode_text(tokens))


@pytest.mark.parametrize("name", ["coop_class_specific", "cocoop", "maple", "promptsrc"])
def test_selected_names_are_gathered_before_encoding(name, student_clip, tokenizer, class_names, images):
    cls, options, _ = LEARNERS[name]
    learner = build(cls, student_clip, tokenizer, class_names, **options)
    index = torch.tensor([3, 0, 2])
    with torch.no_grad():
        image_features = F.normalize(learner.encode_image(images), dim=-1)
        full = learner.class_features(image_features=image_features)
        selected = learner.class_features(index, image_features=image_features)
        out = learner(images, index)
    assert selected.shape[-2] == 3 and out.logits.shape == (3, 3)
    assert torch.allclose(selected, full[..., index, :], atol=1e-6)


def test_cocoop_encodes_one_set_of_class_features_per_image(student_clip, tokenizer, class_names, images):
    torch.manual_seed(0)  # the 2-unit meta-net's init: not whatever the tests before left in the global stream
    learner = P.CoCoOp(student_clip, tokenizer, class_names, n_ctx=4)
    with torch.no_grad():
        out = learner(images)
    assert out.class_features.shape == (3, 5, 32)
    assert not torch.allclose(out.class_features[0], out.class_features[1])


@pytest.mark.parametrize("name", sorted(LEARNERS))
def test_saved_state_round_trips(name, student_clip, tokenizer, class_names, images):
    cls, options, _ = LEARNERS[name]
    torch.manual_seed(11)
    source = build(cls, copy.deepcopy(student_clip), tokenizer, class_names, **options)
    source.train()
    with torch.no_grad():
        run(source, images)  # moves batch-norm statistics where there are any
    torch.manual_seed(12)
    target = build(cls, student_clip, tokenizer, class_names, **options)
    target.load_saved_state(source.state_to_save())
    source.eval(), target.eval()
    with torch.no_grad():
        assert torch.equal(run(source, images).logits, run(target, images).logits)
    with pytest.raises(KeyError, match="missing"):
        target.load_saved_state({})


def test_promptkd_state_holds_projector_buffers_and_train_mode_spares_the_backbone(student_clip):
    learner = P.PromptKDStudent(student_clip, teacher_dim=TEACHER_DIM, n_ctx=4, depth=2)
    state = learner.state_to_save()
    assert {"projector.layers.1.running_mean", "projector.layers.1.running_var",
            "projector.layers.1.num_batches_tracked"} <= set(state)
    learner.train()
    assert learner.projector.training and not learner.clip.training
    assert not any(m.training for m in learner.clip.modules())
    features = learner.project(torch.randn(4, 3, 32, 32))
    assert features.shape == (4, TEACHER_DIM)
    assert torch.allclose(features.norm(dim=-1), torch.ones(4), atol=1e-5)


def test_gaussian_prompt_aggregation():
    aggregator = P.GaussianPromptAggregator(n_epochs=5, mean=4.0, std=1.0)
    weights = torch.tensor(aggregator.weights)
    assert torch.isclose(weights.sum(), torch.tensor(1.0, dtype=weights.dtype))
    assert int(weights.argmax()) == 3
    states = [{"p": torch.randn(2, 3), "count": torch.tensor(e)} for e in range(1, 6)]
    for epoch, state in enumerate(states, start=1):
        aggregator.add(state, epoch)
    result = aggregator.result()
    expected = sum(w * s["p"].double() for w, s in zip(weights.tolist(), states)).float()
    assert torch.allclose(result["p"], expected, atol=1e-6)
    assert result["count"].item() == 5
    with pytest.raises(ValueError):
        P.GaussianPromptAggregator(n_epochs=0)


def test_depth_beyond_the_tower_is_refused(student_clip, tokenizer, class_names):
    with pytest.raises(ValueError, match="depth"):
        P.VPTDeep(student_clip, tokenizer, class_names, n_tokens=2, depth=4)
    with pytest.raises(ValueError, match="n_ctx"):
        P.CoOp(student_clip, tokenizer, class_names, n_ctx=6, init_words="a photo of a")


def test_gradient_checkpointing_gives_the_same_gradients(student_clip, tokenizer, class_names, images):
    torch.manual_seed(7)
    plain = P.IVLP(copy.deepcopy(student_clip), tokenizer, class_names, text_depth=2, vision_depth=2)
    checkpointed = P.IVLP(copy.deepcopy(student_clip), tokenizer, class_names, text_depth=2, vision_depth=2)
    checkpointed.load_saved_state(plain.state_to_save())
    checkpointed.clip.set_grad_checkpointing(True)
    for learner in (plain, checkpointed):
        learner(images).logits.logsumexp(-1).sum().backward()
    for name, parameter in plain.trainable_parameters().items():
        assert torch.allclose(parameter.grad, checkpointed.trainable_parameters()[name].grad, atol=1e-6), name


def test_build_learner_by_name(student_clip, tokenizer, class_names):
    learner = P.build_learner("maple", student_clip, tokenizer=tokenizer, class_names=class_names, n_ctx=2, depth=2)
    assert isinstance(learner, P.MaPLe)
    kd = P.build_learner("promptkd", copy.deepcopy(student_clip), teacher_dim=TEACHER_DIM, depth=1)
    assert isinstance(kd, P.PromptKDStudent)
    with pytest.raises(ValueError, match="choose one of"):
        P.build_learner("prefix-tuning", student_clip)
    with pytest.raises(ValueError, match="teacher_dim"):
        P.build_learner("promptkd", student_clip)


@pytest.mark.gpu
@pytest.mark.parametrize("name", sorted(LEARNERS))
def test_learners_live_where_the_backbone_lives(name, student_clip, tokenizer, class_names, cuda_device):
    cls, options, _ = LEARNERS[name]
    learner = build(cls, student_clip.to(cuda_device), tokenizer, class_names, **options)
    assert all(t.device.type == "cuda" for t in learner.state_to_save().values())
    output = run(learner, torch.randn(3, 3, 32, 32, device=cuda_device)) if not isinstance(
        learner, P.PromptKDStudent) else learner(torch.randn(3, 3, 32, 32, device=cuda_device),
                                                 F.normalize(torch.randn(5, TEACHER_DIM, device=cuda_device), dim=-1))
    assert torch.isfinite(output.logits).all()
