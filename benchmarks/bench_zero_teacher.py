"""Per-rank teacher parameter memory under ZeRO-3 (engine/distributed.py), 1 and 2 CPU ranks.

    python benchmarks/bench_zero_teacher.py [--model clipdistill-tiny-teacher] [--ranks 1 2]

Each case starts ``torchrun --nproc_per_node P`` on this file (``--worker``), which builds the
sharded teacher (stage 3, persistence threshold 0, gloo) and reports, per rank, the bytes of
the image tower's parameters that rank holds (Σ ds_tensor.numel() · element size) before any
forward; the full tower's bytes are Σ ds_numel · element size. Rows go through the shared
harness (metric ``param_bytes_per_rank``: median/p20/p80 over ranks). Not a timing benchmark.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import torch


def _worker(model: str, out: str) -> None:
    from clipdistill.engine.distributed import build_sharded_teacher, detect_launch, init_process_group

    env = detect_launch(required=True)
    init_process_group(env, torch.device("cpu"))
    ds = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
          "train_micro_batch_size_per_gpu": 1}
    teacher, _ = build_sharded_teacher(model, None, ds, device=torch.device("cpu"), seed=0,
                                       class_vectors=lambda t: torch.zeros(1, t.model.visual.output_dim))
    params = list(teacher.model.visual.parameters())
    held = sum(p.ds_tensor.numel() * p.element_size() for p in params)
    full = sum(p.ds_numel * p.element_size() for p in params)
    Path(out, f"rank{env.rank}.json").write_text(json.dumps({"held": held, "full": full, "count": len(params)}))
    torch.distributed.barrier()


def _case(model: str, ranks: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
        env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "clipdistill" / "torch_extensions"))
        cmd = [str(Path(sys.executable).with_name("torchrun")), "--nproc_per_node", str(ranks), "--master_addr",
               "127.0.0.1", "--master_port", str(port), __file__, "--worker", "--model", model, "--out", tmp]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-4000:]}")
        return [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(ranks)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="clipdistill-tiny-teacher")
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--results-dir", default=None)
    args = parser.parse_args(argv)
    if args.worker:
        _worker(args.model, args.out)
        return 0
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: the harness beside it
    from benchmarks.harness import percentile, record

    rows = []
    print(f"{'model':<28} {'ranks':>5} {'full MiB':>10} {'per-rank MiB':>14} {'fraction':>9}")
    for ranks in args.ranks:
        per_rank = _case(args.model, ranks)
        held = [r["held"] for r in per_rank]
        full = per_rank[0]["full"]
        print(f"{args.model:<28} {ranks:>5} {full / 2**20:>10.3f} {max(held) / 2**20:>14.3f} {max(held) / full:>9.3f}")
        rows.append({"provider": "deepspeed-zero3", "shape": f"{args.model} ranks={ranks}", "dtype": "float32",
                     "metric": "param_bytes_per_rank", "median": percentile(held, 50), "p20": percentile(held, 20),
                     "p80": percentile(held, 80), "unit": "bytes", "ranks": ranks, "full_bytes": full,
                     "max_fraction": max(held) / full, "params": per_rank[0]["count"]})
    written = record("bench_zero_teacher", rows, device="cpu", results_dir=args.results_dir)
    print(json.dumps(written))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
