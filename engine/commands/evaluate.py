"""``clipdistill eval``: zero-shot, base-to-novel, cross-dataset and agreement reports."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Optional

from clipdistill.engine.commands.common import (add_checkpoint, add_class_names, add_device, add_out_file,
                                                add_teacher, check_class_names, check_model_input, check_templates,
                                                reporter, require_dir, require_out_file, require_path, require_source)
from clipdistill.engine.evaluation.evaluate import (Dataset, EvalInputError, LoaderSettings, format_report,
                                                    run_evaluation)
from clipdistill.engine.io import resolve_device


def _per_dataset(values: Optional[list[str]], count: int, flag: str) -> list[Optional[str]]:
    if not values:
        return [None] * count
    if len(values) == 1:
        return values * count
    if len(values) != count:
        raise EvalInputError(f"{flag} given {len(values)} times for {count} --data folders: give it once "
                             f"(for all) or once per folder, in the same order")
    return values


def _check_inputs(args: argparse.Namespace) -> None:
    """Every path and model name, before a model is built."""
    for folder in args.data or []:
        require_dir(folder, "--data", "labeled folder")
    for names in args.class_names or []:
        check_class_names(names, "--class-names")
    for spec in args.templates or []:
        check_templates(spec, "--templates")
    require_path(args.checkpoint, "--checkpoint", "checkpoint or export file")
    if not args.no_teacher:
        check_model_input(args.teacher, args.teacher_weights, name_key="--teacher", weights_key="--teacher-weights")
    check_model_input(args.student, args.student_weights, name_key="--student", weights_key="--student-weights")
    if args.unlabeled:
        require_source(args.unlabeled, "--unlabeled")
    check_class_names(args.unlabeled_class_names, "--unlabeled-class-names")
    require_out_file(args.out)


def _cmd_eval(args: argparse.Namespace) -> int:
    _check_inputs(args)
    folders = args.data or []
    names = _per_dataset(args.class_names, len(folders), "--class-names") if folders else []
    templates = _per_dataset(args.templates, len(folders), "--templates") if folders else []
    datasets = [Dataset(f, n, t) for f, n, t in zip(folders, names, templates)]
    # --teacher-weights alone: other weights of the distilled student's teacher
    teacher = {k: v for k, v in (("name", args.teacher), ("weights", args.teacher_weights)) if v is not None} or None
    student = {k: v for k, v in (("name", args.student), ("weights", args.student_weights)) if v is not None}
    report = run_evaluation(
        datasets, distilled=args.checkpoint, teacher=teacher, student=student, use_teacher=not args.no_teacher,
        base_to_novel=args.base_to_novel, unlabeled=args.unlabeled,
        unlabeled_class_names=args.unlabeled_class_names,
        default_templates=args.templates[0] if args.templates and not folders else None,
        settings=LoaderSettings(args.batch_size, args.backend, resolve_device(args.device), args.workers,
                                args.cache_dir),
        class_vector_cache=args.class_vector_cache,
        log=reporter("eval"),
    )
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1, ensure_ascii=False), encoding="utf-8")
    print(format_report(report))
    print(json.dumps(report, ensure_ascii=False))
    return 0


def register(subparsers) -> None:
    """Add ``eval`` to the ``clipdistill`` command line."""
    parser = subparsers.add_parser(
        "eval", help="zero-shot top-1 (teacher, student, distilled), base-to-novel, cross-dataset, agreement",
        description="Evaluate the teacher, the student without prompts and a distilled student (training "
                    "checkpoint or export file) on labeled folders (one subfolder per class), and their "
                    "teacher-student agreement and KL on unlabeled images. Prints a table, then the report as "
                    "one line of JSON.",
    )
    parser.add_argument("--data", action="append", default=None, metavar="FOLDER",
                        help="a labeled folder (repeat for a cross-dataset table)")
    add_class_names(parser, repeat=True, help="class-name file (once for all folders, or once per --data, in order)")
    parser.add_argument("--templates", action="append", default=None, metavar="SPEC",
                        help="template set name or file (once, or once per --data)")
    add_checkpoint(parser, required=False, old=("--distilled",),
                   help="the distilled student: a training checkpoint, best.safetensors or an export file")
    add_teacher(parser, name_help="teacher model name (default: the distilled student's teacher)",
                weights_help="teacher pretrained tag or file")
    parser.add_argument("--no-teacher", action="store_true", help="leave the teacher out")
    parser.add_argument("--student", default=None, help="student model name (default: the distilled student's)")
    parser.add_argument("--student-weights", default=None, help="student pretrained tag or file")
    parser.add_argument("--base-to-novel", action="store_true",
                        help="also score base (first half of the classes) and novel (second half) and their HM")
    parser.add_argument("--unlabeled", default=None, help="unlabeled images (folder, list file, shards): "
                                                          "teacher-student agreement and KL")
    parser.add_argument("--unlabeled-class-names", default=None, help="class names for --unlabeled "
                                                                      "(default: the first dataset's)")
    parser.add_argument("--batch-size", type=int, default=64)
    add_device(parser)
    parser.add_argument("--backend", default="torch", help="image loader backend: torch, dali-cpu, dali-gpu, auto")
    parser.add_argument("--workers", type=int, default=None, help="decoding workers (default: all cores)")
    parser.add_argument("--cache-dir", default=None,
                        help="where the image list of tar shards is saved (folders are scanned afresh)")
    parser.add_argument("--class-vector-cache", default=None, help="folder caching the teacher's class vectors")
    add_out_file(parser, required=False, help="also write the JSON report to this file")
    parser.set_defaults(func=_cmd_eval)
