r"""A lightweight, non-CLIP student distilled from the teacher on a synthetic set.

The student is a small image network from timm (ResNet-18, a MobileNet, ...; built with
``pretrained=False``, or from a local weights file) whose pooled features go through a linear head
into the teacher's joint embedding space (D). Its logits are cosine similarities to the teacher's
class vectors (C, D), which stay fixed buffers: at deployment it classifies the classes it was
distilled for with no text encoder, and new class vectors from the teacher can be swapped in.

Loss, per batch of synthetic images (teacher and student see the same augmented view, each resized
to its own input side and normalized with its own mean/std):

    kd      = KL(p_t || p_s) over the C classes, p = softmax(scale * cos(feature, class vectors) / T),
              batch mean, T^2 factor; ``kd_loss(..., forward_weight=1, reverse_weight=0)``
    feature = mean_i (1 - cos(student_i, teacher_i))   (optional, weight ``feature_weight``)

*Choices where the paper is silent (its student architectures and losses were not retrievable):*
the forward KL on the teacher's logits over the class vectors (the data-free setting has no labels
to mix in); both distributions use the teacher's logit scale; the optional feature term aligns the
head's output with the teacher's image embedding, which can help the student on classes or prompts
beyond the distilled ones; AdamW with a cosine schedule, random resized crops (scale 0.5-1) and
flips of the synthetic images.

Evaluation (:func:`agreement`): top-1 agreement of the student with the teacher, the mean
KL(teacher || student), and each one's agreement with the class an image was synthesized for, on a
held-out synthetic set. Checkpoints
are written with :func:`clipdistill.engine.checkpoint.save_checkpoint` (safetensors + JSON, no
pickle) and read back with :func:`load_student`.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from tqdm.auto import tqdm

from clipdistill.engine.datafree.generators import resize_to, teacher_image_features, teacher_input_spec
from clipdistill.engine.distill.metrics import AgreementTally, TopOneTally
from clipdistill.engine.models.clip import import_open_clip
from clipdistill.engine.training.checkpoint import (CheckpointError, latest_checkpoint, load_checkpoint,
                                                    save_checkpoint)
from clipdistill.engine.training.loop import OptimizerCore, make_optimizer
from clipdistill.kernels.kd_loss import kd_loss

log = logging.getLogger(__name__)

CHECKPOINT_KIND = "clipdistill-datafree-student/1"


def _import_timm():
    import_open_clip()  # timm imports torchvision: apply the CPU-only measure first
    import timm

    return timm


class DataFreeStudent(nn.Module):
    """A timm backbone, a linear head into the teacher's space and fixed class vectors.

    ``forward(images (B, 3, H, W) in [0, 1])`` -> features (B, D), unnormalized;
    :meth:`logits` -> (B, C) scaled cosine similarities to the class vectors.
    """

    def __init__(
        self,
        backbone: str,
        class_vectors: torch.Tensor,
        *,
        image_size: int = 224,
        logit_scale: float = 100.0,
        backbone_weights: Optional[str] = None,
    ):
        super().__init__()
        timm = _import_timm()
        self.backbone_name = backbone
        self.backbone = timm.create_model(backbone, pretrained=False, num_classes=0)
        if backbone_weights is not None:
            missing, unexpected = self.backbone.load_state_dict(load_file(backbone_weights), strict=False)
            if missing:
                raise RuntimeError(f"{backbone_weights} does not fit timm {backbone!r}: missing {missing[:5]}")
        width = getattr(self.backbone, "head_hidden_size", None) or self.backbone.num_features
        embed_dim = class_vectors.shape[1]
        self.head = nn.Linear(width, embed_dim)
        self.register_buffer("class_vectors", F.normalize(class_vectors.detach().float(), dim=-1).clone())
        data_config = timm.data.resolve_data_config({}, model=self.backbone)
        self.register_buffer("mean", torch.tensor(data_config["mean"]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(data_config["std"]).view(1, 3, 1, 1), persistent=False)
        self.image_size = int(image_size)
        self.logit_scale = float(logit_scale)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = (resize_to(images, self.image_size) - self.mean) / self.std
        return self.head(self.backbone(x))

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        features = F.normalize(self.forward(images), dim=-1)
        return self.logit_scale * features @ self.class_vectors.t()

    def config(self) -> dict:
        return {"backbone": self.backbone_name, "image_size": self.image_size, "logit_scale": self.logit_scale,
                "n_classes": int(self.class_vectors.shape[0]), "embed_dim": int(self.class_vectors.shape[1])}


def random_views(images: torch.Tensor, generator: torch.Generator, scale: tuple[float, float] = (0.5, 1.0)) -> torch.Tensor:
    """Per-image random resized square crops (area fraction in ``scale``) and flips, same size out."""
    _, _, height, width = images.shape
    out = []
    for image in images:
        u = torch.rand(4, generator=generator).tolist()
        side = max(1, int(round(math.sqrt(scale[0] + (scale[1] - scale[0]) * u[0]) * min(height, width))))
        top, left = int((height - side) * u[1]), int((width - side) * u[2])
        view = image[None, :, top : top + side, left : left + side]
        view = F.interpolate(view, size=(height, width), mode="bilinear", align_corners=False)
        out.append(view.flip(-1) if u[3] < 0.5 else view)
    return torch.cat(out).clamp(0, 1)


def distill_losses(
    student: DataFreeStudent,
    teacher,
    images: torch.Tensor,
    *,
    temperature: float = 1.0,
    feature_weight: float = 0.0,
) -> dict[str, torch.Tensor]:
    """Named loss parts for one batch of [0, 1] images (B, 3, H, W); the engine sums them."""
    side, _, _ = teacher_input_spec(teacher)
    with torch.no_grad():
        teacher_features = teacher_image_features(teacher, resize_to(images, side))
    student_features = student(images)
    scale = float(teacher.logit_scale)
    parts = {
        "kd": kd_loss(
            student_features, teacher_features, student.class_vectors, logit_scale=scale,
            teacher_logit_scale=scale, temperature=temperature, forward_weight=1.0, reverse_weight=0.0,
            reduction="batchmean", temperature_squared=True,
        )
    }
    if feature_weight > 0:
        cosine = F.cosine_similarity(student_features.float(), teacher_features, dim=-1)
        parts["feature"] = feature_weight * (1.0 - cosine).mean()
    return parts


def distill(
    student: DataFreeStudent,
    teacher,
    dataset,
    *,
    epochs: int = 10,
    batch_size: int = 64,
    lr: float = 1e-3,
    weight_decay: float = 0.05,
    temperature: float = 1.0,
    feature_weight: float = 0.0,
    seed: int = 0,
    workers: int = 0,
    progress: bool = True,
) -> list[dict[str, float]]:
    """Train ``student`` on ``dataset`` (a :class:`SyntheticImages`); returns per-step loss parts."""
    device = student.class_vectors.device
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=True, drop_last=len(dataset) > batch_size,
        num_workers=workers, generator=torch.Generator().manual_seed(seed),
    )
    total = max(1, epochs * len(loader))
    trainable = [p for p in student.parameters() if p.requires_grad]
    core = OptimizerCore(make_optimizer(trainable, name="adamw", lr=lr, weight_decay=weight_decay), trainable,
                         base_lr=lr, total_steps=total, schedule="cosine")
    views = torch.Generator().manual_seed(seed + 1)
    history = []
    student.train()
    teacher.eval()
    with tqdm(total=total, disable=not progress, desc="distill-datafree", unit="step") as bar:
        for _ in range(epochs):
            for images, _labels in loader:
                images = random_views(images, views).to(device)
                parts = distill_losses(student, teacher, images, temperature=temperature, feature_weight=feature_weight)
                loss = sum(parts.values())
                core.backward(loss)
                record = {k: float(v.detach()) for k, v in parts.items()}
                history.append(record)
                bar.set_postfix(loss=f"{float(loss.detach()):.4f}")
                bar.update(1)
    student.eval()
    return history


@torch.no_grad()
def agreement(student: DataFreeStudent, teacher, dataset, *, batch_size: int = 64) -> dict:
    """How closely the student follows the teacher on ``dataset`` (a :class:`SyntheticImages`).

    The engine's one tally (:mod:`clipdistill.engine.distill.metrics`): ``agreement`` (percent of
    images where both pick the same class), ``kl`` (mean KL(p_t || p_s) in nats per image, both at
    the student's logit scale: what distillation minimizes, and a finer measure than top-1 when the
    teacher's distribution is flat), ``images``, and each one's ``..._prompt_class_top1`` (percent
    top-1 against the class the image was synthesized for).
    """
    side, _, _ = teacher_input_spec(teacher)
    device = student.class_vectors.device
    student.eval()
    tally = AgreementTally()
    prompt_class = {"teacher": TopOneTally(student.class_vectors.shape[0]),
                    "student": TopOneTally(student.class_vectors.shape[0])}
    for images, labels in torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False):
        images, labels = images.to(device), labels.to(device)
        teacher_features = teacher_image_features(teacher, resize_to(images, side))
        teacher_logits = student.logit_scale * teacher_features @ student.class_vectors.t()
        student_logits = student.logits(images).float()
        tally.update(teacher_logits, student_logits)
        prompt_class["teacher"].update(teacher_logits, labels)
        prompt_class["student"].update(student_logits, labels)
    return {**tally.result(), **{f"{who}_prompt_class_top1": t.result()["top1"] for who, t in prompt_class.items()}}


def save_student(folder: Union[str, Path], student: DataFreeStudent, *, step: int, extra: Optional[dict] = None) -> Path:
    state = {"kind": CHECKPOINT_KIND, "config": student.config(), "model": student.state_dict(), "extra": extra or {}}
    return save_checkpoint(folder, step, state, keep_last=1)


def load_student(path: Union[str, Path], device: Union[str, torch.device] = "cpu") -> DataFreeStudent:
    """Rebuild a student from a checkpoint file, or from the latest checkpoint in a folder."""
    path = Path(path)
    if path.is_dir():
        found = latest_checkpoint(path)
        if found is None:
            raise CheckpointError(f"no checkpoint in {path}")
        path = found
    state = load_checkpoint(path)
    if state.get("kind") != CHECKPOINT_KIND:
        raise CheckpointError(f"{path} is not a data-free student checkpoint (kind {state.get('kind')!r})")
    config = state["config"]
    student = DataFreeStudent(
        config["backbone"], state["model"]["class_vectors"], image_size=config["image_size"], logit_scale=config["logit_scale"]
    )
    student.load_state_dict(state["model"])
    return student.to(device).eval()
