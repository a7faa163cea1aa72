"""What both examples share: their command line, the DistillStep they build, and the data set.

Everything here is clipdistill's public API (``import clipdistill``) plus a few lines of glue.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from PIL import Image

import clipdistill as cd
from clipdistill.engine.io import read_class_names
from clipdistill.engine.transforms import PairedViews

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--images", required=True, help="a folder of unlabeled images (searched recursively)")
    parser.add_argument("--class-names", required=True, help="a file with one class name per line")
    parser.add_argument("--teacher", default="ViT-L-14", help="open_clip model name (default: %(default)s)")
    parser.add_argument("--teacher-weights", default=None,
                        help="pretrained tag or local .safetensors/.pt file; omit for random init")
    parser.add_argument("--student", default="ViT-B-16", help="open_clip model name (default: %(default)s)")
    parser.add_argument("--student-weights", default=None, help="as --teacher-weights")
    parser.add_argument("--recipe", choices=("kdpl", "promptkd"), default="kdpl", help="(default: %(default)s)")
    parser.add_argument("--learner", default="coop",
                        help="kdpl: coop, cocoop, vpt, maple, ivlp, promptsrc; promptkd: promptkd (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=32, help="(default: %(default)s)")
    parser.add_argument("--lr", type=float, default=2e-3, help="(default: %(default)s)")
    parser.add_argument("--max-steps", type=int, default=1000, help="(default: %(default)s)")
    parser.add_argument("--out", default="runs/example", help="checkpoints go here (default: %(default)s)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where the models live (default: %(default)s)")
    return parser


def build_step(args: argparse.Namespace) -> cd.DistillStep:
    """Teacher, its class vectors, the student's prompt learner and the recipe's loss, in one module."""
    names = read_class_names(args.class_names, what="--class-names")
    teacher = cd.build_teacher(args.teacher, args.teacher_weights, device=args.device)
    vectors = cd.teacher_class_vectors(teacher, cd.get_tokenizer(args.teacher), names, ["a photo of a {}."])
    student = cd.build_student(args.student, args.student_weights, device=args.device)
    learner = cd.build_learner(args.learner, student, tokenizer=cd.get_tokenizer(args.student), class_names=names,
                               teacher_dim=vectors.shape[1])
    return cd.DistillStep(teacher, learner, vectors, recipe=args.recipe)


class UnlabeledImages(torch.utils.data.Dataset):
    """Every image under a folder as (teacher image, student image): one random view, each model's input."""

    def __init__(self, root: str | Path, step: cd.DistillStep):
        self.files = sorted(p for p in Path(root).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.files:
            raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {root}")
        self.views = PairedViews(cd.teacher_transform(step.teacher), cd.student_transform(step.student))

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        with Image.open(self.files[index]) as image:
            teacher_image, student_image = self.views(image.convert("RGB"))
        return {"teacher_images": teacher_image, "student_images": student_image}
