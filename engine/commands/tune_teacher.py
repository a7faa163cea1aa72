"""``clipdistill tune-teacher``: PromptKD's first stage from the command line."""
from __future__ import annotations

import argparse
import json

from clipdistill.engine.commands.common import (add_class_names, add_device, add_out_file, add_teacher,
                                                check_model_input, check_templates, reporter, require_dir,
                                                require_file, require_out_file)
from clipdistill.engine.training.tune_teacher import ON_SHORT_CLASS, TuneSettings, tune_teacher


def _cmd_tune_teacher(args: argparse.Namespace) -> int:
    require_dir(args.data, "--data", "labeled folder")
    require_file(args.class_names, "--class-names", "class-name file")
    check_templates(args.templates, "--templates")
    require_dir(args.eval_data, "--eval-data", "labeled folder")
    check_model_input(args.teacher, args.teacher_weights, name_key="--teacher", weights_key="--teacher-weights")
    require_out_file(args.out)
    learner_options = {"n_text_ctx": args.n_ctx, "text_depth": args.depth,
                       "n_vision_ctx": args.n_ctx if args.n_vision_ctx is None else args.n_vision_ctx,
                       "vision_depth": args.depth if args.vision_depth is None else args.vision_depth}
    if args.init_words is not None:
        learner_options["init_words"] = args.init_words or None
    settings = TuneSettings(
        shots=args.shots, seed=args.seed, on_short_class=args.on_short_class, epochs=args.epochs, lr=args.lr,
        batch_size=args.batch_size, warmup_epochs=args.warmup_epochs, gpa_mean=args.gpa_mean,
        backend=args.backend, workers=args.workers,
    )
    result = tune_teacher(
        args.teacher, args.teacher_weights, args.data, out=args.out, class_names=args.class_names,
        templates=args.templates, learner_options=learner_options, settings=settings, device=args.device,
        frozen_templates=None if args.frozen_templates == "none" else args.frozen_templates,
        prompt_placement=args.prompt_placement,
        precision=args.precision, eval_data=args.eval_data, log=reporter("tune-teacher"),
    )
    print(json.dumps(result.as_dict()))
    return 0


def register(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "tune-teacher", help="prompt-tune a teacher with PromptSRC on a few labeled images (PromptKD stage 1)",
        description="Prompt-tune a frozen CLIP teacher with PromptSRC (deep text and vision prompts) on N labeled "
                    "images per class, and save the prompts to one .safetensors file that 'distill' can load.",
    )
    add_teacher(parser, required=True, old_weights=("--weights",))
    parser.add_argument("--data", required=True, help="labeled folder: one subfolder of images per class")
    add_class_names(parser, help="one class name per line, in label order ('folder<TAB>name' maps a folder); "
                                 "default: the folder names")
    parser.add_argument("--shots", type=int, default=16, help="images per class (default 16)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the shot draw and the training (default 1)")
    parser.add_argument("--on-short-class", choices=ON_SHORT_CLASS, default="error",
                        help="a class with fewer than --shots images: refuse (default), use all its images, or skip it")
    parser.add_argument("--templates", default="imagenet",
                        help="template set name or file for PromptSRC's frozen class features (default imagenet)")
    parser.add_argument("--frozen-templates", default="imagenet_60",
                        help="PromptSRC's frozen text target: a template set or file (default imagenet_60, the "
                             "published 60 templates; 'none': --templates)")
    parser.add_argument("--prompt-placement", choices=["before_ln_pre", "after_ln_pre"], default="before_ln_pre",
                        help="where vision prompts join the image tokens (default before_ln_pre, as published)")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--lr", type=float, default=0.0025)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--warmup-epochs", type=int, default=1, help="epochs at lr 1e-5 before the cosine schedule")
    parser.add_argument("--gpa-mean", type=float, default=0.75,
                        help="centre of the Gaussian prompt aggregation as a fraction of --epochs, as learner.gpa_mean "
                             "(default 0.75: epoch 15 of 20, as published)")
    parser.add_argument("--n-ctx", type=int, default=4, help="text prompt tokens (default 4)")
    parser.add_argument("--n-vision-ctx", type=int, default=None, help="vision prompt tokens (default: --n-ctx)")
    parser.add_argument("--depth", type=int, default=9, help="text prompt depth in layers (default 9)")
    parser.add_argument("--vision-depth", type=int, default=None, help="vision prompt depth (default: --depth)")
    parser.add_argument("--init-words", default=None, help="text context initialization (default 'a photo of a')")
    add_device(parser)
    parser.add_argument("--precision", default=None, help="backbone precision (default bf16 on a GPU, fp32 on the CPU)")
    parser.add_argument("--backend", default="auto", help="image loader backend: auto, torch, dali-cpu, dali-gpu")
    parser.add_argument("--workers", type=int, default=None, help="image decoding workers")
    parser.add_argument("--eval-data", default=None,
                        help="held-out labeled folder with the same classes: report top-1 before and after")
    add_out_file(parser, help="the .safetensors file to write")
    parser.set_defaults(func=_cmd_tune_teacher)
    return parser
