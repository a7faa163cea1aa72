"""``clipdistill export`` and ``clipdistill predict``: a distilled student as one file, and its predictions."""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from clipdistill.engine.commands.common import (add_checkpoint, add_class_names, add_device, add_out_file,
                                                check_class_names, check_templates, checkpoint_arg, require_file,
                                                require_out_file, require_path, require_source, run_checkpoint)
from clipdistill.engine.evaluation.export import export_from_checkpoint, load_export, predict, read_distilled
from clipdistill.engine.io import read_class_names, read_templates, resolve_device


def _device(spec: str) -> torch.device:
    return resolve_device(spec, what="--device")


def _cmd_export(args: argparse.Namespace) -> int:
    checkpoint = checkpoint_arg(args)
    require_path(checkpoint, "--checkpoint", "training checkpoint or run folder")
    checkpoint = run_checkpoint(checkpoint, "--checkpoint")  # a run folder: its best, else its newest
    check_class_names(args.class_names, "--class-names")
    check_templates(args.templates, "--templates")
    require_out_file(args.out)
    names = read_class_names(args.class_names, what="--class-names") if args.class_names else None
    templates = read_templates(args.templates, what="--templates") if args.templates else None
    out = export_from_checkpoint(checkpoint, args.out, class_names=names, templates=templates,
                                 include_backbone=args.include_backbone, device=_device(args.device),
                                 class_vector_cache=args.class_vector_cache)
    header = read_distilled(out).header
    print(json.dumps({"export": str(out), "bytes": os.path.getsize(out), "method": header["method"],
                      "student": header["student"]["name"], "learner": header["learner"]["kind"],
                      "classes": len(header["class_names"]), "class_vectors": header["class_vectors"],
                      "backbone": header["backbone"]}))
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    require_file(args.checkpoint, "--checkpoint", "export file")
    for images in args.images:
        require_source(images, "IMAGES")
    require_file(args.student_weights, "--student-weights", "weights file")
    require_out_file(args.out)
    student = load_export(args.checkpoint, device=_device(args.device), expect_student=args.student,
                          student_weights=args.student_weights)
    out = open(args.out, "w", encoding="utf-8") if args.out else sys.stdout
    try:
        for record in predict(student, args.images, top_k=args.top_k, batch_size=args.batch_size,
                              backend=args.backend, workers=args.workers, cache_dir=args.cache_dir):
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
    finally:
        if out is not sys.stdout:
            out.close()
    return 0


def register(subparsers) -> None:
    """Add ``export`` and ``predict`` to the ``clipdistill`` command line."""
    export = subparsers.add_parser(
        "export", help="write a distilled student (prompts, projector, class vectors) to one safetensors file",
        description="Export the student of a training checkpoint: its prompts (and PromptKD's projector with its "
                    "buffers) and the class vectors, in one safetensors file with a JSON header.",
    )
    add_checkpoint(export, positional=True,
                   help="a training checkpoint (<out_dir>/checkpoints/step-*.safetensors or best.safetensors); "
                        "also accepted as the first argument")
    add_out_file(export, help="the export file to write (.safetensors)")
    add_class_names(export, help="class-name file (default: the run's)")
    export.add_argument("--templates", default=None, help="template set or file (default: the run's)")
    export.add_argument("--include-backbone", action="store_true",
                        help="store the student CLIP's weights in the file too (self-contained)")
    add_device(export, help="auto, cpu, cuda or cuda:i (PromptKD loads the teacher)")
    export.add_argument("--class-vector-cache", default=None, help="folder caching the teacher's class vectors")
    export.set_defaults(func=_cmd_export)

    pred = subparsers.add_parser(
        "predict", help="classify images with an exported student (JSON lines, no teacher)",
        description="Top-k classes with softmax scores for each image, one JSON object per line, in input order.",
    )
    pred.add_argument("images", nargs="+", help="image files, folders or list files")
    add_checkpoint(pred, old=("--model",), help="an export file (clipdistill export)")
    pred.add_argument("--top-k", type=int, default=5)
    pred.add_argument("--batch-size", type=int, default=64)
    add_device(pred)
    pred.add_argument("--backend", default="torch", help="image loader backend: torch, dali-cpu, dali-gpu, auto")
    pred.add_argument("--workers", type=int, default=None, help="decoding workers (default: all cores)")
    pred.add_argument("--student", default=None, help="refuse unless the export is for this student architecture")
    pred.add_argument("--student-weights", default=None,
                      help="the student weights file at its new location (checked against the recorded SHA-256)")
    pred.add_argument("--cache-dir", default=None,
                      help="where the image list of tar shards is saved (folders are scanned afresh)")
    add_out_file(pred, required=False, help="write the JSON lines here instead of stdout")
    pred.set_defaults(func=_cmd_predict)
