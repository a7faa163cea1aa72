"""``clipdistill plot RUN_DIR``: a run's training curves, drawn from its ``metrics.jsonl``, as one PNG.

The trainer writes two kinds of rows (:mod:`clipdistill.engine.training.trainer`): every
``train.log_every`` steps the loss parts (``loss/<part>``), ``lr``, ``images_per_s`` and counters;
at every checkpoint with a held-out share, ``heldout/agreement`` (percent) and ``heldout/kl``
(nats). A resumed run appends rows for steps it had already logged before it was stopped; the
later row of a step wins, so the curves show the run that produced the final checkpoint.

matplotlib is an optional extra (``pip install 'clipdistill[plots]'``).
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Optional

from clipdistill.engine.commands.common import InputError, add_out_file, require_dir, require_out_file

METRICS_FILE = "metrics.jsonl"


def read_metrics(path: str | Path) -> tuple[dict[int, dict], dict[int, dict]]:
    """The training rows and the held-out rows of a ``metrics.jsonl``, each by step (later rows win).

    Raises:
        InputError: a line that is not a JSON object with an integer ``step`` (named by its number).
    """
    train: dict[int, dict] = {}
    heldout: dict[int, dict] = {}
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                step = int(row["step"])
            except (ValueError, KeyError, TypeError) as exc:
                if lineno > 1 and not line.endswith("\n"):
                    break  # a last line cut short by a killed run
                raise InputError(f"{path}:{lineno}: not a metrics row ({exc})") from exc
            if any(k.startswith("heldout/") for k in row):
                heldout[step] = {**heldout.get(step, {}), **row}
            else:
                train[step] = row
    return train, heldout


def _series(rows: dict[int, dict], key: str) -> tuple[list[int], list[float]]:
    steps = [s for s in sorted(rows) if isinstance(rows[s].get(key), (int, float)) and math.isfinite(rows[s][key])]
    return steps, [float(rows[s][key]) for s in steps]


def plot_run(run_dir: str | Path, out: Optional[str | Path] = None) -> Path:
    """Draw a run's loss parts, learning rate, images/s and held-out agreement and KL to a PNG.

    Args:
        run_dir: a ``train.out_dir`` holding ``metrics.jsonl``.
        out: the PNG to write (default ``<run_dir>/metrics.png``).

    Returns:
        the PNG's path.

    Raises:
        InputError: no metrics file, no rows in it, or matplotlib missing (the extra is named).
    """
    run_dir = Path(run_dir)
    metrics = run_dir / METRICS_FILE
    if not metrics.is_file():
        raise InputError(f"RUN_DIR: {str(run_dir)!r} holds no {METRICS_FILE} (is it a distill run's train.out_dir?)")
    train, heldout = read_metrics(metrics)
    if not train and not heldout:
        raise InputError(f"RUN_DIR: {metrics} holds no metrics rows yet")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise InputError("plot needs matplotlib: pip install 'clipdistill[plots]'") from exc

    out = Path(out) if out is not None else run_dir / "metrics.png"
    losses = sorted({k for row in train.values() for k in row if k.startswith("loss/")})
    panels = [
        ("loss parts", [(k[len("loss/"):], *_series(train, k)) for k in losses], "loss"),
        ("learning rate", [("lr", *_series(train, "lr"))], "lr"),
        ("throughput", [("images/s", *_series(train, "images_per_s"))], "images/s"),
        ("held-out teacher-student agreement", [("agreement", *_series(heldout, "heldout/agreement"))], "%"),
        ("held-out KL(teacher || student)", [("KL", *_series(heldout, "heldout/kl"))], "nats"),
    ]
    fig, axes = plt.subplots(2, 3, figsize=(14, 7.5), constrained_layout=True)
    for ax, (title, curves, ylabel) in zip(axes.flat, panels):
        drawn = False
        for label, steps, values in curves:
            if steps:
                ax.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3, label=label)
                drawn = True
        if not drawn:
            ax.text(0.5, 0.5, "no rows" + (" (data.holdout_fraction = 0?)" if "held-out" in title else ""),
                    ha="center", va="center", transform=ax.transAxes, color="gray")
        elif len(curves) > 1:
            ax.legend(fontsize=8)
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes.flat[-1].axis("off")
    last = train[max(train)] if train else {}
    axes.flat[-1].text(0.0, 0.9, "\n".join(
        [f"run: {run_dir}", f"steps logged: {len(train)} (last {max(train) if train else '-'})",
         f"images seen: {last.get('images_seen', '-')}", f"rejected images: {last.get('rejected_images', '-')}",
         f"held-out evaluations: {len(heldout)}"]), va="top", family="monospace", fontsize=9,
        transform=axes.flat[-1].transAxes)
    fig.suptitle(f"clipdistill run {run_dir.name}")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _cmd_plot(args: argparse.Namespace) -> int:
    require_dir(args.run_dir, "RUN_DIR", "run folder")
    require_out_file(args.out)
    out = plot_run(args.run_dir, args.out)
    print(json.dumps({"plot": str(out)}))
    return 0


def register(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "plot", help="draw a run's loss parts, lr, images/s and held-out agreement/KL to a PNG",
        description="Read RUN_DIR/metrics.jsonl (written by distill) and draw the loss parts, the learning rate, "
                    "images/s and the held-out agreement and KL per checkpoint to one PNG. Needs matplotlib "
                    "(pip install 'clipdistill[plots]').",
    )
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a distill run's folder (train.out_dir)")
    add_out_file(parser, required=False, help="the PNG to write (default: RUN_DIR/metrics.png)")
    parser.set_defaults(func=_cmd_plot)
    return parser
