"""The ``clipdistill`` command line.

Each subcommand lives with the code it drives and registers itself through a
``register(subparsers)`` function that adds its parser and sets ``func`` (parsed
args -> exit code). Registering must stay cheap: heavy imports (torch models,
DALI, DeepSpeed) happen inside ``func``.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
from typing import Sequence

from . import __version__

# Modules providing register(subparsers), in the order shown by --help.
SUBCOMMAND_MODULES: tuple[str, ...] = (
    "clipdistill.engine.train",
    "clipdistill.engine.demo",
    "clipdistill.engine.teacher_cache",
    "clipdistill.engine.tune_teacher",
    "clipdistill.engine.bench_e2e",
    "clipdistill.engine.evaluate",
    "clipdistill.engine.export",
    "clipdistill.engine.datafree.cli",
    "clipdistill.loaders.cli",
)


def _info(args: argparse.Namespace) -> int:
    """Print what clipdistill sees: versions, devices and which optional backends import."""
    import importlib.util
    import platform

    import torch

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
    from ._torchvision_compat import ensure_torchvision_importable

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
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
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
