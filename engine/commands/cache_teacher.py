"""``clipdistill cache-teacher``: compute the teacher's features for K views of every image, once."""
from __future__ import annotations

import argparse
import json
import os
import sys

from clipdistill.engine.config.run import load_run_config
from clipdistill.engine.training.teacher_cache import build_teacher_cache


def _cmd_cache(args: argparse.Namespace) -> int:
    try:
        cfg = load_run_config(args.config, list(args.overrides), recipe=args.recipe)
        rank = int(os.environ.get("RANK", 0))
        world = int(os.environ.get("WORLD_SIZE", 1))
        summary = build_teacher_cache(cfg, views=args.views, out=args.out, shard_size=args.shard_size,
                                      batch_size=args.batch_size, rank=rank, world_size=world,
                                      log=lambda m: print(m, file=sys.stderr), progress=not args.no_progress)
    except (ValueError, FileNotFoundError) as exc:
        print(f"clipdistill cache-teacher: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary))
    return 0


def register(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "cache-teacher", help="run the teacher once per image and view; training replays it (teacher.cache=DIR)",
        description="Store the teacher's normalized image features (fp16) and the view numbers of K views of "
                    "every image, in checksummed numpy shards; resumable; ranks (RANK/WORLD_SIZE) take shards "
                    "round-robin.",
    )
    parser.add_argument("--config", default=None, help="the run's YAML config (teacher, data, seed)")
    parser.add_argument("--recipe", default=None, help="shipped recipe: kdpl, kdpl-ca or promptkd")
    parser.add_argument("--views", type=int, required=True, help="views per image (K)")
    parser.add_argument("--out", required=True, help="cache folder (an unfinished one is resumed)")
    parser.add_argument("--shard-size", type=int, default=1024, help="images per shard")
    parser.add_argument("--batch-size", type=int, default=256, help="views encoded together")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    parser.set_defaults(func=_cmd_cache)
    return parser
