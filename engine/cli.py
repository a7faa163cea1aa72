"""The ``clipdistill`` command line.

Each subcommand is a module of :mod:`clipdistill.engine.commands` (and the loaders' ``index``)
with a ``register(subparsers)`` function that adds its parser and sets ``func`` (parsed args ->
exit code). Registering stays cheap: open_clip, DALI and DeepSpeed are imported only when a
command runs.

Here, once for every command (:mod:`clipdistill.engine.commands.common`): the common options
(``-v``, ``-q``, ``--debug``, ``--no-progress``, before or after the command's name), help that shows
defaults, logging, the progress switch, and errors: an exception that ends a command becomes one
line on stderr and a documented exit code (0 done, 1 a failure while running, 2 bad input, 3 a
non-finite loss, 130 interrupted); ``-v`` or ``--debug`` add the traceback.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import platform
import sys
import traceback
from types import ModuleType
from typing import Sequence

import torch

from clipdistill.engine import __version__
from clipdistill.engine._torchvision_compat import ensure_torchvision_importable
from clipdistill.engine.commands import cache_teacher, datafree, demo, distill, evaluate, export, plot, tune_teacher
from clipdistill.engine.commands.common import (EXIT_INPUT, HelpFormatter, common_options, configure_logging,
                                                exit_code_for, old_spelling_notes, one_line, verbosity)
from clipdistill.engine.progress import set_progress
from clipdistill.loaders import cli as loaders_cli

# The commands, in the order shown by --help.
SUBCOMMANDS: tuple[ModuleType, ...] = (
    distill,
    demo,
    cache_teacher,
    tune_teacher,
    evaluate,
    export,
    plot,
    datafree,
    loaders_cli,
)


def _info(args: argparse.Namespace) -> int:
    """Print what clipdistill sees: versions, devices and which optional backends import."""
    report: dict = {
        "clipdistill": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
    }
    for module in ("triton", "open_clip", "nvidia.dali", "deepspeed"):
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:
            found = False
        report[module.replace("nvidia.", "")] = found

    report["torchvision"] = ensure_torchvision_importable()
    print(json.dumps(report, indent=None if args.json else 2))
    return 0


class _Commands:
    """The subparsers object handed to every command's ``register``: each command's parser gets the
    common options and the help formatter, so no command can forget them."""

    def __init__(self, subparsers, common: argparse.ArgumentParser):
        self._subparsers = subparsers
        self._common = common

    def add_parser(self, name: str, **kwargs) -> argparse.ArgumentParser:
        kwargs.setdefault("formatter_class", HelpFormatter)
        kwargs["parents"] = [*kwargs.get("parents", ()), self._common]
        return self._subparsers.add_parser(name, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clipdistill", formatter_class=HelpFormatter, parents=[common_options(for_subcommand=False)],
        description="Distill large CLIP teachers into prompt-tuned students on unlabeled images.",
        epilog="exit codes: 0 done; 1 a failure while running; 2 bad input (flags, config, paths, files); "
               "3 a non-finite loss stopped distill; 130 interrupted",
    )
    parser.add_argument("--version", action="version", version=f"clipdistill {__version__}")
    subparsers = _Commands(parser.add_subparsers(dest="command", metavar="COMMAND"),
                           common_options(for_subcommand=True))
    info = subparsers.add_parser("info", help="versions, devices and available backends")
    info.add_argument("--json", action="store_true", help="one line of JSON")
    info.set_defaults(func=_info)
    for command in SUBCOMMANDS:
        command.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        # argparse stops a positional list at the first flag; key=value overrides after a flag
        # (`distill --recipe kdpl data.train=x --resume train.out_dir=y`) still belong to the run.
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = [*args.overrides, *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if getattr(args, "func", None) is None:
        parser.print_help(sys.stderr)
        return EXIT_INPUT
    level = verbosity(args)
    configure_logging(level)
    set_progress(not args.no_progress)
    log = logging.getLogger("clipdistill.cli")
    for note in old_spelling_notes(args):
        log.warning(note)
    try:
        return int(args.func(args) or 0)
    except (Exception, KeyboardInterrupt) as error:  # every command's errors end here, as one line
        if level >= 1:
            traceback.print_exc(file=sys.stderr)
        text = "interrupted" if isinstance(error, KeyboardInterrupt) else one_line(error)
        hint = "" if level >= 1 or isinstance(error, KeyboardInterrupt) else " (-v or --debug: the traceback)"
        code = exit_code_for(error)
        print(f"clipdistill {args.command}: error: {text}" + (hint if code == 1 else ""), file=sys.stderr)
        return code


if __name__ == "__main__":
    raise SystemExit(main())
