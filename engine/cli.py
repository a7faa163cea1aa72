"""The ``clipdistill`` command line.

Each subcommand is a module of :mod:`clipdistill.engine.commands` (and the loaders' ``index``)
with a ``register(subparsers)`` function that adds its parser and sets ``func`` (parsed args ->
exit code). Registering stays cheap: open_clip, DALI and DeepSpeed are imported only when a
command runs.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import sys
from types import ModuleType
from typing import Sequence

import torch

from clipdistill.engine import __version__
from clipdistill.engine._torchvision_compat import ensure_torchvision_importable
from clipdistill.engine.commands import cache_teacher, datafree, demo, distill, evaluate, export, tune_teacher
from clipdistill.loaders import cli as loaders_cli

# The commands, in the order shown by --help.
SUBCOMMANDS: tuple[ModuleType, ...] = (
    distill,
    demo,
    cache_teacher,
    tune_teacher,
    evaluate,
    export,
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clipdistill",
        description="Distill large CLIP teachers into prompt-tuned students on unlabeled images.",
    )
    parser.add_argument("--version", action="version", version=f"clipdistill {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    info = subparsers.add_parser("info", help="versions, devices and available backends")
    info.add_argument("--json", action="store_true", help="one line of JSON")
    info.set_defaults(func=_info)
    for command in SUBCOMMANDS:
        command.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help(sys.stderr)
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
