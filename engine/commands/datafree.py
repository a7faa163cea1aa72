"""The data-free commands: ``convert-vqgan``, ``synthesize``, ``datafree-report``, and the old names
``distill-datafree`` and ``datafree-eval``.

``register(subparsers)`` adds all five; open_clip, timm and diffusers are imported only when a
command runs.

A typical run::

    clipdistill convert-vqgan vqgan_imagenet_f16_1024/last.ckpt --out-dir /models/vqgan-f16
    clipdistill synthesize --class-names classes.txt --diversifier contrastive --generator vqgan \\
        --vqgan /models/vqgan-f16 --per-class 50 --teacher ViT-L-14 --teacher-weights openai --out-dir syn/
    clipdistill synthesize ... --seed 1 --per-class 5 --out-dir held/      # a held-out set
    clipdistill datafree-report syn/ held/ --out report/diversity.json     # + diversity.png
    clipdistill distill --recipe datafree data.train=syn/ data.heldout=held/ --out-dir runs/student
    clipdistill eval --domains pacs/ --checkpoint runs/student/best.safetensors

``distill-datafree`` and ``datafree-eval`` are the old names of the last two steps, kept for one
release: the first runs ``distill --recipe datafree`` with its old flags as config keys, the
second reports a student's agreement with the teacher on a synthetic set.

Without ``--teacher-weights`` the teacher is random (built from a fixed seed so that every command
sees the same one): for smoke tests only. Nothing is ever downloaded except what open_clip
fetches for a named pretrained tag.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import tempfile
from pathlib import Path
from typing import Optional

from clipdistill.engine.commands.common import (InputError, add_checkpoint, add_class_names, add_device, add_out_dir,
                                                add_out_file, add_teacher, check_model_input, check_run_inputs,
                                                reporter, require_dir, require_file, require_out_dir,
                                                require_out_file, require_path, run_checkpoint)
from clipdistill.engine.config.run import load_run_config
from clipdistill.engine.datafree.convert_vqgan import convert_vqgan
from clipdistill.engine.datafree.dataset import SyntheticImages, read_synthetic_set
from clipdistill.engine.datafree.diversify import DIVERSIFIERS
from clipdistill.engine.datafree.generators import (CUTOUT_AUGMENTS, DEFAULT_AUGMENT, DEFAULT_GENERATOR, GENERATORS,
                                                    VQGAN_WEIGHTS_NEEDED)
from clipdistill.engine.datafree.report import diversity_report
from clipdistill.engine.datafree.synthesize import SynthesisPlan, load_teacher, synthesize
from clipdistill.engine.evaluation.evaluate import Dataset, LoaderSettings, run_evaluation
from clipdistill.engine.io import read_class_names, resolve_device
from clipdistill.engine.models.clip import get_tokenizer
from clipdistill.engine.progress import progress_enabled
from clipdistill.engine.training.trainer import distill as run_distillation


def _add_teacher_arguments(parser: argparse.ArgumentParser, default: Optional[str],
                           weights_help: str = "pretrained tag or local checkpoint (default: random init, for smoke "
                                               "tests)") -> None:
    add_teacher(parser, default=default,
                name_help="teacher open_clip model name" + ("" if default else " (default: the one the set was made with)"),
                weights_help=weights_help)
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
        help="data-free: (old name, kept for one release) clipdistill distill --recipe datafree with these flags",
        description="The flags of the old data-free loop, run as clipdistill distill --recipe datafree (the "
                    "engine's trainer: checkpoints, exact --resume, metrics, held-out selection). Each flag "
                    "becomes a config key: --data data.train, --eval-data data.heldout, --student student.name, "
                    "--student-weights student.weights, --image-size learner.options.image_size, --templates "
                    "data.templates, --epochs train.epochs, --batch-size data.batch_size, --lr optim.lr, "
                    "--weight-decay optim.weight_decay, --temperature loss.temperature, --feature-weight "
                    "loss.feature_weight, --workers data.workers, --seed train.seed, --device train.device.",
    )
    train.add_argument("--data", required=True, help="a synthetic set made by clipdistill synthesize")
    add_out_dir(train, help="the run's folder (train.out_dir)")
    for flag, (key, kind) in ALIAS_FLAGS.items():
        if flag not in ("--data", "--out-dir", "--teacher", "--teacher-weights", "--device"):
            train.add_argument(flag, type=kind, default=None, help=f"sets {key} (default: the datafree recipe's)")
    train.add_argument("--resume", action="store_true", help="continue the run in --out-dir")
    _add_teacher_arguments(train, None, weights_help="pretrained tag or local checkpoint (default: the set's "
                                                     "teacher's weights when --teacher is the set's teacher or not "
                                                     "given; else the datafree recipe's, openai)")
    train.set_defaults(func=run_distill)

    evaluate = subparsers.add_parser(
        "datafree-eval",
        help="data-free: (old name, kept for one release) agreement and KL of a distilled student with its teacher "
             "on the images a synthetic set's manifest lists, and each one's top-1 against the class an image was "
             "made for (over the classes the set holds images of)",
    )
    add_checkpoint(evaluate, help="a data-free run's checkpoint or best.safetensors, a run folder, or an export file")
    evaluate.add_argument("--data", required=True, help="a synthetic set (held out from training)")
    evaluate.add_argument("--batch-size", type=int, default=64)
    _add_teacher_arguments(evaluate, None)
    evaluate.set_defaults(func=run_eval)


# distill-datafree's flags and the config keys they set (its old loop's flags, now the recipe's keys).
ALIAS_FLAGS = {
    "--data": ("data.train", str), "--out-dir": ("train.out_dir", str), "--eval-data": ("data.heldout", str),
    "--student": ("student.name", str), "--student-weights": ("student.weights", str),
    "--image-size": ("learner.options.image_size", int), "--templates": ("data.templates", str),
    "--epochs": ("train.epochs", int), "--batch-size": ("data.batch_size", int), "--lr": ("optim.lr", float),
    "--weight-decay": ("optim.weight_decay", float), "--temperature": ("loss.temperature", float),
    "--feature-weight": ("loss.feature_weight", float), "--workers": ("data.workers", int),
    "--seed": ("train.seed", int), "--teacher": ("teacher.name", str), "--teacher-weights": ("teacher.weights", str),
    "--device": ("train.device", str),
}


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


def alias_overrides(args: argparse.Namespace) -> list[str]:
    """distill-datafree's flags as ``key=value`` overrides of the datafree recipe (a flag not given sets nothing)."""
    overrides = []
    for flag, (key, _) in ALIAS_FLAGS.items():
        value = getattr(args, flag.lstrip("-").replace("-", "_"), None)
        if value is not None:
            overrides.append(f"{key}={json.dumps(value)}")  # JSON is YAML: a path stays text, a number a number
    if args.resume:
        overrides.append("train.resume=true")
    return overrides


