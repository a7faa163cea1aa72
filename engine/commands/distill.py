"""``clipdistill distill``: a shipped recipe, a YAML file and key=value overrides, then the training loop."""
from __future__ import annotations

import argparse
import json
import os
import sys

import yaml

from clipdistill.engine.commands.common import check_run_inputs, reporter
from clipdistill.engine.config.run import RECIPES, RunConfig, dump_run_config, load_run_config
from clipdistill.engine.datafree.dataset import is_synthetic_set
from clipdistill.engine.training.sources import datafree_config
from clipdistill.engine.training.trainer import distill


def run_config_from_args(args: argparse.Namespace) -> RunConfig:
    """The run's config from ``--recipe``, ``--config``, the flags that stand for keys, and ``key=value``."""
    # `deepspeed=ds_config.json` is short for train.deepspeed=ds_config.json.
    overrides = [f"train.{o}" if o.startswith("deepspeed=") else o for o in args.overrides]
    if getattr(args, "resume", False):
        overrides.append("train.resume=true")
    if getattr(args, "overwrite", False):
        overrides.append("train.overwrite=true")
    if getattr(args, "out_dir", None):
        overrides.append(f"train.out_dir={json.dumps(args.out_dir)}")  # a JSON string is YAML: `#`, null stay text
    return load_run_config(args.config, overrides, recipe=args.recipe)


def print_config(cfg: RunConfig) -> None:
    """The resolved config as YAML on stdout; ``--config`` reads it back to the same run."""
    sys.stdout.write(yaml.safe_dump(dump_run_config(cfg), sort_keys=False, allow_unicode=True))


def _cmd_distill(args: argparse.Namespace) -> int:
    cfg = run_config_from_args(args)
    if args.print_config:
        if cfg.method == "datafree" and is_synthetic_set(cfg.data.train):
            cfg, _ = datafree_config(cfg, log=lambda message: None)  # the set's teacher, as the run takes it
        print_config(cfg)
        return 0
    check_run_inputs(cfg)  # every path and name, before any model is built
    summary = distill(cfg, log=reporter("distill"))
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


def add_run_config_arguments(parser: argparse.ArgumentParser) -> None:
    """``--config``, ``--recipe`` and the ``key=value`` overrides: a run's config, as distill reads it."""
    parser.add_argument("--config", default=None, metavar="FILE",
                        help="YAML run config (may name its recipe with 'recipe:')")
    parser.add_argument("--recipe", default=None, choices=RECIPES,
                        help="shipped recipe: kdpl (KDPL, any learner), kdpl-ca (KDPL without class names, over "
                             "a 20k-concept vocabulary), promptkd / promptkd-xd (PromptKD) or datafree (a timm "
                             "student on a synthetic set from clipdistill synthesize)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. optim.lr=0.01")


def register(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "distill", help="distill a teacher into a prompt-tuned student (KDPL, KDPL-CA, PromptKD) or a data-free one",
        description="Distill a frozen CLIP teacher into a student's prompts on unlabeled images. "
                    "Settings: a shipped recipe, a YAML file and key=value overrides (e.g. optim.lr=0.01). "
                    "Recipes: " + ", ".join(RECIPES) + ".",
    )
    add_run_config_arguments(parser)
    parser.add_argument("--resume", action="store_true",
                        help="continue the run recorded in train.out_dir from its newest intact checkpoint")
    parser.add_argument("--overwrite", action="store_true",
                        help="start a new run in a train.out_dir that holds another one (that run's files move "
                             "to train.out_dir/previous/<its run id>/; nothing is deleted)")
    parser.add_argument("--out-dir", default=None, metavar="DIR", help="the run's folder (sets train.out_dir)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config as YAML and exit (builds nothing)")
    parser.set_defaults(func=_cmd_distill)
    return parser
