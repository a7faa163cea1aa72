"""Regenerate PNG plots from benchmarks/results/*.jsonl.

    python -m benchmarks.plot [--results DIR] [--out DIR]

One figure per (benchmark, metric, device): providers as bars per shape, the
median as the bar and the p20-p80 spread as the error bar. The newest row wins
where the same (provider, shape, dtype, metric, device) was measured several
times. Quick (CI-sized) rows are left out unless --include-quick is given.
"""
from __future__ import annotations

import argparse
import json
import re
from collections import OrderedDict
from pathlib import Path

from benchmarks.harness import RESULTS_DIR, load_results


def latest_rows(rows: list[dict], include_quick: bool = False) -> list[dict]:
    keyed: "OrderedDict[tuple, dict]" = OrderedDict()
    for row in rows:
        if row.get("quick") and not include_quick:
            continue
        key = (row["benchmark"], row["provider"], row["shape"], row["dtype"], row["metric"], row.get("device"))
        keyed.pop(key, None)
        keyed[key] = row
    return list(keyed.values())


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")


def plot(rows: list[dict], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: "OrderedDict[tuple, list[dict]]" = OrderedDict()
    for row in rows:
        if row.get("median") is None:  # a case that did not run (bench_zero_teacher's failed rungs): no bar
            continue
        groups.setdefault((row["benchmark"], row["metric"], row.get("device", "")), []).append(row)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for (benchmark, metric, device), group in groups.items():
        shapes = list(OrderedDict.fromkeys(f"{r['shape']} {r['dtype']}" for r in group))
        providers = list(OrderedDict.fromkeys(r["provider"] for r in group))
        width = 0.8 / max(1, len(providers))
        fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(shapes) * max(1, len(providers)) / 2), 4))
        for i, provider in enumerate(providers):
            xs, ys, lo, hi = [], [], [], []
            for j, shape in enumerate(shapes):
                match = [r for r in group if r["provider"] == provider and f"{r['shape']} {r['dtype']}" == shape]
                if match:
                    r = match[-1]
                    xs.append(j + i * width)
                    ys.append(r["median"])
                    lo.append(max(0.0, r["median"] - r["p20"]))
                    hi.append(max(0.0, r["p80"] - r["median"]))
            ax.bar(xs, ys, width, yerr=[lo, hi], label=provider, capsize=2)
        ax.set_xticks([j + width * (len(providers) - 1) / 2 for j in range(len(shapes))])
        ax.set_xticklabels(shapes, rotation=20, ha="right", fontsize=7)
        unit = group[0].get("unit", "")
        ax.set_ylabel(f"{metric} ({unit})")
        ax.set_title(f"{benchmark}: {metric}\n{device}", fontsize=9)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out_dir / f"{_slug(benchmark)}__{_slug(metric)}__{_slug(device or 'unknown')}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def plot_breakdowns(rows: list[dict], out_dir: Path) -> list[Path]:
    """Stacked bars of the per-stage time (rows with a ``breakdown_ms`` dict, e.g. bench_e2e).

    One figure per (benchmark, device); one bar per (provider, shape), its segments the
    median milliseconds of each stage from the instrumented (synchronizing) step.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: "OrderedDict[tuple, list[dict]]" = OrderedDict()
    for row in rows:
        if isinstance(row.get("breakdown_ms"), dict):
            groups.setdefault((row["benchmark"], row.get("device", "")), []).append(row)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for (benchmark, device), group in groups.items():
        stages = list(OrderedDict.fromkeys(k for r in group for k in r["breakdown_ms"]))
        labels = [f"{r['provider']} {r['shape']} {r['dtype']}" for r in group]
        fig, ax = plt.subplots(figsize=(9, max(3, 0.35 * len(group) + 1.5)))
        left = [0.0] * len(group)
        for stage in stages:
            widths = [float(r["breakdown_ms"].get(stage) or 0.0) for r in group]
            ax.barh(range(len(group)), widths, left=left, label=stage)
            left = [a + b for a, b in zip(left, widths)]
        ax.set_yticks(range(len(group)))
        ax.set_yticklabels(labels, fontsize=6)
        ax.invert_yaxis()
        ax.set_xlabel("ms per step (instrumented: synchronized between stages)")
        ax.set_title(f"{benchmark}: time per stage\n{device}", fontsize=9)
        ax.legend(fontsize=6, loc="lower right")
        fig.tight_layout()
        path = out_dir / f"{_slug(benchmark)}__breakdown__{_slug(device or 'unknown')}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=RESULTS_DIR, help="folder of *.jsonl result files")
    parser.add_argument("--out", type=Path, default=None, help="where PNGs go (default: <results>/plots)")
    parser.add_argument("--include-quick", action="store_true", help="also plot quick (CI-sized) rows")
    args = parser.parse_args(argv)
    rows = latest_rows(load_results(results_dir=args.results), include_quick=args.include_quick)
    paths = plot(rows, args.out or args.results / "plots")
    paths += plot_breakdowns(rows, args.out or args.results / "plots")
    for p in paths:
        print(p)
    print(json.dumps({"plots": len(paths), "rows": len(rows)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
