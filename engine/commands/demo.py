"""``clipdistill demo``: a complete, honest distillation on the CPU in a few minutes.

There are no pretrained weights on a fresh machine, so the demo makes its own:

1. **Data.** Images of a few visual classes are generated: a filled shape
   (circle, square, triangle, cross, ring, bar) in a colour drawn around the
   class's own hue, at a random position, size and angle, over a smooth noisy
   background. Each class's images are split into a pretraining set, an
   unlabeled distillation set (written as JPEG files: the engine's real loader
   reads them) and a held-out set.
2. **Teacher.** The tiny teacher config (``clipdistill-tiny-teacher``,
   random init) is pretrained CLIP-style on the pretraining set: cross-entropy
   between the image features and the text features of "a photo of a {name}."
   for every class, both towers trained. It is saved as a safetensors
   checkpoint and loaded back through the engine's own loading code.
3. **Student.** The smaller student config (``clipdistill-tiny-student``) is
   pretrained the same way, on half as many images for half as many steps,
   and with captions that name the classes with other words (disc, box,
   wedge, plus, loop, stick): its image features separate the classes, but
   its zero-shot prompts with the target names ("a photo of a circle.") do not
   point at them. This vocabulary mismatch is the situation prompt learning
   exists for, made deliberately large so that the effect is visible.
4. **Distillation.** ``clipdistill distill`` runs the KDPL recipe with the
   student's backbone frozen and only its prompts trained, on the unlabeled
   JPEGs: no label is used.
5. **Report.** Teacher-student top-1 agreement and KL(teacher‖student) on the
   held-out images before and after, the accuracies of both on the held-out
   labels, and a one-line JSON summary last.

The models are a few million parameters and the images 64 px: the demo shows
the mechanics and that the distillation signal moves the student towards the
teacher; it says nothing about accuracy on real data.
"""
from __future__ import annotations

import argparse
import colorsys
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from safetensors.torch import save_file

from clipdistill.engine.commands.common import add_out_dir, reporter, require_out_dir
from clipdistill.engine.config.run import load_run_config
from clipdistill.engine.distill.metrics import AgreementTally, TopOneTally
from clipdistill.engine.io import image_spec
from clipdistill.engine.models.clip import TINY_STUDENT, TINY_TEACHER, get_tokenizer, load_clip
from clipdistill.engine.progress import progress_bar
from clipdistill.engine.training.builder import build_run
from clipdistill.engine.training.loop import OptimizerCore, make_optimizer
from clipdistill.engine.training.trainer import Trainer

CLASSES = ("circle", "square", "triangle", "cross", "ring", "bar")
# The words the student's pretraining captions use for the same classes (see the module docstring).
STUDENT_WORDS = ("disc", "box", "wedge", "plus", "loop", "stick")
_HUES = (0.0, 0.33, 0.62, 0.14, 0.8, 0.48)
IMAGE_SIDE = 64
TEMPLATE = "a photo of a {}."


# ------------------------------------------------------------------------------ data


def _hsv_to_rgb(h: float, s: float, v: float) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb(h % 1.0, s, v)
    return int(r * 255), int(g * 255), int(b * 255)


def _shape_polygon(kind: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    def rot(points):
        c, s = math.cos(angle), math.sin(angle)
        return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in points]

    if kind == "square":
        return rot([(-r, -r), (r, -r), (r, r), (-r, r)])
    if kind == "triangle":
        return rot([(0, -r), (r * 0.95, r * 0.7), (-r * 0.95, r * 0.7)])
    if kind == "bar":
        return rot([(-r, -r * 0.3), (r, -r * 0.3), (r, r * 0.3), (-r, r * 0.3)])
    if kind == "cross":
        a, b = r, r * 0.33
        return rot([(-b, -a), (b, -a), (b, -b), (a, -b), (a, b), (b, b), (b, a), (-b, a), (-b, b), (-a, b),
                    (-a, -b), (-b, -b)])
    raise ValueError(kind)


