"""``clipdistill export`` and ``clipdistill predict``: a distilled student as one file, and its predictions."""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from clipdistill.engine.evaluation.export import export_from_checkpoint, load_export, predict, read_distilled
from clipdistill.engine.io import read_class_names, read_templates, resolve_device
from clipdistill.engine.training.checkpoint import CheckpointError


def _device(spec: str) -> torch.device:
    return resolve_device(spec)


def _cmd_export(args: argparse.Namespace) -> int:
    try:
        names = read_class_names(args.class_names) if args.class_names else None
        templates = read_templates(args.templates) if args.templates else None
        out = export_from_checkpoint(args.checkpoint, args.out, class_names=names, templates=templates,
                                     include_backbone=args.include_backbone, device=_device(args.device),
                                     class_vector_cache=args.class_vector_cache)
    except (ValueError, FileNotFoundError, CheckpointError) as exc:  # ExportError, ConfigError
        print(f"clipdistill export: error: {exc}", file=sys.stderr)
        return 2
    header = read_distilled(out).header
    print(json.dumps({"export": str(out), "bytes": os.path.getsize(out), "method": header["method"],
                      "student": header["student"]["name"], "learner": header["learner"]["kind"],
                      "classes": len(header["class_names"]), "class_vectors": header["class_vectors"],
                      "backbone": header["backbone"]}))
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    try:
        student = load_export(args.model, device=_device(args.device), expect_student=args.student,
                              student_weights=args.student_weights)
        out = open(args.out, "w", encoding="utf-8") if args.out else sys.stdout
        try:
            for record in predict(student, args.images, top_k=args.top_k, batch_size=args.batch_size,
                                  backend=args.backend, workers=args.workers, cache_dir=args.cache_dir):
                out.write(json.dumps(record, ensure_ascii=False) + "\n")
        finally:
            if out is not sys.stdout:
                out.close()
    except (ValueError, FileNotFoundError, CheckpointError) as exc:  # ExportError, ConfigError
        print(f"clipdistill predict: error: {exc}", file=sys.stderr)
        return 2
    return 0


def register(subparsers) -> None:
    """Add ``export`` and ``predict`` to the ``clipdistill`` command line."""
    export = subparsers.add_parser(
        "export", help="write a distilled student (prompts, projector, class vectors) to one safetensors file",
        description="Export the student of a training checkpoint: its prompts (and PromptKD's projector with its "
                    "buffers) and the class vectors, in one safetensors file with a JSON header.",
    )
    export.add_argument("checkpoint", help="a training checkpoint (<out_dir>/checkpoints/step-*.safetensors)")
    export.add_argument("--out", required=True, help="the export file to write (.safetensors)")
    export.add_argument("--class-names", default=None, help="class-name file (default: the run's)")
    export.add_argument("--templates", default=None, help="template set or file (default: the run's)")
    export.add_argument("--include-backbone", action="store_true",
                        help="store the student CLIP's weights in the file too (self-contained)")
    export.add_argument("--device", default="auto", help="auto, cpu or cuda[:i] (PromptKD loads the teacher)")
    export.add_argument("--class-vector-cache", default=None, help="folder caching the teacher's class vectors")
    export.set_defaults(func=_cmd_export)

    pred = subparsers.add_parser(
        "predict", help="classify images with an exported student (JSON lines, no teacher)",
        description="Top-k classes with softmax scores for each image, one JSON object per line, in input order.",
    )
    pred.add_argument("images", nargs="+", help="image files, folders or list files")
    pred.add_argument("--model", required=True, help="an export file (clipdistill export)")
    pred.add_argument("--top-k", type=int, default=5)
    pred.add_argument("--batch-size", type=int, default=64)
    pred.add_argument("--device", default="auto", help="auto, cpu or cuda[:i]")
    pred.add_argument("--backend", default="torch", help="image loader backend: torch, dali-cpu, dali-gpu, auto")
    pred.add_argument("--workers", type=int, default=None, help="decoding workers (default: all cores)")
    pred.add_argument("--student", default=None, help="refuse unless the export is for this student architecture")
    pred.add_argument("--student-weights", default=None,
                      help="the student weights file at its new location (checked against the recorded SHA-256)")
    pred.add_argument("--cache-dir", default=None,
                      help="where the image list of tar shards is saved (folders are scanned afresh)")
    pred.add_argument("--out", default=None, help="write the JSON lines here instead of stdout")
    pred.set_defaults(func=_cmd_predict)
