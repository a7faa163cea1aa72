"""``clipdistill distill``: a shipped recipe, a YAML file and key=value overrides, then the training loop."""
from __future__ import annotations

import argparse
import json
import os
import sys

from clipdistill.engine.config.run import load_run_config
from clipdistill.engine.training.trainer import NonFiniteLossError, distill


def _cmd_distill(args: argparse.Namespace) -> int:
    # `deepspeed=ds_config.json` is short for train.deepspeed=ds_config.json.
    overrides = [f"train.{o}" if o.startswith("deepspeed=") else o for o in args.overrides]
    if args.resume:
        overrides.append("train.resume=true")
    if args.overwrite:
        overrides.append("train.overwrite=true")
    try:
        cfg = load_run_config(args.config, overrides, recipe=args.recipe)
        summary = distill(cfg, log=lambda m: print(m, file=sys.stderr))
    except NonFiniteLossError as exc:
        print(f"clipdistill distill: error: {exc}", file=sys.stderr)
        return 3
    except (ValueError, OSError, KeyError) as exc:  # bad config, data or files, a folder that cannot be written
        print(f"clipdistill distill: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary))
    if cfg.train.deepspeed:
        # Everything is written (rank 0's checkpoint before the final barrier) and flushed. After
        # a run with DeepSpeed's ZeRO-3 teacher, the interpreter's teardown was seen to abort in a
        # native destructor ("terminate called without an active exception", SIGABRT; CPU/gloo,
        # see ../shared/ENVIRONMENT.md) before distill() destroyed its process group; not seen
        # since, but leaving without the teardown keeps a finished run's exit code 0 regardless.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


def register(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "distill", help="distill a teacher into a prompt-tuned student (KDPL, PromptKD)",
        description="Distill a frozen CLIP teacher into a student's prompts on unlabeled images. "
                    "Settings: a shipped recipe, a YAML file and key=value overrides (e.g. optim.lr=0.01).",
    )
    parser.add_argument("--config", default=None, help="YAML run config (may name its recipe with 'recipe:')")
    parser.add_argument("--recipe", default=None, help="shipped recipe: kdpl or promptkd")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run recorded in train.out_dir from its newest intact checkpoint")
    parser.add_argument("--overwrite", action="store_true",
                        help="start a new run in a train.out_dir that holds another one (that run's files move "
                             "to train.out_dir/previous/<its run id>/; nothing is deleted)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    parser.set_defaults(func=_cmd_distill)
    return parser
