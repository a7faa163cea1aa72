r"""The data-free student: a small timm image network distilled from the teacher on a synthetic set.

The student is a timm backbone (ResNet-18, a MobileNet, ...; built with ``pretrained=False``, then
optionally initialized from a local weights file) whose pooled features go through a linear head
into the teacher's joint embedding space (D_t). Its logits are cosine similarities to the teacher's
class vectors (C, D_t), scaled by the teacher's logit scale: at deployment it classifies with no text
encoder, and the teacher's vectors for other class names can be swapped in.

It is trained by the engine's own loop (``clipdistill distill --recipe datafree``): to the trainer,
the distillation step, export and evaluation it is a learner like PromptKD's student, one that
"scores against the teacher" (:attr:`TimmStudent.scores_against_teacher`): :meth:`project` gives
its normalized features in the teacher's space, and the fused ``kd_loss`` takes them with the
teacher's class vectors. Unlike a prompt learner nothing in it is frozen: every parameter trains,
and :meth:`state_to_save` is the whole network (backbone, head and batch-norm statistics) plus the
logit scale it scores with.

Loss (recipe ``datafree``, :class:`~clipdistill.engine.distill.step.DistillStep`): KL(p_t || p_s) over
the C classes with temperature T and T², batchmean; optionally ``loss.feature_weight`` times
mean(1 - cos(student, teacher image feature)). *Choices where the paper is silent* (its losses and
student architectures were not retrievable): the forward KL on the teacher's logits over the class
vectors (no labels to mix in), both sides at the teacher's logit scale, the optional feature term,
AdamW with a cosine schedule, random resized crops (scale 0.5-1) and flips of the synthetic images.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from clipdistill.engine.io import image_spec
from clipdistill.engine.models.clip import import_open_clip
from clipdistill.engine.prompts.learners import LearnerOutput, scaled_logits

KIND = "timm"  # learner.kind of the data-free student


def import_timm():
    import_open_clip()  # timm imports torchvision: apply the CPU-only measure first
    import timm

    return timm


def build_timm_backbone(name: str, weights: Optional[str] = None) -> nn.Module:
    """A timm image network without its classifier (``num_classes=0``: pooled features out).

    ``weights``: a local ``.safetensors`` file of that network's tensors (a classifier in it is
    ignored), or None for a random init. Nothing is downloaded.
    """
    timm = import_timm()
    try:
        backbone = timm.create_model(name, pretrained=False, num_classes=0)
    except RuntimeError as exc:  # timm: "Unknown model (...)"
        raise ValueError(f"student.name {name!r} is not a timm model ({exc})") from exc
    if weights is not None:
        try:
            state = load_file(weights)
        except Exception as exc:  # safetensors' own error types: a file that is not safetensors
            raise ValueError(f"student.weights {weights!r} cannot be read as safetensors ({exc})") from exc
        own = backbone.state_dict()
        wrong = [f"{k} {tuple(v.shape)} here, {tuple(own[k].shape)} in {name!r}" for k, v in state.items()
                 if k in own and tuple(v.shape) != tuple(own[k].shape)]
        missing = [k for k in own if k not in state]
        if wrong or missing:
            raise ValueError(f"student.weights {weights!r} does not fit timm {name!r}: "
                             + "; ".join(wrong[:3] + ([f"missing {missing[:5]}"] if missing else [])))
        backbone.load_state_dict(state, strict=False)  # a classifier in the file is not part of the network
    return backbone


def timm_image_spec(backbone: nn.Module, image_size: Optional[int] = None) -> tuple[int, tuple, tuple]:
    """(side, mean, std) of a timm network's input: its pretrained config's, ``image_size`` overriding the side."""
    config = import_timm().data.resolve_data_config({}, model=backbone)
    side = int(image_size) if image_size is not None else int(config["input_size"][-1])
    return side, tuple(float(v) for v in config["mean"]), tuple(float(v) for v in config["std"])


class TimmStudent(nn.Module):
    """A timm backbone and a linear head into the teacher's space; every parameter trains.

    Args:
        backbone: a timm network built with ``num_classes=0`` (:func:`build_timm_backbone`).
        teacher_dim: D_t, the teacher's embedding size (the head's output).
        image_size: the student's input side (default: the network's own, e.g. 224).
        logit_scale: the scale of its cosine logits; the builder sets the teacher's (a buffer,
            saved with the state, so an exported student scores as it was trained).

    ``project(images (B, 3, S, S) normalized with :attr:`image_mean`/:attr:`image_std`)`` ->
    (B, D_t) normalized features; ``forward(images, class_vectors (C, D_t))`` -> logits (B, C).
    """

    class_vectors_per_image = False
    scores_against_teacher = True
    regularizers: tuple[str, ...] = ()
    needs_logits = False

    def __init__(self, backbone: nn.Module, teacher_dim: int, image_size: Optional[int] = None,
                 logit_scale: float = 100.0):
        super().__init__()
        self.backbone = backbone
        width = getattr(backbone, "head_hidden_size", None) or backbone.num_features
        self.head = nn.Linear(int(width), int(teacher_dim))
        self.register_buffer("scale", torch.tensor(float(logit_scale)))
        self.image_size, self.image_mean, self.image_std = timm_image_spec(backbone, image_size)
        self.backbone_name = getattr(backbone, "default_cfg", {}).get("architecture") or type(backbone).__name__

    # -- what trains and what is saved: everything ----------------------------------------
    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        return dict(self.named_parameters())

    def state_to_save(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.state_dict().items()}

    def load_saved_state(self, state: dict[str, torch.Tensor]) -> None:
        expected, got = set(self.state_dict()), set(state)
        if expected != got:
            raise KeyError(f"saved state does not fit the data-free student ({self.backbone_name}): missing "
                           f"{sorted(expected - got)[:5]}, unexpected {sorted(got - expected)[:5]}")
        self.load_state_dict(dict(state), strict=True)

    # -- features ---------------------------------------------------------------------------
    @property
    def logit_scale(self) -> torch.Tensor:
        return self.scale.detach()

    def image_spec(self) -> tuple[int, tuple, tuple]:
        return self.image_size, self.image_mean, self.image_std

    @property
    def output_dim(self) -> int:
        return int(self.head.out_features)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, width) pooled backbone features."""
        return self.backbone(images)

    def project(self, images: torch.Tensor, row_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, 3, S, S) -> (B, D_t) normalized features in the teacher's space.

        ``row_mask`` (B,) bool, the real rows: in training, only they pass through the backbone
        (its batch norm takes statistics of real images only); padding rows get zero features,
        and their loss weight is 0. Given only for a batch with padding (the end of an epoch).
        """
        if row_mask is not None and self.training:
            rows = row_mask.nonzero().squeeze(1)  # one host sync, for a masked batch only
            if 0 < rows.numel() < images.shape[0]:
                real = self.head(self._encode_training(images.index_select(0, rows)).float())
                features = real.new_zeros(images.shape[0], real.shape[1]).index_copy(0, rows, real)
                return F.normalize(features, dim=-1)
        return F.normalize(self.head(self._encode_training(images).float()), dim=-1)

    def _encode_training(self, images: torch.Tensor) -> torch.Tensor:
        """:meth:`encode_image`; a single image in training (an epoch's last batch, one shot) passes with
        batch norm on its running statistics, since a batch norm over a 1x1 map of one image has no
        statistics to take (torch refuses it)."""
        if not (self.training and images.shape[0] == 1):
            return self.encode_image(images)
        norms = [m for m in self.backbone.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
        for m in norms:
            m.eval()
        try:
            return self.encode_image(images)
        finally:
            for m in norms:
                m.train()

    def forward(self, images: torch.Tensor, class_vectors: torch.Tensor) -> LearnerOutput:
        image_features = self.project(images)
        class_vectors = class_vectors.to(image_features.dtype)
        return LearnerOutput(logits=scaled_logits(image_features, class_vectors, self.logit_scale),
                             image_features=image_features, class_features=class_vectors)


def student_image_spec(learner: nn.Module) -> tuple[int, tuple, tuple]:
    """(side, mean, std) of any student's input: the data-free student's own, a prompt learner's CLIP's."""
    return learner.image_spec() if isinstance(learner, TimmStudent) else image_spec(learner.clip)


def module_device(module: nn.Module) -> torch.device:
    """Where a student's tensors live (its first parameter or buffer)."""
    for tensor in (*module.parameters(), *module.buffers()):
        return tensor.device
    return torch.device("cpu")


def build_datafree_student(name: str, weights: Optional[str], teacher_dim: int, *, logit_scale: float = 100.0,
                           image_size: Optional[int] = None) -> TimmStudent:
    """The data-free student from plain arguments (the builder's, export's and evaluation's one way)."""
    return TimmStudent(build_timm_backbone(name, weights), teacher_dim, image_size=image_size,
                       logit_scale=logit_scale)