def render_image(label: int, rng: np.random.Generator, side: int = IMAGE_SIDE) -> np.ndarray:
    """One (side, side, 3) uint8 image of class ``label``."""
    # Smooth background: low-resolution noise upsampled, plus fine grain.
    low = rng.uniform(40, 200, size=(4, 4, 3)).astype(np.uint8)
    background = np.asarray(Image.fromarray(low).resize((side, side), Image.BICUBIC), dtype=np.float32)
    background += rng.normal(0, 8, size=background.shape)
    image = Image.fromarray(np.clip(background, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    kind = CLASSES[label]
    colour = _hsv_to_rgb(_HUES[label] + rng.normal(0, 0.05), rng.uniform(0.6, 1.0), rng.uniform(0.6, 1.0))
    r = rng.uniform(0.2, 0.36) * side
    cx, cy = rng.uniform(r, side - r), rng.uniform(r, side - r)
    angle = rng.uniform(0, 2 * math.pi)
    if kind == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    elif kind == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=colour, width=max(2, int(r * 0.35)))
    else:
        draw.polygon(_shape_polygon(kind, cx, cy, r, angle), fill=colour)
    return np.asarray(image, dtype=np.uint8)


def make_dataset(n_per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(N, side, side, 3) uint8 images and (N,) int64 labels, classes interleaved."""
    rng = np.random.default_rng(seed)
    labels = np.tile(np.arange(len(CLASSES)), n_per_class)
    images = np.stack([render_image(int(y), rng) for y in labels])
    return images, labels.astype(np.int64)


def to_tensor(images: np.ndarray, size: int, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> normalized float (N, 3, size, size), antialiased resize."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    return (x - m) / s


def write_jpegs(images: np.ndarray, folder: Path, quality: int = 92) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{i:05d}.jpg", quality=quality)


# ------------------------------------------------------------------------------ pretraining


def pretrain_clip(model, tokenizer, images: torch.Tensor, labels: torch.Tensor, *, words: Sequence[str], steps: int,
                  batch_size: int, lr: float, seed: int, logit_scale: float = 50.0, desc: str = "pretrain") -> None:
    """CLIP-style supervised pretraining of both towers against "a photo of a {word}." per class."""
    torch.manual_seed(seed)
    model.train()
    for p in model.parameters():
        p.requires_grad_(True)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(logit_scale))
    tokens = tokenizer([TEMPLATE.format(w) for w in words])
    params = list(model.parameters())
    core = OptimizerCore(make_optimizer(params, name="adamw", lr=lr, weight_decay=0.05), params, base_lr=lr,
                         total_steps=steps, warmup_steps=min(20, steps // 2), schedule="cosine")
    generator = torch.Generator().manual_seed(seed)
    for _ in progress_bar(range(steps), desc=desc, unit="step"):
        idx = torch.randint(0, len(images), (batch_size,), generator=generator)
        x = images[idx]
        flip = torch.rand(batch_size, generator=generator) < 0.5
        x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        image_features = F.normalize(model.encode_image(x), dim=-1)
        text_features = F.normalize(model.encode_text(tokens), dim=-1)
        logits = model.logit_scale.exp() * image_features @ text_features.t()
        loss = F.cross_entropy(logits, labels[idx])
        core.backward(loss)
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)


# ------------------------------------------------------------------------------ evaluation


@torch.no_grad()
def compare(teacher_logits: torch.Tensor, student_logits: torch.Tensor, labels: torch.Tensor) -> dict:
    """Top-1 agreement and KL(teacher‖student), and both accuracies, on the same images.

    The engine's one tally (:mod:`clipdistill.engine.distill.metrics`): percentages, KL in nats.
    """
    agreement = AgreementTally()
    agreement.update(teacher_logits, student_logits)
    accuracy = {}
    for name, logits in (("teacher", teacher_logits), ("student", student_logits)):
        tally = TopOneTally(logits.shape[1])
        tally.update(logits, labels)
        accuracy[name] = tally.result()["top1"]
    result = agreement.result()
    return {"agreement": result["agreement"], "kl": result["kl"], "teacher_accuracy": accuracy["teacher"],
            "student_accuracy": accuracy["student"]}


@torch.no_grad()
def student_logits(learner, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    learner.eval()
    return torch.cat([learner(images[i:i + batch_size]).logits.float() for i in range(0, len(images), batch_size)])


# ------------------------------------------------------------------------------ the demo


@dataclass
class _DemoData:
    """The demo's images (classes interleaved), split: labeled for pretraining, unlabeled (JPEGs for
    distillation) and held out (for the report)."""

    pretrain_images: np.ndarray  # (N_pre, side, side, 3) uint8
    pretrain_labels: np.ndarray  # (N_pre,) int64
    unlabeled_folder: Path
    heldout_images: np.ndarray  # (N_held, side, side, 3) uint8
    heldout_labels: torch.Tensor  # (N_held,) int64


def run_demo(out_dir: str | Path, *, seed: int = 0, learner: str = "coop", distill_epochs: int = 30,
             n_per_class: int = 160, log: Callable[[str], None] = print) -> dict:
    """Run the whole demo in ``out_dir``; return the summary (also printed by the CLI)."""
    started = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    torch.set_num_threads(max(1, torch.get_num_threads()))

    data = _prepare_data(out, n_per_class=n_per_class, seed=seed, log=log)
    checkpoints = _pretrain_teacher_and_student(out, data, seed=seed, log=log)
    config = _demo_run_config(out, checkpoints, data, learner=learner, distill_epochs=distill_epochs, seed=seed)
    before, after = _distill_and_compare(config, data, log=log)
    summary = {
        "agreement_before": round(before["agreement"], 2),  # percent, as every clipdistill tally
        "agreement_after": round(after["agreement"], 2),
        "kl_before": round(before["kl"], 4),
        "kl_after": round(after["kl"], 4),
        "student_accuracy_before": round(before["student_accuracy"], 2),
        "student_accuracy_after": round(after["student_accuracy"], 2),
        "teacher_accuracy": round(before["teacher_accuracy"], 2),
        "held_out_images": len(data.heldout_images),
        "learner": learner,
        "seed": seed,
        "seconds": round(time.perf_counter() - started, 1),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _prepare_data(out: Path, *, n_per_class: int, seed: int, log: Callable[[str], None]) -> _DemoData:
    """Generate the images and split them 40/40/20: pretraining, unlabeled JPEGs (with classes.txt), held out."""
    images, labels = make_dataset(n_per_class, seed)
    n = len(images)
    n_pre, n_unlabeled = int(0.4 * n), int(0.4 * n)
    data = _DemoData(
        pretrain_images=images[:n_pre], pretrain_labels=labels[:n_pre], unlabeled_folder=out / "unlabeled",
        heldout_images=images[n_pre + n_unlabeled:], heldout_labels=torch.from_numpy(labels[n_pre + n_unlabeled:]),
    )
    write_jpegs(images[n_pre:n_pre + n_unlabeled], data.unlabeled_folder)
    (out / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    log(f"demo: {len(CLASSES)} classes; {n_pre} pretraining, {n_unlabeled} unlabeled (JPEG), "
        f"{len(data.heldout_images)} held-out images")
    return data


def _pretrain_teacher_and_student(out: Path, data: _DemoData, *, seed: int,
                                  log: Callable[[str], None]) -> dict[str, Path]:
    """Pretrain both tiny models from random init and save them; {"teacher": path, "student": path}.

    The student sees half the images for a quarter of the steps, with other words for the classes
    (see the module docstring): a weaker student with a vocabulary mismatch for prompts to fix.
    """
    checkpoints = {}
    for role, name, words, steps, subset in (
        ("teacher", TINY_TEACHER, CLASSES, 600, len(data.pretrain_images)),
        ("student", TINY_STUDENT, STUDENT_WORDS, 150, len(data.pretrain_images) // 2),
    ):
        model = load_clip(name, None)
        size, mean, std = _preprocess(model)
        x = to_tensor(data.pretrain_images[:subset], size, mean, std)
        y = torch.from_numpy(data.pretrain_labels[:subset])
        t0 = time.perf_counter()
        pretrain_clip(model, get_tokenizer(name), x, y, words=words, steps=steps, batch_size=64, lr=2e-3,
                      seed=seed + 1, desc=f"demo: pretrain the {role}")
        path = out / f"{role}.safetensors"
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
        checkpoints[role] = path
        log(f"demo: pretrained the {role} ({name}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M "
            f"parameters) for {steps} steps on {subset} labeled images in {time.perf_counter() - t0:.0f}s")
    return checkpoints


def _demo_run_config(out: Path, checkpoints: dict[str, Path], data: _DemoData, *, learner: str,
                     distill_epochs: int, seed: int) -> dict:
    """The run config of ``clipdistill distill``: KDPL on the unlabeled JPEGs, on the CPU."""
    return {
        "recipe": "kdpl",
        "teacher": {"name": TINY_TEACHER, "weights": str(checkpoints["teacher"])},
        "student": {"name": TINY_STUDENT, "weights": str(checkpoints["student"])},
        "learner": {"kind": learner, "options": _demo_learner_options(learner)},
        "data": {"train": str(data.unlabeled_folder), "class_names": str(out / "classes.txt"),
                 "templates": "generic", "batch_size": 32, "backend": "torch", "workers": 0,
                 "min_scale": 0.5, "interpolation": "bilinear"},
        "optim": {"name": "adamw", "lr": 0.02, "weight_decay": 0.0, "warmup_steps": 5, "warmup_lr": None},
        # A rerun regenerates the data and the models, so it replaces the previous demo's run (moved
        # to run/previous/<its run id>/) rather than refusing or resuming it.
        "train": {"epochs": distill_epochs, "seed": seed, "device": "cpu", "out_dir": str(out / "run"),
                  "log_every": 5, "checkpoint_every": 50, "progress": True,  # drawn only on a terminal
                  "overwrite": True},
    }


def _distill_and_compare(config: dict, data: _DemoData, *, log: Callable[[str], None]) -> tuple[dict, dict]:
    """Build the run, distill, and compare teacher and student on the held-out images (:func:`compare`)
    before and after; the teacher's logits use the student's scale, as KDPL trains."""
    run = build_run(load_run_config(config), log=log)
    teacher = run.teacher
    t_size, t_mean, t_std = _preprocess(teacher.model)
    s_size, s_mean, s_std = _preprocess(run.learner.clip)
    held_t = to_tensor(data.heldout_images, t_size, t_mean, t_std)
    held_s = to_tensor(data.heldout_images, s_size, s_mean, s_std)
    vectors = run.step.teacher_class_vectors
    with torch.no_grad():
        teacher_logits = run.step.student_logit_scale * teacher.encode_image(held_t) @ vectors.t()
    before = compare(teacher_logits, student_logits(run.learner, held_s), data.heldout_labels)
    log("demo: before distillation: " + _fmt(before))
    t0 = time.perf_counter()
    Trainer(run, log=log).fit()
    distill_seconds = time.perf_counter() - t0
    after = compare(teacher_logits, student_logits(run.learner, held_s), data.heldout_labels)
    log(f"demo: after distillation ({distill_seconds:.0f}s, no labels): " + _fmt(after))
    return before, after


def _demo_learner_options(learner: str) -> dict:
    return {
        "coop": {"n_ctx": 4, "init_words": "a photo of a", "class_specific": True},
        "vpt": {"n_tokens": 4, "depth": 3},
        "maple": {"n_ctx": 2, "depth": 3},
        "ivlp": {"n_text_ctx": 4, "text_depth": 3, "n_vision_ctx": 4, "vision_depth": 3},
        "promptsrc": {"n_text_ctx": 4, "text_depth": 3, "n_vision_ctx": 4, "vision_depth": 3},
        "cocoop": {"n_ctx": 4, "init_words": "a photo of a"},
    }[learner]


def _preprocess(model) -> tuple[int, tuple, tuple]:
    return image_spec(model)


def _fmt(m: dict) -> str:
    return (f"agreement {m['agreement']:.1f}%, KL(teacher||student) {m['kl']:.3f}, "
            f"student accuracy {m['student_accuracy']:.1f}%, teacher accuracy {m['teacher_accuracy']:.1f}%")


def _cmd_demo(args: argparse.Namespace) -> int:
    require_out_dir(args.out_dir)
    summary = run_demo(args.out_dir, seed=args.seed, learner=args.learner, distill_epochs=args.epochs,
                       log=reporter("demo"))
    print(json.dumps(summary))
    return 0


def register(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "demo", help="generate data, pretrain a tiny teacher and student, distill on the CPU, report",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    add_out_dir(parser, required=False, default="demo_out", help="folder for images, checkpoints and the run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--learner", default="coop", choices=["coop", "cocoop", "vpt", "maple", "ivlp", "promptsrc"])
    parser.add_argument("--epochs", type=int, default=30, help="distillation epochs over the unlabeled images")
    parser.set_defaults(func=_cmd_demo)
    return parser
