"""``clipdistill index SOURCE --out LIST``: validate every file, write clean and reject lists.

Registered into the ``clipdistill`` command by ``engine/cli.py`` through
:func:`register`; ``python -m clipdistill.loaders.cli index ...`` runs it alone.
The last line on stdout is a one-line JSON summary::

    {"total": N, "valid": N, "rejected": N, "reasons": {...}, ...}
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from .index import index_source
from .sources import EmptySourceError, check_source


def register(subparsers) -> argparse.ArgumentParser:
    """Add the ``index`` subcommand to an argparse subparsers object."""
    parser = subparsers.add_parser(
        "index",
        help="validate the images of a source; write a clean list and a reject list",
        description=(
            "Check every file of SOURCE (a folder, a list file, or tar shards such as 'shards/*.tar'): "
            "its magic bytes and, for JPEG/PNG, the end marker in the last 64 KiB; with --decode, "
            "a full decode too. Writes the clean list to --out and the rejects, with reasons, next to it. "
            "Prints a one-line JSON summary last."
        ),
    )
    parser.add_argument("source", help="folder, list file, .tar shard, or a glob or brace pattern of shards "
                                       "('shards-{00000..01023}.tar')")
    parser.add_argument("--out", required=True, help="path of the clean list to write")
    parser.add_argument("--rejects", default=None, help="path of the reject list (default: OUT.rejects.tsv)")
    parser.add_argument("--decode", action="store_true", help="also decode every image fully (slow)")
    parser.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    parser.add_argument("--rescan", action="store_true", help="rescan the source even if a saved list exists")
    parser.add_argument("--cache-dir", default=None, help="where scanned lists are kept")
    parser.set_defaults(func=run_index)
    return parser


def run_index(args: argparse.Namespace) -> int:
    """Run ``index`` on parsed arguments; returns the exit code (0, or 2 on a bad source)."""
    try:
        check_source(args.source)
        summary = index_source(
            args.source,
            args.out,
            rejects_out=args.rejects,
            decode=args.decode,
            workers=args.workers,
            progress=not getattr(args, "no_progress", False) and sys.stderr.isatty(),
            cache_dir=args.cache_dir,
            rescan=args.rescan,
        )
    except (EmptySourceError, FileNotFoundError, ValueError) as exc:
        print(f"clipdistill index: error: {exc}", file=sys.stderr)
        return 2
    print(
        f"checked {summary['total']} files in {summary['seconds']} s ({summary['files_per_s']} files/s): "
        f"{summary['valid']} valid -> {summary['out']}, {summary['rejected']} rejected -> {summary['rejects']}"
        + (f"; other files (not images, not counted): {summary['other_files']}" if summary["other_files"] else ""),
        file=sys.stderr,
    )
    print(json.dumps(summary), flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="clipdistill")
    index = register(parser.add_subparsers(dest="command", required=True))
    # `clipdistill` gives every command this flag; alone, the index command adds its own.
    index.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
