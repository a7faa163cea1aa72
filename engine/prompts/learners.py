"""Prompt learners over a frozen open_clip student: CoOp, CoCoOp, VPT-deep, MaPLe, IVLP/PromptSRC,
and PromptKD's student.

Each learner owns the frozen CLIP (``learner.clip``, every weight ``requires_grad=False``,
kept in eval mode) and a few small trainable tensors. Two methods give the engine what it
needs and nothing more:

- :meth:`PromptLearner.trainable_parameters` — name -> parameter, exactly what an optimizer
  should see (prompts, projections, meta-net, projector);
- :meth:`PromptLearner.state_to_save` / :meth:`PromptLearner.load_saved_state` — the
  learner's own state (trainable tensors and buffers such as batch-norm statistics), never
  the backbone's weights.

Shapes: B images, C classes (or the K selected names), D the joint embedding size, W a
tower's width, L the text context length. Class features come back L2-normalized; image
features from ``encode_image`` are unnormalized, as open_clip's.

Class names are tokenized once at construction. :meth:`class_features` takes
``class_indices`` (K,) to build and encode prompts for only those names: it gathers token
ids and context first, so the class-agnostic recipe never materializes prompts for the whole
vocabulary. All classes are encoded in one batched call per step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from clipdistill.engine.models.class_vectors import encode_class_names
from clipdistill.engine.models.clip import freeze, import_open_clip
from clipdistill.engine.models.towers import TextTower, check_vision_tower
from clipdistill.engine.models.towers import encode_image as _encode_image
from clipdistill.engine.parallel.batchnorm import RowBatchNorm2d, row_batch_norm
from clipdistill.kernels import kl_rows_reference

Tokenizer = Callable[[Sequence[str]], torch.Tensor]
PLACEHOLDER = "X"  # CoOp's stand-in word for a learned context token


@dataclass
class LearnerOutput:
    """What a learner's forward returns.

    logits: (B, C) scaled cosine similarities (student logit scale).
    image_features: (B, D) normalized.
    class_features: (C, D) normalized, or (B, C, D) for image-conditioned learners (CoCoOp).
    """

    logits: torch.Tensor
    image_features: torch.Tensor
    class_features: torch.Tensor


def scaled_logits(image_features: torch.Tensor, class_features: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """(B, D) x (C, D) or (B, C, D) normalized features -> (B, C) logits."""
    if class_features.dim() == 3:
        return logit_scale * torch.einsum("bd,bcd->bc", image_features, class_features)
    return logit_scale * image_features @ class_features.t()


# The frozen backbone's names in a learner's state_dict: never saved, it comes from its weights.
BACKBONE_PREFIX = "clip."


class PromptLearner(nn.Module):
    """Base: a frozen CLIP plus trainable prompt tensors defined by subclasses.

    What a distillation step needs to know about a learner is declared here, not found out
    with isinstance: ``class_vectors_per_image`` (class features (B, C, D), conditioned on each
    image: the logits are formed explicitly), ``scores_against_teacher`` (no class vectors of its
    own: features projected into the teacher's space, :meth:`project`, scored against the
    teacher's class vectors) and ``regularizers`` (names of the learner's own loss parts,
    :meth:`regularization`; they need the student's logits).
    """

    class_vectors_per_image: bool = False
    scores_against_teacher: bool = False
    regularizers: tuple[str, ...] = ()

    def __init__(self, clip: nn.Module):
        super().__init__()
        import_open_clip()
        self.clip = freeze(clip)
        self.clip.eval()

    def _follow_backbone_device(self) -> None:
        # Prompts are created on the CPU; put them (float32) where the backbone lives.
        self.to(self.clip.logit_scale.device)

    # -- what trains and what is saved -------------------------------------------------
    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        """Name -> parameter for every tensor the optimizer must update, and nothing else."""
        return {name: p for name, p in self.named_parameters() if not name.startswith(BACKBONE_PREFIX)}

    def state_to_save(self) -> dict[str, torch.Tensor]:
        """The learner's own state (trainable tensors and persistent buffers), backbone excluded."""
        return {k: v.detach().clone() for k, v in self.state_dict().items() if not k.startswith(BACKBONE_PREFIX)}

    def load_saved_state(self, state: dict[str, torch.Tensor]) -> None:
        """Load what :meth:`state_to_save` produced; every key must match."""
        expected = set(self.state_to_save())
        got = set(state)
        if expected != got:
            raise KeyError(
                f"saved learner state does not fit {type(self).__name__}: missing {sorted(expected - got)}, "
                f"unexpected {sorted(got - expected)}"
            )
        self.load_state_dict(dict(state), strict=False)

    def train(self, mode: bool = True) -> "PromptLearner":
        super().train(mode)
        self.clip.eval()  # the frozen backbone never runs dropout or patch dropout
        return self

    # -- features ------------------------------------------------------------------------
    @property
    def logit_scale(self) -> torch.Tensor:
        """The student's frozen logit scale, exp'd (about 100 for trained CLIPs)."""
        return self.clip.logit_scale.detach().exp()

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, D) unnormalized image features."""
        return self.clip.encode_image(images)

    def class_features(
        self, class_indices: Optional[torch.Tensor] = None, image_features: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """(C, D) normalized class features (or (B, C, D) for image-conditioned learners)."""
        raise NotImplementedError

    def regularization(self, images: torch.Tensor, output: LearnerOutput,
                       class_indices: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
        """The learner's own named, unweighted loss parts (one per :attr:`regularizers`) for
        ``output = self(images, class_indices)``; none by default."""
        return {}

    @property
    def needs_logits(self) -> bool:
        """The distillation loss must see explicit (B, C) logits (no fused shared-vector path)."""
        return self.class_vectors_per_image or bool(self.regularizers)

    def forward(self, images: torch.Tensor, class_indices: Optional[torch.Tensor] = None) -> LearnerOutput:
        image_features = F.normalize(self.encode_image(images), dim=-1)
        class_features = self.class_features(class_indices, image_features=image_features)
        return LearnerOutput(
            logits=scaled_logits(image_features, class_features, self.logit_scale),
            image_features=image_features,
            class_features=class_features,
        )


# ------------------------------------------------------------------------------- text side


class ClassNamePrompts(nn.Module):
    """Token ids of "<context> <name>." for every class, and the learned context.

    The context occupies positions 1..1+n_ctx. Without init words it is ``n_ctx`` placeholder
    words ("X X X X name.") replaced by learned vectors initialized N(0, 0.02²). With init
    words (e.g. "a photo of a") the prompt text is "a photo of a name." and the first
    ``n_ctx`` of its context tokens are learned, initialized from their token embeddings
    (``n_ctx=None``: all of them, as CoOp; fewer: the rest stay fixed words, as MaPLe).
    ``class_specific`` gives each class its own context (C, n_ctx, W).
    """

    def __init__(
        self,
        tower: TextTower,
        tokenizer: Tokenizer,
        class_names: Sequence[str],
        n_ctx: Optional[int] = 4,
        init_words: Optional[str] = None,
        class_specific: bool = False,
    ):
        super().__init__()
        if not class_names:
            raise ValueError("class_names is empty")
        self.class_names = list(class_names)
        if init_words:
            init_words = init_words.replace("_", " ").strip()
            init_tokens = tokenizer([init_words])[0]
            n_init = int((init_tokens.argmax() - 1).item())  # tokens between start and end-of-text
            if n_ctx is None:
                n_ctx = n_init
            if n_ctx > n_init:
                raise ValueError(f"n_ctx={n_ctx} but init words {init_words!r} give only {n_init} tokens")
            prefix = init_words
        else:
            n_ctx = 4 if n_ctx is None else n_ctx
            prefix = " ".join([PLACEHOLDER] * n_ctx)
        self.n_ctx = n_ctx
        texts = [f"{prefix} {name}.".strip() for name in self.class_names]
        self.register_buffer("token_ids", tokenizer(texts), persistent=False)  # (C, L)

        width = tower.width
        if n_ctx == 0:
            self.ctx = None
        elif init_words:
            with torch.no_grad():
                init = tower.token_embedding(init_tokens[1 : 1 + n_ctx].to(tower.token_embedding.weight.device))
            init = init.float().cpu()
            if class_specific:
                init = init.unsqueeze(0).repeat(len(self.class_names), 1, 1)
            self.ctx = nn.Parameter(init)
        else:
            shape = (len(self.class_names), n_ctx, width) if class_specific else (n_ctx, width)
            self.ctx = nn.Parameter(torch.randn(shape) * 0.02)
        self.class_specific = class_specific

    def gather(self, class_indices: Optional[torch.Tensor]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Token ids (K, L) and context ((n, W) or (K, n, W)) of the selected classes."""
        if class_indices is None:
            return self.token_ids, self.ctx
        class_indices = class_indices.to(self.token_ids.device)
        ctx = self.ctx[class_indices] if (self.ctx is not None and self.class_specific) else self.ctx
        return self.token_ids[class_indices], ctx

    def embeddings(
        self, tower: TextTower, tokens: torch.Tensor, ctx: Optional[torch.Tensor], shift: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """Token embeddings with the context in place.

        tokens (K, L); ctx (n, W) or (K, n, W); shift (B, W) adds an image-conditioned offset
        to the context (CoCoOp). Returns (K, L, W), or (B*K, L, W) with a shift.
        """
        embedded = tower.embed(tokens)  # (K, L, W)
        if ctx is None:
            if shift is not None:
                embedded = embedded.unsqueeze(0).expand(shift.shape[0], -1, -1, -1).flatten(0, 1)
            return embedded
        n = ctx.shape[-2]
        prefix, suffix = embedded[:, :1], embedded[:, 1 + n :]
        ctx = ctx.to(embedded.dtype)
        if shift is None:
            ctx = ctx.unsqueeze(0).expand(tokens.shape[0], -1, -1) if ctx.dim() == 2 else ctx
            return torch.cat([prefix, ctx, suffix], dim=1)
        batch, k = shift.shape[0], tokens.shape[0]
        ctx = ctx if ctx.dim() == 3 else ctx.unsqueeze(0).expand(k, -1, -1)  # (K, n, W)
        ctx = ctx.unsqueeze(0) + shift.to(embedded.dtype)[:, None, None, :]  # (B, K, n, W)
        prefix = prefix.unsqueeze(0).expand(batch, -1, -1, -1)
        suffix = suffix.unsqueeze(0).expand(batch, -1, -1, -1)
        return torch.cat([prefix, ctx, suffix], dim=2).flatten(0, 1)


class _TextPromptedLearner(PromptLearner):
    """Shared text path for learners whose class features come from learned text prompts."""

    def __init__(
        self,
        clip: nn.Module,
        tokenizer: Tokenizer,
        class_names: Sequence[str],
        n_ctx: Optional[int],
        init_words: Optional[str],
        class_specific: bool = False,
    ):
        super().__init__(clip)
        self.prompts = ClassNamePrompts(self.tower, tokenizer, class_names, n_ctx, init_words, class_specific)

    @property
    def tower(self) -> TextTower:
        # A view over self.clip's modules, rebuilt on access: never stale after .to() or a reload.
        return TextTower.of(self.clip)

    def deep_text_prompts(self) -> Sequence[Optional[torch.Tensor]]:
        """Per-layer text prompts for layers 1.. (index 0 unused); empty for shallow learners."""
        return ()

    def class_features(
        self, class_indices: Optional[torch.Tensor] = None, image_features: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        tower = self.tower
        tokens, ctx = self.prompts.gather(class_indices)
        features = tower.encode(self.prompts.embeddings(tower, tokens, ctx), tokens, self.deep_text_prompts())
        return F.normalize(features, dim=-1)


class CoOp(_TextPromptedLearner):
    """CoOp: learned text context (shared or class-specific) before each class name.

    Trainable: ``prompts.ctx`` ((n_ctx, W_text) or (C, n_ctx, W_text)).
    """

    def __init__(
        self,
        clip: nn.Module,
        tokenizer: Tokenizer,
        class_names: Sequence[str],
        n_ctx: Optional[int] = 4,
        init_words: Optional[str] = None,
        class_specific: bool = False,
    ):
        super().__init__(clip, tokenizer, class_names, n_ctx, init_words, class_specific)
        self._follow_backbone_device()


class CoCoOp(_TextPromptedLearner):
    """CoCoOp: CoOp's shared context shifted per image by a meta-network.

    meta-net: Linear(D, D // 16) -> ReLU -> Linear(D // 16, W_text), fed the normalized
    image features. Class features are (B, C, D); each step encodes B*C prompts in one call.
    Trainable: ``prompts.ctx`` and ``meta_net.*``.
    """

    class_vectors_per_image = True

    def __init__(
        self,
        clip: nn.Module,
        tokenizer: Tokenizer,
        class_names: Sequence[str],
        n_ctx: Optional[int] = 4,
        init_words: Optional[str] = None,
        meta_hidden_ratio: int = 16,
    ):
        super().__init__(clip, tokenizer, class_names, n_ctx, init_words, class_specific=False)
        embed_dim = self.clip.visual.output_dim
        hidden = max(1, embed_dim // meta_hidden_ratio)
        self.meta_net = nn.Sequential(
            nn.Linear(embed_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, self.tower.width)
        )
        self._follow_backbone_device()

    def class_features(
        self, class_indices: Optional[torch.Tensor] = None, image_features: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        if image_features is None:
            raise ValueError("CoCoOp conditions its prompts on images: pass image_features (B, D)")
        tower = self.tower
        tokens, ctx = self.prompts.gather(class_indices)
        batch, k = image_features.shape[0], tokens.shape[0]
        if ctx is None:  # no context to shift: the prompts do not depend on the image
            features = F.normalize(tower.encode(tower.embed(tokens), tokens), dim=-1)
            return features.unsqueeze(0).expand(batch, -1, -1)
        shift = self.meta_net(image_features)  # (B, W)
        embedded = self.prompts.embeddings(tower, tokens, ctx, shift=shift)  # (B*K, L, W)
        features = tower.encode(embedded, tokens.repeat(batch, 1))
        return F.normalize(features, dim=-1).view(batch, k, -1)


# ------------------------------------------------------------------------------ vision side


def _vpt_uniform(shape: tuple[int, ...], patch_size: tuple[int, int], width: int) -> torch.Tensor:
    # VPT's initialization: uniform with Xavier's bound over a patch's fan-in and the width.
    bound = math.sqrt(6.0 / float(3 * patch_size[0] * patch_size[1] + width))
    return torch.empty(shape).uniform_(-bound, bound)


PROMPT_PLACEMENTS = ("before_ln_pre", "after_ln_pre")
"""Where vision prompts join the image tokens (:func:`clipdistill.engine.models.towers.encode_image`)."""


def _before_ln_pre(prompt_placement: str) -> bool:
    if prompt_placement not in PROMPT_PLACEMENTS:
        raise ValueError(f"prompt_placement must be one of {PROMPT_PLACEMENTS}, got {prompt_placement!r}")
    return prompt_placement == "before_ln_pre"


def encode_deep_prompted(visual: nn.Module, images: torch.Tensor,
                         vision_prompts: Optional[torch.Tensor], before_ln_pre: bool = True) -> torch.Tensor:
    """The deep-vision-prompt learners' image path (VPT-deep, IVLP/PromptSRC, PromptKD's student).

    visual: open_clip ``VisionTransformer``; images (B, 3, H, W); vision_prompts
    (depth, n, W_vision), layer i's prompts at row i, or None (no prompts); ``before_ln_pre``:
    the first layer's prompts go through ``ln_pre`` (the published placement). Returns (B, D)
    unnormalized features. Also what the ZeRO-3 tuned teacher runs
    (:func:`clipdistill.engine.distributed.build_sharded_tuned_teacher`).
    """
    layers = list(vision_prompts.unbind(0)) if vision_prompts is not None else []
    return _encode_image(visual, images, layers, before_ln_pre=before_ln_pre)


class _FixedClassVectors:
    """Class features of fixed prompts through the frozen text tower, computed once per device."""

    def __init__(self, tokenizer: Tokenizer, class_names: Sequence[str], templates: Sequence[str]):
        self.tokenizer, self.class_names, self.templates = tokenizer, list(class_names), list(templates)
        self._cache: dict[torch.device, torch.Tensor] = {}

    def get(self, clip: nn.Module, class_indices: Optional[torch.Tensor]) -> torch.Tensor:
        device = clip.logit_scale.device
        if device not in self._cache:
            self._cache[device] = encode_class_names(
                clip.encode_text, self.tokenizer, self.class_names, self.templates, device=device
            )
        vectors = self._cache[device]
        return vectors if class_indices is None else vectors[class_indices.to(device)]


class VPTDeep(PromptLearner):
    """VPT-deep: n_tokens learned vision tokens at each of the first ``depth`` layers.

    Class features are the frozen text tower's features of fixed prompts (``templates``,
    default "a photo of a {}."), computed once. Trainable: ``vision_prompts`` (depth, n, W_vision).
    """

    def __init__(
        self,
        clip: nn.Module,
        tokenizer: Tokenizer,
        class_names: Sequence[str],
        n_tokens: int = 8,
        depth: int = 12,
        templates: Sequence[str] = ("a photo of a {}.",),
        prompt_placement: str = "before_ln_pre",
    ):
        super().__init__(clip)
        self.before_ln_pre = _before_ln_pre(prompt_placement)
        visual = self.clip.visual
        check_vision_tower(visual)
        if depth > len(visual.transformer.resblocks):
            raise ValueError(f"depth={depth} exceeds the vision tower's {len(visual.transformer.resblocks)} layers")
        width = visual.conv1.out_channels
        if n_tokens > 0 and depth > 0:
            self.vision_prompts = nn.Parameter(_vpt_uniform((depth, n_tokens, width), visual.patch_size, width))
        else:
            self.vision_prompts = None
        self.fixed = _FixedClassVectors(tokenizer, class_names, templates)
        self._follow_backbone_device()

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return encode_deep_prompted(self.clip.visual, images, self.vision_prompts, self.before_ln_pre)

    def class_features(
        self, class_indices: Optional[torch.Tensor] = None, image_features: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        return self.fixed.get(self.clip, class_indices)


class MaPLe(_TextPromptedLearner):
    """MaPLe: text prompts at the first ``depth`` layers, vision prompts made from them.

    Layer 0's text context is ``prompts.ctx`` (from init words, e.g. the first 2 tokens of
    "a photo of a"); layers 1..depth-1 have ``text_prompts`` (depth-1, n, W_text). Each
    layer's vision prompts are a learned linear projection W_text -> W_vision of that layer's
    text prompts (``projections[i]``), so the two branches stay coupled.
    Trainable: ``prompts.ctx``, ``text_prompts``, ``projections.*``.
    """

    def __init__(
        self,
        clip: nn.Module,
        tokenizer: Tokenizer,
        class_names: Sequence[str],
        n_ctx: int = 2,
        depth: int = 9,
        init_words: Optional[str] = "a photo of a",
        prompt_placement: str = "before_ln_pre",
    ):
        if n_ctx == 0 or depth == 0:
            n_ctx, depth, init_words = 0, 0, None
        super().__init__(clip, tokenizer, class_names, n_ctx, init_words)
        self.before_ln_pre = _before_ln_pre(prompt_placement)
        visual = self.clip.visual
        check_vision_tower(visual)
        layers = min(len(visual.transformer.resblocks), len(self.tower.transformer.resblocks))
        if depth > layers:
            raise ValueError(f"depth={depth} exceeds the towers' {layers} layers")
        text_width, vision_width = self.tower.width, visual.conv1.out_channels
        self.depth = depth
        self.text_prompts = nn.Parameter(torch.randn(depth - 1, n_ctx, text_width) * 0.02) if depth > 1 else None
        self.projections = nn.ModuleList(nn.Linear(text_width, vision_width) for _ in range(depth))
        self._follow_backbone_device()

    def _text_layers(self) -> list[torch.Tensor]:
        if self.depth == 0:
            return []
        return [self.prompts.ctx] + (list(self.text_prompts.unbind(0)) if self.text_prompts is not None else [])

    def deep_text_prompts(self) -> Sequence[Optional[torch.Tensor]]:
        return [None] + self._text_layers()[1:]

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        layers = [proj(p) for proj, p in zip(self.projections, self._text_layers())]
        return _encode_image(self.clip.visual, images, layers, before_ln_pre=self.before_ln_pre)


class IVLP(_TextPromptedLearner):
    """Independent vision-language prompting: deep text and deep vision prompts.

    Text: ``prompts.ctx`` at layer 0 (init words, e.g. "a photo of a") and ``text_prompts``
    (text_depth-1, n_text, W_text) for the next layers. Vision: ``vision_prompts``
    (vision_depth, n_vision, W_vision) from layer 0. Trainable: those three.
    """

    def __init__(
        self,
        clip: nn.Module,
        tokenizer: Tokenizer,
        class_names: Sequence[str],
        n_text_ctx: int = 4,
        text_depth: int = 9,
        n_vision_ctx: int = 4,
        vision_depth: int = 9,
        init_words: Optional[str] = "a photo of a",
        prompt_placement: str = "before_ln_pre",
    ):
        if n_text_ctx == 0 or text_depth == 0:
            n_text_ctx, text_depth, init_words = 0, 0, None
        super().__init__(clip, tokenizer, class_names, n_text_ctx, init_words)
        self.before_ln_pre = _before_ln_pre(prompt_placement)
        visual = self.clip.visual
        check_vision_tower(visual)
        if text_depth > len(self.tower.transformer.resblocks) or vision_depth > len(visual.transformer.resblocks):
            raise ValueError("prompt depth exceeds a tower's number of layers")
        text_width, vision_width = self.tower.width, visual.conv1.out_channels
        self.text_prompts = (
            nn.Parameter(torch.randn(text_depth - 1, n_text_ctx, text_width) * 0.02) if text_depth > 1 else None
        )
        self.vision_prompts = (
            nn.Parameter(torch.randn(vision_depth, n_vision_ctx, vision_width) * 0.02)
            if vision_depth > 0 and n_vision_ctx > 0
            else None
        )
        self._follow_backbone_device()

    def deep_text_prompts(self) -> Sequence[Optional[torch.Tensor]]:
        return [None] + list(self.text_prompts.unbind(0)) if self.text_prompts is not None else ()

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return encode_deep_prompted(self.clip.visual, images, self.vision_prompts, self.before_ln_pre)


PROMPTSRC_LOSS_WEIGHTS = {"scl_text": 25.0, "scl_image": 10.0, "scl_logits": 1.0}
"""PromptSRC's published weights for its self-regularizing terms (the engine may override)."""


class PromptSRC(IVLP):
    """PromptSRC: IVLP prompts, regularized towards the frozen model.

    :meth:`self_regularization` returns the named loss parts (unweighted):
    ``scl_image`` L1 between prompted and frozen image features, ``scl_text`` L1 between
    prompted class features and the frozen model's template-averaged class features,
    ``scl_logits`` KL(frozen || prompted) over classes, summed and divided by B*C.
    Default weights: :data:`PROMPTSRC_LOSS_WEIGHTS`. Gaussian aggregation of prompts over
    epochs: :class:`GaussianPromptAggregator`.
    """

    regularizers = tuple(PROMPTSRC_LOSS_WEIGHTS)

    def __init__(
        self,
        clip: nn.Module,
        tokenizer: Tokenizer,
        class_names: Sequence[str],
        n_text_ctx: int = 4,
        text_depth: int = 9,
        n_vision_ctx: int = 4,
        vision_depth: int = 9,
        init_words: Optional[str] = "a photo of a",
        templates: Sequence[str] = ("a photo of a {}.",),
        prompt_placement: str = "before_ln_pre",
    ):
        super().__init__(clip, tokenizer, class_names, n_text_ctx, text_depth, n_vision_ctx, vision_depth, init_words,
                         prompt_placement)
        self.frozen = _FixedClassVectors(tokenizer, class_names, templates)

    @torch.no_grad()
    def frozen_features(
        self, images: torch.Tensor, class_indices: Optional[torch.Tensor] = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The frozen model's normalized image features (B, D) and class features (C, D)."""
        return F.normalize(self.clip.encode_image(images), dim=-1), self.frozen.get(self.clip, class_indices)

    def self_regularization(
        self, images: torch.Tensor, output: LearnerOutput, class_indices: Optional[torch.Tensor] = None
    ) -> dict[str, torch.Tensor]:
        """Named, unweighted self-regularizing loss parts for ``output = self(images, class_indices)``."""
        frozen_image, frozen_text = self.frozen_features(images, class_indices)
        frozen_logits = self.logit_scale * frozen_image @ frozen_text.t()
        # KL(p_frozen || p_prompted), summed over images and classes, divided by B*C.
        kl = kl_rows_reference(output.logits, frozen_logits, forward_weight=1.0, reverse_weight=0.0)
        return {
            "scl_image": F.l1_loss(output.image_features, frozen_image),
            "scl_text": F.l1_loss(output.class_features, frozen_text),
            "scl_logits": kl.sum() / output.logits.numel(),
        }

    def regularization(self, images: torch.Tensor, output: LearnerOutput,
                       class_indices: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
        return self.self_regularization(images, output, class_indices)


class GaussianPromptAggregator:
    """PromptSRC's Gaussian prompt aggregation: a weighted average of the prompts over epochs.

    Epoch e (1-based) gets weight N(e; mean, std²), normalized over 1..n_epochs. Call
    :meth:`add` at the end of each epoch with ``learner.state_to_save()``; :meth:`result`
    is the aggregated state to load with ``learner.load_saved_state``. Integer buffers
    (batch-norm counters) are taken from the last epoch, not averaged.
    """

    def __init__(self, n_epochs: int, mean: float = 15.0, std: float = 1.0):
        if n_epochs < 1 or std <= 0:
            raise ValueError(f"need n_epochs >= 1 and std > 0, got {n_epochs}, {std}")
        epochs = torch.arange(1, n_epochs + 1, dtype=torch.float64)
        density = torch.exp(-0.5 * ((epochs - mean) / std) ** 2)
        if density.sum() == 0:
            raise ValueError(f"Gaussian (mean {mean}, std {std}) puts no weight on epochs 1..{n_epochs}")
        self.weights = (density / density.sum()).tolist()
        self._sum: dict[str, torch.Tensor] = {}

    @classmethod
    def over_run(cls, n_epochs: int, mean_fraction: float, std: float) -> "GaussianPromptAggregator":
        """The mean as a fraction of the run's epochs (0.75: the published 15 of 20), the std in epochs."""
        return cls(n_epochs, mean=mean_fraction * n_epochs, std=std)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The running weighted sum (what a checkpoint stores to resume the aggregation)."""
        return {k: v.clone() for k, v in self._sum.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self._sum = {k: v.clone() for k, v in state.items()}

    def add(self, state: dict[str, torch.Tensor], epoch: int) -> None:
        """Add the learner's ``state`` at the end of ``epoch`` (1-based) with that epoch's weight."""
        weight = self.weights[epoch - 1]
        for key, value in state.items():
            if not value.is_floating_point():
                self._sum[key] = value.detach().clone()
                continue
            term = value.detach().double() * weight
            self._sum[key] = self._sum[key] + term if key in self._sum else term

    def result(self) -> dict[str, torch.Tensor]:
        if not self._sum:
            raise RuntimeError("no epoch was added to the aggregator")
        return {k: v.float() if v.is_floating_point() else v for k, v in self._sum.items()}


# ------------------------------------------------------------------------------- PromptKD


class ConvBNProjector(nn.Module):
    """PromptKD's projector as published: 1x1 conv, batch norm, ReLU, 1x1 conv on (B, D) features.

    ``row_mask`` (B,) bool marks the real rows: padding rows do not enter the batch norm's
    statistics (:mod:`clipdistill.engine.batchnorm`).
    """

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: Optional[int] = None):
        super().__init__()
        hidden_dim = hidden_dim or out_dim
        self.layers = nn.Sequential(
            nn.Conv2d(in_dim, hidden_dim, kernel_size=1),
            RowBatchNorm2d(hidden_dim),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden_dim, out_dim, kernel_size=1),
        )

    def forward(self, features: torch.Tensor, row_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        conv_in, norm, act, conv_out = self.layers
        x = row_batch_norm(norm, conv_in(features[:, :, None, None]), row_mask)
        return conv_out(act(x)).flatten(1)


class LayerNormMLPProjector(nn.Module):
    """A variant without batch statistics: LayerNorm, Linear, GELU, Linear (works at batch 1)."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: Optional[int] = None):
        super().__init__()
        hidden_dim = hidden_dim or out_dim
        self.layers = nn.Sequential(
            nn.LayerNorm(in_dim), nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, out_dim)
        )

    def forward(self, features: torch.Tensor, row_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.layers(features)  # per-row normalization: padding rows affect nothing else


PROJECTORS = {"conv_bn": ConvBNProjector, "ln_mlp": LayerNormMLPProjector}


class PromptKDStudent(PromptLearner):
    """PromptKD's student: deep vision prompts and a projector into the teacher's space.

    No text tower is used: logits are against the teacher's class vectors (C, D_teacher).
    Trainable: ``vision_prompts`` (depth, n, W_vision) and ``projector.*``; the projector's
    batch-norm statistics are part of :meth:`state_to_save`.
    """

    scores_against_teacher = True

    def __init__(
        self,
        clip: nn.Module,
        teacher_dim: int,
        n_ctx: int = 4,
        depth: int = 9,
        projector: str = "conv_bn",
        hidden_dim: Optional[int] = None,
        prompt_placement: str = "before_ln_pre",
    ):
        super().__init__(clip)
        self.before_ln_pre = _before_ln_pre(prompt_placement)
        visual = self.clip.visual
        check_vision_tower(visual)
        if depth > len(visual.transformer.resblocks):
            raise ValueError(f"depth={depth} exceeds the vision tower's {len(visual.transformer.resblocks)} layers")
        if projector not in PROJECTORS:
            raise ValueError(f"projector must be one of {sorted(PROJECTORS)}, got {projector!r}")
        width = visual.conv1.out_channels
        self.vision_prompts = (
            nn.Parameter(torch.randn(depth, n_ctx, width) * 0.02) if depth > 0 and n_ctx > 0 else None
        )
        self.projector = PROJECTORS[projector](visual.output_dim, teacher_dim, hidden_dim)
        self._follow_backbone_device()

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, D_student) prompted features, before the projector."""
        return encode_deep_prompted(self.clip.visual, images, self.vision_prompts, self.before_ln_pre)

    def project(self, images: torch.Tensor, row_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, 3, H, W) -> (B, D_teacher) normalized features in the teacher's space.

        ``row_mask`` (B,) bool: the real rows, the only ones the projector's batch statistics
        are taken from in training (None: every row).
        """
        features = self.projector(self.encode_image(images).float(), row_mask)
        return F.normalize(features, dim=-1)

    def forward(self, images: torch.Tensor, class_vectors: torch.Tensor) -> LearnerOutput:  # type: ignore[override]
        """images (B, 3, H, W), teacher class vectors (C, D_teacher) normalized -> logits (B, C)."""
        image_features = self.project(images)
        class_vectors = class_vectors.to(image_features.dtype)
        return LearnerOutput(
            logits=scaled_logits(image_features, class_vectors, self.logit_scale),
            image_features=image_features,
            class_features=class_vectors,
        )
