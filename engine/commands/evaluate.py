"""``clipdistill eval``: zero-shot, base-to-novel, cross-dataset, agreement and out-of-distribution reports."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Optional

from clipdistill.engine.commands.common import (InputError, add_checkpoint, add_class_names, add_device, add_out_file,
                                                add_teacher, check_class_names, check_model_input, check_templates,
                                                reporter, require_dir, require_out_file, require_path, require_source,
                                                run_checkpoint)
from clipdistill.engine.evaluation.domains import FewShot, run_domain_evaluation
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


FEW_SHOT_FLAGS = (("few_shot_domain", "--few-shot-domain"), ("few_shot_seed", "--few-shot-seed"),
                  ("few_shot_epochs", "--few-shot-epochs"), ("few_shot_lr", "--few-shot-lr"))


def _check_domain_flags(args: argparse.Namespace) -> None:
    """--domains: one root, one names file, one template set; --few-shot and its flags only with it."""
    if args.domains is None:
        if args.few_shot is not None:
            raise InputError("--few-shot fine-tunes on one domain of --domains ROOT: give --domains")
    else:
        if args.data:
            raise InputError("--domains and --data: give one of them (--domains ROOT evaluates every "
                             "ROOT/<domain>; --data evaluates folders of their own classes)")
        if args.unlabeled:
            raise InputError("--unlabeled is not evaluated with --domains: run eval --unlabeled apart")
        for key, values in (("--class-names", args.class_names), ("--templates", args.templates)):
            if values and len(values) > 1:
                raise InputError(f"{key} given {len(values)} times: with --domains it is given once, for every "
                                 f"domain")
        if args.few_shot is not None and not args.checkpoint:
            raise InputError("--few-shot fine-tunes the distilled student: give it with --checkpoint")
    if args.few_shot is None:
        given = [flag for dest, flag in FEW_SHOT_FLAGS if getattr(args, dest) is not None]
        if given:
            raise InputError(f"{', '.join(given)} without --few-shot K: give --few-shot too")


def _check_inputs(args: argparse.Namespace) -> None:
    """Every path and model name, before a model is built."""
    _check_domain_flags(args)
    require_dir(args.domains, "--domains", "folder of domains")
    for folder in args.data or []:
        require_dir(folder, "--data", "labeled folder")
    for names in args.class_names or []:
        check_class_names(names, "--class-names")
    for spec in args.templates or []:
        check_templates(spec, "--templates")
    require_path(args.checkpoint, "--checkpoint", "checkpoint, export file or run folder")
    args.checkpoint = run_checkpoint(args.checkpoint, "--checkpoint")  # a run folder: its best, else newest
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
    common = dict(distilled=args.checkpoint, teacher=teacher, student=student, use_teacher=not args.no_teacher,
                  base_to_novel=args.base_to_novel,
                  settings=LoaderSettings(args.batch_size, args.backend, resolve_device(args.device), args.workers,
                                          args.cache_dir),
                  class_vector_cache=args.class_vector_cache, log=reporter("eval"))
    if args.domains is not None:
        few_shot = None
        if args.few_shot is not None:
            given = (("seed", args.few_shot_seed), ("epochs", args.few_shot_epochs), ("lr", args.few_shot_lr))
            few_shot = FewShot(args.few_shot, domain=args.few_shot_domain,
                               **{key: value for key, value in given if value is not None})
        report = run_domain_evaluation(
            args.domains, class_names=(args.class_names or [None])[0], templates=(args.templates or [None])[0],
            few_shot=few_shot, **common)
    else:
        report = run_evaluation(
            datasets, unlabeled=args.unlabeled, unlabeled_class_names=args.unlabeled_class_names,
            default_templates=args.templates[0] if args.templates and not folders else None, **common)
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
                    "teacher-student agreement and KL on unlabeled images; or, with --domains, on every domain of a "
                    "domain-generalization dataset, optionally after few-shot fine-tuning on one domain "
                    "(--few-shot). Prints a table, then the report as one line of JSON.",
    )
    parser.add_argument("--data", action="append", default=None, metavar="FOLDER",
                        help="a labeled folder (repeat for a cross-dataset table)")
    parser.add_argument("--domains", default=None, metavar="ROOT",
                        help="out-of-distribution evaluation: every subfolder of ROOT is a domain with the same "
                             "class subfolders (ROOT/<domain>/<class>/<images>: PACS, VLCS, ImageCLEF-DA, VisDA); "
                             "top-1 per domain and the average. Not with --data or --unlabeled; --class-names and "
                             "--templates once, for every domain")
    parser.add_argument("--few-shot", type=int, default=None, metavar="K",
                        help="with --domains: also fine-tune a copy of the distilled student on K labeled images "
                             "per class of one domain and score it on every domain (column 'few-shot student'); "
                             "the average over the other domains is the out-of-distribution figure. The "
                             "checkpoint or export is never written")
    parser.add_argument("--few-shot-domain", default=None, metavar="NAME",
                        help="the domain the shots come from (default: the first in name order)")
    parser.add_argument("--few-shot-seed", type=int, default=None, metavar="S",
                        help="seed of the shots drawn, the views and the fine-tuning (default: 1)")
    parser.add_argument("--few-shot-epochs", type=int, default=None, metavar="E",
                        help="epochs over the shots (default: 10)")
    parser.add_argument("--few-shot-lr", type=float, default=None, metavar="LR",
                        help="AdamW's rate, cosine to 0 (default: 1e-4, a usual rate for fine-tuning a whole "
                             "pretrained network, as the data-free student is; prompt learners move little at it "
                             "in a few steps: try 1e-3). Batches of --batch-size; only the learner's trainable "
                             "parameters (prompts, projector; the data-free student's whole network) move")
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
