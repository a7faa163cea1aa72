"""``clipdistill eval``: zero-shot, base-to-novel, cross-dataset and agreement reports."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

from clipdistill.engine.evaluation.evaluate import (Dataset, EvalInputError, LoaderSettings, format_report,
                                                    run_evaluation)
from clipdistill.engine.io import resolve_device
from clipdistill.engine.training.checkpoint import CheckpointError


def _per_dataset(values: Optional[list[str]], count: int, flag: str) -> list[Optional[str]]:
    if not values:
        return [None] * count
    if len(values) == 1:
        return values * count
    if len(values) != count:
        raise EvalInputError(f"{flag} given {len(values)} times for {count} --data folders: give it once "
                             f"(for all) or once per folder, in the same order")
    return values


def _cmd_eval(args: argparse.Namespace) -> int:
    try:
        folders = args.data or []
        names = _per_dataset(args.class_names, len(folders), "--class-names") if folders else []
        templates = _per_dataset(args.templates, len(folders), "--templates") if folders else []
        datasets = [Dataset(f, n, t) for f, n, t in zip(folders, names, templates)]
        teacher = {"name": args.teacher, "weights": args.teacher_weights} if args.teacher else None
        student = {k: v for k, v in (("name", args.student), ("weights", args.student_weights)) if v is not None}
        report = run_evaluation(
            datasets, distilled=args.distilled, teacher=teacher, student=student, use_teacher=not args.no_teacher,
            base_to_novel=args.base_to_novel, unlabeled=args.unlabeled,
            unlabeled_class_names=args.unlabeled_class_names,
            default_templates=args.templates[0] if args.templates and not folders else None,
            settings=LoaderSettings(args.batch_size, args.backend, resolve_device(args.device), args.workers,
                                    args.cache_dir),
            class_vector_cache=args.class_vector_cache,
            log=lambda m: print(m, file=sys.stderr),
        )
    except (ValueError, FileNotFoundError, CheckpointError) as exc:  # EvalInputError, ExportError, ConfigError
        print(f"clipdistill eval: error: {exc}", file=sys.stderr)
        return 2
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
    parser.add_argument("--class-names", action="append", default=None, metavar="FILE",
                        help="class-name file (once for all folders, or once per --data, in order)")
    parser.add_argument("--templates", action="append", default=None, metavar="SPEC",
                        help="template set name or file (once, or once per --data)")
    parser.add_argument("--distilled", default=None, help="a training checkpoint or an export file")
    parser.add_argument("--teacher", default=None, help="teacher model name (default: the distilled student's)")
    parser.add_argument("--teacher-weights", default=None, help="teacher pretrained tag or file")
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
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:i]")
    parser.add_argument("--backend", default="torch", help="image loader backend: torch, dali-cpu, dali-gpu, auto")
    parser.add_argument("--workers", type=int, default=None, help="decoding workers (default: all cores)")
    parser.add_argument("--cache-dir", default=None,
                        help="where the image list of tar shards is saved (folders are scanned afresh)")
    parser.add_argument("--class-vector-cache", default=None, help="folder caching the teacher's class vectors")
    parser.add_argument("--out", default=None, help="also write the JSON report to this file")
    parser.set_defaults(func=_cmd_eval)