def run_distill(args: argparse.Namespace) -> int:
    log = reporter("distill-datafree")
    _require_set(args.data, "--data")  # named by the flags this command was given
    if args.eval_data:
        _require_set(args.eval_data, "--eval-data")
    require_file(args.student_weights, "--student-weights", "weights file")
    _check_teacher(args)
    cfg = load_run_config(None, alias_overrides(args), recipe="datafree")
    check_run_inputs(cfg)
    log("clipdistill distill-datafree: an old name, kept for one release: this runs clipdistill distill --recipe "
        "datafree " + " ".join(shlex.quote(o) for o in alias_overrides(args)))
    print(json.dumps(run_distillation(cfg, log=log)))
    return 0


def run_eval(args: argparse.Namespace) -> int:
    require_path(args.checkpoint, "--checkpoint", "checkpoint, run folder or export file")
    _require_set(args.data, "--data")
    held = read_synthetic_set(args.data, what="--data")
    _check_teacher(args)
    checkpoint = run_checkpoint(args.checkpoint, "--checkpoint")
    teacher = {k: v for k, v in (("name", args.teacher), ("weights", args.teacher_weights)) if v is not None} or None
    with tempfile.TemporaryDirectory(prefix="datafree-eval-") as work:
        # The manifest's images only, as the trainer's held-out scoring reads them, and as a labeled
        # folder (links in one subfolder per class) for each model's top-1 against the class an image
        # was made for, as the old command reported.
        listed = Path(work) / "images.txt"
        held.samples.save(listed)
        labeled, names = Path(work) / "by_class", Path(work) / "classes.txt"
        for i, label in enumerate(held.labels.tolist()):
            folder = labeled / f"c{label:05d}"
            folder.mkdir(parents=True, exist_ok=True)
            source = Path(held.samples.full_path(i))
            (folder / f"{i:07d}{source.suffix}").symlink_to(source.resolve())
        names.write_text("".join(f"c{j:05d}\t{name}\n" for j, name in enumerate(held.class_names)
                                 if (labeled / f"c{j:05d}").is_dir()), encoding="utf-8")
        report = run_evaluation(
            [Dataset(str(labeled), str(names), None)], distilled=checkpoint, teacher=teacher, student=None,
            use_teacher=True, base_to_novel=False, unlabeled=str(listed), unlabeled_class_names=None,
            settings=LoaderSettings(args.batch_size, "torch", resolve_device(args.device, what="--device"), None,
                                    None),
            log=reporter("datafree-eval"),
        )
    unlabeled, top1 = report["unlabeled"], report["datasets"][0]["top1"]
    print(json.dumps({**unlabeled["student_distilled"], "images": unlabeled["images"],
                      "rejected": unlabeled["rejected"], "teacher_prompt_class_top1": top1["teacher"],
                      "student_prompt_class_top1": top1["student_distilled"]}))
    return 0
