"""The data-free commands: ``convert-vqgan``, ``synthesize``, ``datafree-report``, ``distill-datafree``,
``datafree-eval``.

``register(subparsers)`` adds all five; open_clip, timm and diffusers are imported only when a
command runs.

A typical run::

    clipdistill convert-vqgan vqgan_imagenet_f16_1024/last.ckpt --out-dir /models/vqgan-f16
    clipdistill synthesize --class-names classes.txt --diversifier contrastive --generator vqgan \\
        --vqgan /models/vqgan-f16 --per-class 50 --teacher ViT-L-14 --teacher-weights openai --out-dir syn/
    clipdistill synthesize ... --seed 1 --per-class 5 --out-dir held/      # a held-out set
    clipdistill datafree-report syn/ held/ --out report/diversity.json     # + diversity.png
    clipdistill distill-datafree --data syn/ --student resnet18 --eval-data held/ --out-dir runs/student
    clipdistill datafree-eval --checkpoint runs/student --data held/

Without ``--teacher-weights`` the teacher is random (built from a fixed seed so that every command
sees the same one): for smoke tests only. Nothing is ever downloaded except what open_clip
fetches for a named pretrained tag.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Optional

import torch

from clipdistill.engine.commands.common import (InputError, add_checkpoint, add_class_names, add_device, add_out_dir,
                                                add_out_file, add_teacher, check_model_input, require_dir,
                                                require_file, require_out_dir, require_out_file, require_path)
from clipdistill.engine.datafree.convert_vqgan import convert_vqgan
from clipdistill.engine.datafree.dataset import SyntheticImages
from clipdistill.engine.datafree.diversify import DIVERSIFIERS
from clipdistill.engine.datafree.generators import (CUTOUT_AUGMENTS, DEFAULT_AUGMENT, DEFAULT_GENERATOR, GENERATORS,
                                                    VQGAN_WEIGHTS_NEEDED)
from clipdistill.engine.datafree.report import diversity_report
from clipdistill.engine.datafree.student import DataFreeStudent, agreement, distill, load_student, save_student
from clipdistill.engine.datafree.synthesize import SynthesisPlan, load_teacher, synthesize
from clipdistill.engine.io import read_class_names, resolve_device
from clipdistill.engine.models.class_vectors import teacher_class_vectors
from clipdistill.engine.models.clip import get_tokenizer
from clipdistill.engine.progress import progress_enabled
from clipdistill.engine.templates import templates_for


def _add_teacher_arguments(parser: argparse.ArgumentParser, default: Optional[str]) -> None:
    add_teacher(parser, default=default,
                name_help="teacher open_clip model name" + ("" if default else " (default: the one the set was made with)"),
                weights_help="pretrained tag or local checkpoint (default: random init, for smoke tests)")
    add_device(parser, default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")


def _check_teacher(args: argparse.Namespace) -> None:
    check_model_input(args.teacher, args.teacher_weights, name_key="--teacher", weights_key="--teacher-weights")


def _require_set(path: str, key: str) -> None:
    """A synthetic set made by ``clipdistill synthesize`` (a folder with its manifest)."""
    require_dir(path, key, "synthetic set")


def _device(device: Optional[str]) -> str:
    return str(resolve_device(device, what="--device"))


def register(subparsers) -> None:
    """Add the five data-free commands to an argparse ``subparsers`` object."""
    convert = subparsers.add_parser(
        "convert-vqgan",
        help="data-free: a taming-transformers VQGAN checkpoint (.ckpt) to a diffusers VQModel folder for --vqgan",
        description="Read the checkpoint without executing anything (weights-only unpickling; inert stand-ins "
                    "for Lightning callbacks; anything else is refused), rename its tensors to diffusers' "
                    "VQModel layout, infer the config from their shapes, write config.json + "
                    "diffusion_pytorch_model.safetensors to --out-dir, and check that they load back exactly.",
    )
    convert.add_argument("checkpoint",
                         help="taming-transformers VQGAN checkpoint (e.g. vqgan_imagenet_f16_1024/checkpoints/last.ckpt)")
    add_out_dir(convert, help="new folder for the diffusers VQModel")
    convert.set_defaults(func=run_convert_vqgan)

    synth = subparsers.add_parser(
        "synthesize",
        help="data-free: synthesize surrogate images from class names with diversified prompts",
        description="Write images, a style bank and a JSON-lines manifest to --out-dir; rerun the same "
                    "command to resume an interrupted run.",
    )
    add_class_names(synth, required=True, old=("--classes",), help="text file, one class name per line")
    add_out_dir(synth, help="output folder (resumed when it exists)")
    synth.add_argument("--diversifier", choices=DIVERSIFIERS, default="contrastive")
    synth.add_argument("--generator", choices=GENERATORS, default=DEFAULT_GENERATOR,
                       help=f"image generator (default {DEFAULT_GENERATOR}: needs --vqgan; fourier needs no weights)")
    synth.add_argument("--vqgan", default=None,
                       help="local VQModel weights: a diffusers folder (clipdistill convert-vqgan makes one from a "
                            "taming-transformers .ckpt), or a .safetensors file with its .json config "
                            "('tiny': a random-init test decoder)")
    synth.add_argument("--per-class", type=int, default=10, help="images (and styles) per class")
    synth.add_argument("--steps", type=int, default=100, help="optimization steps per image")
    synth.add_argument("--lr", type=float, default=None, help="generator learning rate (default: its own)")
    synth.add_argument("--cutouts", type=int, default=16, help="augmented crops per image and step")
    synth.add_argument("--augment", choices=sorted(CUTOUT_AUGMENTS), default=DEFAULT_AUGMENT,
                       help="the crops' augmentations: vqgan-clip (flip, sharpness, affine, perspective, color "
                            "jitter, noise, as VQGAN-CLIP's MakeCutouts) or crops (crops and flips only)")
    synth.add_argument("--image-size", type=int, default=None, help="image side (default: the teacher's)")
    synth.add_argument("--style-tokens", type=int, default=1, help="pseudo-tokens per style")
    synth.add_argument("--contrastive-steps", type=int, default=50, help="optimization steps per contrastive style")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--batch-size", type=int, default=8, help="images optimized together")
    synth.add_argument("--limit", type=int, default=None, help="make at most this many new images, then stop")
    _add_teacher_arguments(synth, "ViT-B-32")
    synth.set_defaults(func=run_synthesize)

    report = subparsers.add_parser(
        "datafree-report",
        help="data-free: diversity of synthetic sets (mean pairwise cosine distance of teacher features)",
    )
    report.add_argument("folders", nargs="+", help="synthetic sets made by clipdistill synthesize")
    add_out_file(report, help="report JSON path")
    report.add_argument("--plot", default=None, help="PNG path (default: the JSON path with .png)")
    report.add_argument("--batch-size", type=int, default=64)
    _add_teacher_arguments(report, None)
    report.set_defaults(func=run_report)

    train = subparsers.add_parser(
        "distill-datafree",
        help="data-free: distill the teacher into a small timm student on a synthetic set",
    )
    train.add_argument("--data", required=True, help="a synthetic set made by clipdistill synthesize")
    add_out_dir(train, help="checkpoint folder")
    train.add_argument("--student", default="resnet18", help="timm model name (built with pretrained=False)")
    train.add_argument("--student-weights", default=None, help="local .safetensors weights for the timm backbone")
    train.add_argument("--image-size", type=int, default=224, help="student input side")
    train.add_argument("--templates", default="generic", help="dataset whose templates make the class vectors")
    train.add_argument("--epochs", type=int, default=10)
    train.add_argument("--batch-size", type=int, default=64)
    train.add_argument("--lr", type=float, default=1e-3)
    train.add_argument("--weight-decay", type=float, default=0.05)
    train.add_argument("--temperature", type=float, default=1.0)
    train.add_argument("--feature-weight", type=float, default=0.0, help="weight of the feature-alignment term")
    train.add_argument("--eval-data", default=None, help="a held-out synthetic set: report agreement on it")
    train.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    train.add_argument("--seed", type=int, default=0)
    _add_teacher_arguments(train, None)
    train.set_defaults(func=run_distill)

    evaluate = subparsers.add_parser(
        "datafree-eval", help="data-free: top-1 agreement of a distilled student with the teacher"
    )
    add_checkpoint(evaluate, help="checkpoint file or folder (distill-datafree --out-dir)")
    evaluate.add_argument("--data", required=True, help="a synthetic set (held out from training)")
    evaluate.add_argument("--batch-size", type=int, default=64)
    _add_teacher_arguments(evaluate, None)
    evaluate.set_defaults(func=run_eval)


def run_synthesize(args: argparse.Namespace) -> int:
    vqgan = args.vqgan
    if vqgan not in (None, "tiny"):
        if not os.path.exists(vqgan):
            raise InputError(f"--vqgan {args.vqgan} does not exist (a diffusers VQModel folder: "
                             f"clipdistill convert-vqgan CKPT --out-dir DIR makes one)")
        vqgan = os.path.abspath(vqgan)
    if args.generator == "vqgan" and vqgan is None:
        raise InputError(VQGAN_WEIGHTS_NEEDED)
    class_names = tuple(read_class_names(args.class_names, what="--class-names"))
    _check_teacher(args)
    require_out_dir(args.out_dir)
    plan = SynthesisPlan(
        teacher=args.teacher, teacher_weights=args.teacher_weights, class_names=class_names,
        diversifier=args.diversifier, generator=args.generator, per_class=args.per_class, seed=args.seed,
        steps=args.steps, image_size=args.image_size, n_cutouts=args.cutouts, augment=args.augment, lr=args.lr,
        n_style_tokens=args.style_tokens, contrastive_steps=args.contrastive_steps, vqgan=vqgan,
    )
    teacher = load_teacher(args.teacher, args.teacher_weights, _device(args.device))
    result = synthesize(plan, args.out_dir, teacher, get_tokenizer(args.teacher), batch_size=args.batch_size,
                        limit=args.limit, progress=progress_enabled())
    print(json.dumps({"out": str(result.out_dir), "total": result.total, "existing": result.existing,
                      "generated": result.generated, "complete": result.complete, "dropped": result.dropped}))
    return 0


def run_convert_vqgan(args: argparse.Namespace) -> int:
    require_file(args.checkpoint, "CHECKPOINT", "VQGAN checkpoint")
    require_out_dir(args.out_dir)
    try:
        summary = convert_vqgan(args.checkpoint, args.out_dir)
    except FileExistsError as error:  # an existing --out-dir is never overwritten: bad input, not a failure
        raise InputError(f"--out-dir: {error}") from error
    print(json.dumps(summary))
    return 0


def _teacher_for(plan, name: Optional[str], weights: Optional[str], device: str):
    """The teacher named on the command line, else the one the synthetic set was made with."""
    if name is None:
        name, weights = plan.teacher, plan.teacher_weights
    return load_teacher(name, weights, device), name, weights


def run_report(args: argparse.Namespace) -> int:
    for folder in args.folders:
        _require_set(folder, "FOLDERS")
    _check_teacher(args)
    require_out_file(args.out)
    require_out_file(args.plot, "--plot")
    teacher, _, _ = _teacher_for(SyntheticImages(args.folders[0]).plan, args.teacher, args.teacher_weights,
                                 _device(args.device))
    plot = args.plot or str(Path(args.out).with_suffix(".png"))
    report = diversity_report(args.folders, teacher, out_json=args.out, out_png=plot, batch_size=args.batch_size)
    for label, entry in report["sets"].items():
        print(f"{label:30s} within-class {entry['mean_per_class']:.4f}  overall {entry['overall']:.4f}  "
              f"n={entry['n_images']}")
    return 0


def run_distill(args: argparse.Namespace) -> int:
    _require_set(args.data, "--data")
    if args.eval_data:
        _require_set(args.eval_data, "--eval-data")
    require_file(args.student_weights, "--student-weights", "weights file")
    _check_teacher(args)
    require_out_dir(args.out_dir)
    torch.manual_seed(args.seed)
    device = _device(args.device)
    dataset = SyntheticImages(args.data)
    teacher, name, weights = _teacher_for(dataset.plan, args.teacher, args.teacher_weights, device)
    class_vectors = teacher_class_vectors(
        teacher, get_tokenizer(name), dataset.class_names, templates_for(args.templates),
        model_name=name, weights=weights, device=device,
    )
    student = DataFreeStudent(
        args.student, class_vectors, image_size=args.image_size, logit_scale=float(teacher.logit_scale),
        backbone_weights=args.student_weights,
    ).to(device)
    history = distill(
        student, teacher, dataset, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
        weight_decay=args.weight_decay, temperature=args.temperature, feature_weight=args.feature_weight,
        seed=args.seed, workers=args.workers, progress=progress_enabled(),
    )
    summary = {"steps": len(history), "first": history[0] if history else None, "last": history[-1] if history else None}
    if args.eval_data:
        summary["eval"] = agreement(student, teacher, SyntheticImages(args.eval_data), batch_size=args.batch_size)
    path = save_student(args.out_dir, student, step=len(history), extra={
        "teacher": name, "teacher_weights": weights, "data": str(args.data), "summary": summary})
    summary["checkpoint"] = str(path)
    print(json.dumps(summary))
    return 0


def run_eval(args: argparse.Namespace) -> int:
    require_path(args.checkpoint, "--checkpoint", "checkpoint file or folder")
    _require_set(args.data, "--data")
    _check_teacher(args)
    device = _device(args.device)
    dataset = SyntheticImages(args.data)
    teacher, _, _ = _teacher_for(dataset.plan, args.teacher, args.teacher_weights, device)
    student = load_student(args.checkpoint, device=device)
    if student.class_vectors.shape[0] != len(dataset.class_names):
        raise InputError(
            f"the student knows {student.class_vectors.shape[0]} classes, the set has "
            f"{len(dataset.class_names)}; evaluate on a set made for the same classes"
        )
    print(json.dumps(agreement(student, teacher, dataset, batch_size=args.batch_size)))
    return 0
