"""One distillation step's forward, as a module other trainers can call from their own loop.

    step = DistillStep(teacher, learner, teacher_class_vectors, recipe="kdpl")
    parts = step(teacher_images, student_images)       # dict of named scalar losses
    parts["loss"].backward()                            # the weighted sum of the parts
    optimizer = torch.optim.SGD(step.trainable_parameters().values(), lr=...)

Recipes (see ../shared/PAPERS.md):

- ``"kdpl"``: teacher logits z_t = s · n(f_t) n(V_t)ᵀ over the teacher's class
  vectors V_t (C, D_t), with the *student's* frozen logit scale s (KDPL does
  this); student logits z_s = s · n(f_s) n(V_s)ᵀ over the student's class
  vectors V_s (C, D_s) re-encoded from its learned prompts in one batched call;
  loss 0.5·KL(p_t‖p_s) + 0.5·KL(p_s‖p_t), temperature 1, batchmean. PromptSRC
  adds its self-regularizing parts (weighted). CoCoOp conditions its class
  vectors on each image (B, C, D_s), which the shared-class-vector kernel does
  not take, and PromptSRC needs the student's logits for its own KL term
  anyway: for these two the logits are formed explicitly and the same
  symmetric KL is computed on them (:func:`symmetric_kl_from_logits`).
- ``"kdpl"`` with ``top_k`` (KDPL's class-agnostic variant, recipe ``kdpl-ca``):
  the class vectors are a large vocabulary (V, D_t). Each step the teacher's
  probabilities over the whole vocabulary (with the student's logit scale),
  averaged over the batch's real rows (and all-reduced over ranks when
  torch.distributed is initialized, so every rank selects the same set), pick
  the top K by a stable descending sort: ties go to the lower vocabulary index,
  the same way every time. The student encodes prompts for those K names only
  (gathered first), and the symmetric KL runs over the K columns, each
  distribution renormalized over them. The indices stay on the device: no
  host synchronization.
- ``"promptkd"``: the student's projected features (B, D_t) against the
  teacher's stored class vectors, shared by both; forward KL(p_t‖p_s) with
  temperature T, T², "mean" reduction (sum / (B·C)), times ``kd_weight``.
- ``"datafree"``: the same shared-class-vector path for the data-free timm
  student (:mod:`clipdistill.engine.datafree.student`, its logit scale the
  teacher's): forward KL(p_t‖p_s), temperature T, T², batchmean; with
  ``feature_weight`` > 0 also that weight times the (row-weighted) mean of
  1 - cos(student feature, teacher image feature).

The teacher runs under no_grad; the only tensors that receive gradients are
the learner's :meth:`trainable_parameters`. Logit scales are read once at
construction (they are frozen), so a step never synchronizes with the host.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Literal, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn

from clipdistill.engine.prompts.learners import BACKBONE_PREFIX, PROMPTSRC_LOSS_WEIGHTS, PromptLearner
from clipdistill.kernels import kd_loss, kl_rows_reference

Recipe = Literal["kdpl", "promptkd", "datafree"]
# Recipes whose student scores images against the teacher's class vectors (no class vectors of its own).
TEACHER_SPACE_RECIPES = ("promptkd", "datafree")


def symmetric_kl_from_logits(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    forward_weight: float = 0.5,
    reverse_weight: float = 0.5,
    temperature: float = 1.0,
    row_weights: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """forward·KL(p_t‖p_s) + reverse·KL(p_s‖p_t) on explicit (B, C) logits, batchmean over weighted rows.

    Only for learners whose class vectors differ per image (CoCoOp); every other
    path uses the fused :func:`clipdistill.kernels.kd_loss`.
    """
    rows = kl_rows_reference(student_logits.float() / temperature, teacher_logits.float() / temperature,
                             forward_weight=forward_weight, reverse_weight=reverse_weight)
    if row_weights is None:
        return rows.mean()
    w = row_weights.to(rows.dtype)
    return (w * rows).sum() / w.sum()


def _frozen_parts_are_not_missing(step: "DistillStep", incompatible) -> None:
    frozen = (step._state_prefix + "teacher.", step._state_prefix + "student." + BACKBONE_PREFIX)
    incompatible.missing_keys[:] = [key for key in incompatible.missing_keys if not key.startswith(frozen)]


class DistillStep(nn.Module):
    """Teacher + prompt learner + the recipe's loss: images in, named loss parts out.

    Args:
        teacher: a frozen :class:`clipdistill.engine.models.Teacher` (anything with
            ``encode_image(images) -> (B, D_t)`` and a ``logit_scale``).
        student: a prompt learner from :mod:`clipdistill.engine.prompts`.
        teacher_class_vectors: (C, D_t) normalized teacher text features of the class names.
        recipe: ``"kdpl"`` or ``"promptkd"`` (see the module docstring).
        temperature, forward_weight, reverse_weight, reduction, temperature_squared:
            kd_loss's options; ``None`` takes the recipe's published value.
        kd_weight: multiplier of the distillation term (PromptKD: 1000).
        promptsrc_weights: weights of PromptSRC's self-regularizing parts
            (default :data:`PROMPTSRC_LOSS_WEIGHTS`).
        loss_backend: kd_loss's backend ("auto", "triton", "torch").
        top_k: class-agnostic KDPL: distill each batch on the teacher's top K of the
            ``teacher_class_vectors`` vocabulary (see the module docstring).
        feature_weight: ``"datafree"``: weight of the feature-alignment part (0: none).
    """

    def __init__(
        self,
        teacher: nn.Module,
        student: PromptLearner,
        teacher_class_vectors: torch.Tensor,
        *,
        recipe: Recipe = "kdpl",
        temperature: Optional[float] = None,
        forward_weight: Optional[float] = None,
        reverse_weight: Optional[float] = None,
        reduction: Optional[str] = None,
        temperature_squared: Optional[bool] = None,
        kd_weight: float = 1.0,
        promptsrc_weights: Optional[Mapping[str, float]] = None,
        loss_backend: str = "auto",
        top_k: Optional[int] = None,
        feature_weight: float = 0.0,
    ):
        super().__init__()
        if recipe not in ("kdpl", "promptkd", "datafree"):
            raise ValueError(f"recipe must be 'kdpl', 'promptkd' or 'datafree', got {recipe!r}")
        if teacher_class_vectors.dim() != 2:
            raise ValueError(f"teacher_class_vectors must be (C, D_t), got shape {tuple(teacher_class_vectors.shape)}")
        if recipe in TEACHER_SPACE_RECIPES and not student.scores_against_teacher:
            raise ValueError(f"recipe {recipe!r} needs a student scored against the teacher's class vectors "
                             f"(PromptKDStudent, the data-free TimmStudent), got {type(student).__name__}")
        if feature_weight and recipe != "datafree":
            raise ValueError(f"feature_weight belongs to the 'datafree' recipe, not {recipe!r}")
        if recipe == "kdpl" and student.scores_against_teacher:
            raise ValueError(f"recipe 'kdpl' needs a learner with its own class vectors, not {type(student).__name__}")
        if top_k is not None:
            if recipe != "kdpl":
                raise ValueError(f"top_k (class-agnostic selection) belongs to the 'kdpl' recipe, not {recipe!r}")
            if not 1 <= top_k <= teacher_class_vectors.shape[0]:
                raise ValueError(f"top_k={top_k} must be between 1 and the vocabulary size "
                                 f"{teacher_class_vectors.shape[0]}")
        self.top_k = top_k
        self.last_selection: Optional[torch.Tensor] = None  # (K,) vocabulary ids of the last step
        self.teacher = teacher
        self.student = student
        self.recipe = recipe
        self.register_buffer("teacher_class_vectors", teacher_class_vectors.detach().float(), persistent=False)
        published = {
            "kdpl": dict(temperature=1.0, forward_weight=0.5, reverse_weight=0.5, reduction="batchmean",
                         temperature_squared=False),
            "promptkd": dict(temperature=1.0, forward_weight=1.0, reverse_weight=0.0, reduction="mean",
                             temperature_squared=True),
            "datafree": dict(temperature=1.0, forward_weight=1.0, reverse_weight=0.0, reduction="batchmean",
                             temperature_squared=True),
        }[recipe]
        self.feature_weight = float(feature_weight)
        given = dict(temperature=temperature, forward_weight=forward_weight, reverse_weight=reverse_weight,
                     reduction=reduction, temperature_squared=temperature_squared)
        self.loss_options = {k: (published[k] if v is None else v) for k, v in given.items()}
        self.kd_weight = float(kd_weight)
        self.loss_backend = loss_backend
        self.promptsrc_weights = dict(PROMPTSRC_LOSS_WEIGHTS if promptsrc_weights is None else promptsrc_weights)
        if student.regularizers:
            unknown = set(self.promptsrc_weights) - set(student.regularizers)
            if unknown:
                raise ValueError(f"promptsrc_weights has unknown parts {sorted(unknown)}; "
                                 f"known: {sorted(student.regularizers)}")
        # Frozen scales, read once: no host synchronization inside a step.
        self.student_logit_scale = float(student.logit_scale)
        self.teacher_logit_scale = float(teacher.logit_scale)
        self._state_prefix = ""  # where this step sits in the state dict being loaded
        self.register_load_state_dict_post_hook(_frozen_parts_are_not_missing)
        if teacher_class_vectors.shape[1] != self._teacher_dim():
            raise ValueError(
                f"teacher_class_vectors have dimension {teacher_class_vectors.shape[1]} but the teacher's "
                f"image features have {self._teacher_dim()}"
            )

    def _teacher_dim(self) -> int:
        if getattr(self.teacher, "output_dim", None) is not None:  # e.g. the teacher cache's stand-in
            return int(self.teacher.output_dim)
        model = getattr(self.teacher, "model", self.teacher)
        return int(getattr(model.visual, "output_dim", self.teacher_class_vectors.shape[1]))

    # -- what trains ----------------------------------------------------------------------
    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        """Exactly the tensors an optimizer should update (the learner's prompts, projector...)."""
        return self.student.trainable_parameters()

    def state_to_save(self) -> dict[str, torch.Tensor]:
        return self.student.state_to_save()

    def load_saved_state(self, state: Mapping[str, torch.Tensor]) -> None:
        self.student.load_saved_state(dict(state))

    # The frozen parts (the teacher, the student's backbone) come from their weights, never from a
    # checkpoint. state_dict() holds the learner's own state only (state_to_save's tensors), under
    # the names nn.Module gives them ("student.<key>"), so a trainer that embeds this step
    # (Lightning, Hugging Face) checkpoints the prompts, not the backbones; load_state_dict() does
    # not miss the frozen parts, and a full state dict (an older checkpoint) still loads.
    def state_dict(self, *args, destination=None, prefix: str = "", keep_vars: bool = False):
        if args:  # nn.Module's deprecated positional form: destination, prefix, keep_vars
            destination, prefix, keep_vars = (list(args) + [destination, prefix, keep_vars][len(args):])[:3]
        own = self.student.state_dict(prefix=prefix + "student.", keep_vars=keep_vars)
        frozen = prefix + "student." + BACKBONE_PREFIX
        if destination is None:
            destination = OrderedDict()
            destination._metadata = OrderedDict()
        if hasattr(destination, "_metadata"):
            destination._metadata.update(getattr(own, "_metadata", {}))
        destination.update((key, value) for key, value in own.items() if not key.startswith(frozen))
        return destination

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        self._state_prefix = prefix
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def train(self, mode: bool = True) -> "DistillStep":
        super().train(mode)
        self.teacher.train(False)
        return self

    # -- class-agnostic selection -----------------------------------------------------------
    @torch.no_grad()
    def select_classes(self, teacher_features: torch.Tensor,
                       row_weights: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(K,) int64 vocabulary ids: the top K of the teacher's batch-mean probabilities.

        Rows with weight 0 (padding) do not vote. Ties resolve to the lower id (stable sort).
        """
        logits = self.student_logit_scale * (
            F.normalize(teacher_features.float(), dim=-1) @ self.teacher_class_vectors.t()
        )
        probs = logits.softmax(dim=-1)  # (B, V)
        if row_weights is None:
            weights = torch.ones(probs.shape[0], device=probs.device)
        else:
            weights = row_weights.to(device=probs.device, dtype=probs.dtype)
        votes = torch.cat([weights @ probs, weights.sum().view(1)])  # (V + 1,): weighted sum, count
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(votes)
        mean = votes[:-1] / votes[-1].clamp_min(1e-12)
        order = torch.sort(mean, descending=True, stable=True).indices
        return order[: self.top_k]

    # -- the step -------------------------------------------------------------------------
    def forward(
        self,
        teacher_images: torch.Tensor,
        student_images: Optional[torch.Tensor] = None,
        row_weights: Optional[torch.Tensor] = None,
        *,
        teacher_features: Optional[torch.Tensor] = None,
        row_mask: Optional[torch.Tensor] = None,
    ) -> dict[str, torch.Tensor]:
        """Named loss parts for one batch.

        Args:
            teacher_images: (B, 3, H_t, W_t) at the teacher's resolution and normalization
                (ignored when ``teacher_features`` is given).
            student_images: (B, 3, H_s, W_s) the same views for the student; defaults to
                ``teacher_images`` (same model family, same preprocessing).
            row_weights: (B,) non-negative; 0 masks padded rows.
            teacher_features: (B, D_t) precomputed teacher image features (teacher cache).
            row_mask: (B,) bool, the real rows: the only ones that vote in the class-agnostic
                top-K and enter batch statistics (PromptKD's batch-norm projector). Default:
                ``row_weights > 0``, or every row. Pass it alone (``row_weights`` None) for a
                batch of padding only, whose loss the caller then discards.

        Returns:
            dict of scalar fp32 tensors: ``"kd"`` (the weighted distillation term), any
            learner-specific parts (PromptSRC's ``scl_*``, weighted), and ``"loss"``, their sum.
        """
        if student_images is None:
            student_images = teacher_images
        if teacher_features is None:
            with torch.no_grad():
                teacher_features = self.teacher.encode_image(teacher_images)
        teacher_features = teacher_features.detach()
        opts = self.loss_options
        if row_mask is None and row_weights is not None:
            row_mask = row_weights > 0
        class_indices = None
        teacher_vectors = self.teacher_class_vectors
        if self.top_k is not None:
            votes = row_weights if row_weights is not None else row_mask
            class_indices = self.select_classes(teacher_features, votes)
            teacher_vectors = teacher_vectors.index_select(0, class_indices)
            self.last_selection = class_indices
        parts: dict[str, torch.Tensor] = {}
        if self.recipe in TEACHER_SPACE_RECIPES:
            student_features = self.student.project(student_images, row_mask)
            parts["kd"] = self.kd_weight * kd_loss(
                student_features, teacher_features.to(student_features.dtype),
                self.teacher_class_vectors.to(student_features.dtype),
                logit_scale=self.student_logit_scale, teacher_logit_scale=self.teacher_logit_scale,
                row_weights=row_weights, backend=self.loss_backend, **opts,
            )
            if self.feature_weight:
                distance = 1.0 - F.cosine_similarity(student_features.float(), teacher_features.float(), dim=-1)
                if row_weights is None:
                    parts["feature"] = self.feature_weight * distance.mean()
                else:
                    w = row_weights.to(distance.dtype)
                    parts["feature"] = self.feature_weight * (w * distance).sum() / w.sum().clamp_min(1e-12)
        elif self.student.needs_logits:
            output = self.student(student_images, class_indices)
            teacher_logits = self.student_logit_scale * (
                F.normalize(teacher_features.float(), dim=-1) @ teacher_vectors.t()
            )
            if opts["reduction"] != "batchmean" or opts["temperature_squared"]:
                raise ValueError(f"{type(self.student).__name__} supports the KDPL loss (batchmean, no T²) only")
            parts["kd"] = self.kd_weight * symmetric_kl_from_logits(
                output.logits, teacher_logits, forward_weight=opts["forward_weight"],
                reverse_weight=opts["reverse_weight"], temperature=opts["temperature"], row_weights=row_weights,
            )
            for name, value in self.student.regularization(student_images, output, class_indices).items():
                weight = self.promptsrc_weights.get(name, 0.0)
                if weight:
                    parts[name] = weight * value
        else:
            image_features = self.student.encode_image(student_images)
            class_features = self.student.class_features(class_indices)
            parts["kd"] = self.kd_weight * kd_loss(
                image_features, teacher_features.to(image_features.dtype),
                teacher_vectors.to(image_features.dtype),
                student_class_vectors=class_features.to(image_features.dtype),
                logit_scale=self.student_logit_scale, teacher_logit_scale=self.student_logit_scale,
                row_weights=row_weights, backend=self.loss_backend, **opts,
            )
        parts = {k: v.float() for k, v in parts.items()}
        parts["loss"] = torch.stack(list(parts.values())).sum()
        return parts
