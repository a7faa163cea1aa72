"""``clipdistill cache-teacher``: compute the teacher's features for K views of every image, once."""
from __future__ import annotations

import argparse
import json
import os

from clipdistill.engine.commands.common import (InputError, add_out_dir, check_class_names, check_model_input,
                                                check_templates, reporter, require_out_dir, require_source)
from clipdistill.engine.commands.distill import add_run_config_arguments
from clipdistill.engine.config.run import load_run_config
from clipdistill.engine.progress import progress_enabled
from clipdistill.engine.training.teacher_cache import build_teacher_cache


def _cmd_cache(args: argparse.Namespace) -> int:
    cfg = load_run_config(args.config, list(args.overrides), recipe=args.recipe)
    if args.views < 1:
        raise InputError(f"--views must be >= 1, got {args.views}")
    require_source(cfg.data.train, "data.train")
    if cfg.data.class_names:
        check_class_names(cfg.data.class_names, "data.class_names")
    check_templates(cfg.data.templates, "data.templates")
    check_model_input(cfg.teacher.name, cfg.teacher.weights, name_key="teacher.name", weights_key="teacher.weights")
    require_out_dir(args.out_dir)
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    summary = build_teacher_cache(cfg, views=args.views, out=args.out_dir, shard_size=args.shard_size,
                                  batch_size=args.batch_size, rank=rank, world_size=world,
                                  log=reporter("cache-teacher"), progress=progress_enabled())
    print(json.dumps(summary))
    return 0


def register(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "cache-teacher", help="run the teacher once per image and view; training replays it (teacher.cache=DIR)",
        description="Store the teacher's normalized image features (fp16) and the view numbers of K views of "
                    "every image, in checksummed numpy shards; resumable; ranks (RANK/WORLD_SIZE) take shards "
                    "round-robin.",
    )
    add_run_config_arguments(parser)
    parser.add_argument("--views", type=int, required=True, help="views per image (K)")
    add_out_dir(parser, help="cache folder (an unfinished one is resumed)")
    parser.add_argument("--shard-size", type=int, default=1024, help="images per shard")
    parser.add_argument("--batch-size", type=int, default=256, help="views encoded together")
    parser.set_defaults(func=_cmd_cache)
    return parser
