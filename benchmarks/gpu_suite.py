"""One time-boxed run of everything that needs the GPU machine (H100 / H200).

    python benchmarks/gpu_suite.py [--budget-s 540] [--wheels .whl] [--out DIR]
                                   [--skip-tests] [--only bench_kd_loss ...] [--skip-benchmarks]
                                   [--deepspeed [throughput] [largest]] [--deepspeed-args "..."] [--quick]

In order, each step bounded by what is left of ``--budget-s``:

1. installs the packages the machine lacks from carried wheels (``.whl/``) and
   the wheels reassembled from split parts (``--parts``, default the folders
   ``.dali*``; see benchmarks/README.md), into ``/tmp/clipdistill-site``;
   installs clipdistill itself from the working tree (no dependencies);
2. measures the device's own ceilings: a large bf16 matrix product's TFLOP/s
   and a device-to-device copy's bandwidth (benchmark ``device_ceilings``);
3. runs the GPU test tier (``pytest -m gpu``) with its log saved;
4. runs every registered benchmark (``benchmarks.REGISTERED``), each in its own
   process with the time that is left;
5. runs DeepSpeed's ZeRO-3 teacher benchmarks (``bench_zero_teacher.py --mode
   throughput``, then ``--mode largest``; not registered: the CPU test tier runs
   every registered benchmark and must not start DeepSpeed jobs), each with its
   share of what is left, when DeepSpeed is importable (its wheel and its
   dependencies are in ``.whl/``: benchmarks/prepare_gpu_wheels.sh).

Results are written row by row (to ``$OUT`` when set, else benchmarks/results),
so a run stopped at its limit still returns what it measured. The last lines
are a table of every step and one JSON line.
"""
from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

REPO_ROOT = Path(__file__).resolve().parents[1]
SITE_DIR = Path("/tmp/clipdistill-site")
DEEPSPEED_MODES = ("throughput", "largest")  # bench_zero_teacher.py --mode ..., in this order


def join_split_wheels(part_dirs: list[Path], dest: Path) -> list[Path]:
    """Reassemble wheels split into ``NAME.whl.partNN`` files spread over several folders.

    Parts of one wheel may sit in different folders (one folder carried per
    device call); they are concatenated in the order of their NN suffix. A
    wheel whose parts are not contiguous from 00 is refused with the gap named.
    """
    parts: dict[str, dict[int, Path]] = {}
    for folder in part_dirs:
        for path in sorted(folder.glob("*.whl.part*")):
            name, _, index = path.name.rpartition(".part")
            if not index.isdigit():
                raise ValueError(f"{path}: expected a '.partNN' suffix")
            parts.setdefault(name, {})[int(index)] = path
    dest.mkdir(parents=True, exist_ok=True)
    wheels = []
    for name, by_index in parts.items():
        expected = list(range(len(by_index)))
        if sorted(by_index) != expected:
            missing = sorted(set(range(max(by_index) + 1)) - set(by_index))
            raise ValueError(f"{name}: parts {missing} are missing (have {sorted(by_index)})")
        target = dest / name
        with open(target, "wb") as out:
            for i in expected:
                out.write(by_index[i].read_bytes())
        wheels.append(target)
    return wheels


def install_wheels(wheel_dir: Path, part_dirs: list[Path], log: list[dict]) -> None:
    wheels = sorted(glob.glob(str(wheel_dir / "*.whl"))) if wheel_dir.exists() else []
    part_dirs = [p for p in part_dirs if p.is_dir()]
    if part_dirs:
        joined = join_split_wheels(part_dirs, Path("/tmp/clipdistill-joined"))
        wheels += [str(p) for p in joined]
        log.append({"step": "join split wheels", "status": "ok", "detail": ", ".join(p.name for p in joined)})
    if wheels:
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
               "--no-cache-dir", "--upgrade", "--target", str(SITE_DIR), *wheels]
        rc = subprocess.run(cmd).returncode
        log.append({"step": "install wheels", "status": "ok" if rc == 0 else f"rc={rc}", "detail": f"{len(wheels)} wheels"})
    # clipdistill itself: an editable install so that benchmarks/ and tests see the working tree.
    rc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                         "--no-index", "-e", str(REPO_ROOT)]).returncode
    detail = "-e ."
    if rc != 0:
        # No usable setuptools there: expose the three folders as the clipdistill namespace by links.
        namespace = SITE_DIR / "clipdistill"
        namespace.mkdir(parents=True, exist_ok=True)
        for name in ("engine", "kernels", "loaders"):
            link = namespace / name
            if not link.exists():
                link.symlink_to(REPO_ROOT / name, target_is_directory=True)
        rc, detail = 0, "linked into the clipdistill namespace (pip -e failed; no console script)"
    log.append({"step": "install clipdistill", "status": "ok" if rc == 0 else f"rc={rc}", "detail": detail})
    if SITE_DIR.exists():
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SITE_DIR), os.environ.get("PYTHONPATH")]))
        sys.path.insert(0, str(SITE_DIR))


def measure_ceilings(device: str = "cuda", size: int = 8192, copy_mib: int = 1024, quick: bool = False) -> list[dict]:
    """The device's own limits: bf16 GEMM TFLOP/s and device-to-device copy GB/s."""
    import torch

    from benchmarks.harness import measure

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    stats = measure(lambda: torch.mm(a, b), device=device, warmup=2 if quick else 10, repeats=3 if quick else 50)
    flops = 2.0 * size**3
    gemm = {"provider": "torch.mm", "shape": f"{size}x{size}x{size}", "dtype": str(dtype).replace("torch.", ""),
            "metric": "matmul_ms", **stats, "tflops": flops / (stats["median"] * 1e-3) / 1e12}
    n = copy_mib * 2**20 // 4
    src = torch.empty(n, device=device, dtype=torch.float32).uniform_()
    dst = torch.empty_like(src)
    stats = measure(lambda: dst.copy_(src), device=device, warmup=2 if quick else 10, repeats=3 if quick else 50)
    copy = {"provider": "tensor.copy_", "shape": f"{copy_mib}MiB", "dtype": "float32", "metric": "copy_ms",
            **stats, "gb_per_s": 2 * n * 4 / (stats["median"] * 1e-3) / 1e9}
    return [gemm, copy]


def run_step(name: str, cmd: list[str], timeout: float, log_path: Path | None, log: list[dict]) -> None:
    if timeout < 10:
        log.append({"step": name, "status": "skipped", "detail": "no time left"})
        return
    started = time.time()
    try:
        with open(log_path, "w") if log_path else open(os.devnull, "w") as fh:
            proc = subprocess.run(cmd, cwd=REPO_ROOT, timeout=timeout, stdout=fh, stderr=subprocess.STDOUT)
        status = "ok" if proc.returncode == 0 else f"rc={proc.returncode}"
    except subprocess.TimeoutExpired:
        status = f"timed out after {timeout:.0f}s"
    log.append({"step": name, "status": status, "detail": f"{time.time() - started:.0f}s"})
    if log_path and log_path.exists():
        tail = log_path.read_text(errors="replace").splitlines()[-15:]
        print(f"--- {name}: {status}\n" + "\n".join(tail), flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget-s", type=float, default=540.0, help="total wall-clock budget in seconds")
    parser.add_argument("--wheels", type=Path, default=REPO_ROOT / ".whl", help="folder of carried wheels")
    parser.add_argument("--parts", type=Path, nargs="*", default=None,
                        help="folders of split wheel parts (default: .dali* in the repository root)")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default: $OUT, else benchmarks/results)")
    parser.add_argument("--skip-tests", action="store_true", help="skip the GPU test tier")
    parser.add_argument("--skip-install", action="store_true", help="use what is installed")
    parser.add_argument("--only", nargs="*", default=None, help="registered benchmarks to run (default: all)")
    parser.add_argument("--skip-benchmarks", action="store_true", help="skip the registered benchmarks")
    parser.add_argument("--deepspeed", nargs="*", choices=list(DEEPSPEED_MODES), default=list(DEEPSPEED_MODES),
                        help="bench_zero_teacher modes to run last (default: both; none with a bare --deepspeed)")
    parser.add_argument("--deepspeed-args", default="",
                        help='more arguments for bench_zero_teacher, e.g. "--offload cpu --from-rung ViT-e-14"')
    parser.add_argument("--quick", action="store_true", help="small sizes (a dry run of the suite itself)")
    parser.add_argument("--device", default="cuda", help="cuda, or cpu for a dry run")
    args = parser.parse_args(argv)

    deadline = time.time() + args.budget_s
    out = args.out or (Path(os.environ["OUT"]) if os.environ.get("OUT") else REPO_ROOT / "benchmarks" / "results")
    out.mkdir(parents=True, exist_ok=True)
    os.environ["CLIPDISTILL_RESULTS_DIR"] = str(out)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.path.insert(0, str(REPO_ROOT))  # benchmarks/ is run from the tree, not installed
    log: list[dict] = []

    if not args.skip_install:
        part_dirs = args.parts if args.parts is not None else sorted(REPO_ROOT.glob(".dali*"))
        install_wheels(args.wheels, part_dirs, log)

    import benchmarks
    from benchmarks.harness import print_table, record

    try:
        rows = measure_ceilings(args.device, size=512 if args.quick else 8192, copy_mib=8 if args.quick else 1024,
                                quick=args.quick)
        record("device_ceilings", rows, device=args.device, quick=args.quick, results_dir=out)
        print_table(rows)
        log.append({"step": "device ceilings", "status": "ok",
                    "detail": f"{rows[0]['tflops']:.1f} TFLOP/s, {rows[1]['gb_per_s']:.0f} GB/s"})
    except Exception as exc:  # keep going: the other steps still tell something
        log.append({"step": "device ceilings", "status": "error", "detail": repr(exc)[:120]})

    if not args.skip_tests:
        run_step("pytest -m gpu", [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider",
                                   "--benchmark-disable", "tests"],
                 min(300.0, deadline - time.time() - 30), out / "pytest_gpu.log", log)

    names = [] if args.skip_benchmarks else (args.only if args.only else list(benchmarks.REGISTERED))
    modes = args.deepspeed if importlib.util.find_spec("deepspeed") is not None else []
    if args.deepspeed and not modes:
        log.append({"step": "bench_zero_teacher", "status": "skipped",
                    "detail": "deepspeed is not importable: carry its wheels (benchmarks/prepare_gpu_wheels.sh)"})
    quick = ["--quick"] if args.quick else []

    def registered(name: str) -> Callable[[float], list[str]]:
        return lambda share: [sys.executable, "-m", f"benchmarks.{name}", *quick]

    def zero_teacher(mode: str) -> Callable[[float], list[str]]:
        # Its own budget ends before the step's limit: it stops starting cases and prints its table.
        return lambda share: [sys.executable, str(REPO_ROOT / "benchmarks" / "bench_zero_teacher.py"), "--mode", mode,
                              "--budget-s", f"{max(0.0, share - 20):.0f}", *shlex.split(args.deepspeed_args), *quick]

    steps = [(name, name, registered(name)) for name in names]
    steps += [(f"bench_zero_teacher --mode {mode}", f"bench_zero_teacher_{mode}", zero_teacher(mode)) for mode in modes]
    for i, (name, log_name, command) in enumerate(steps):
        left = deadline - time.time() - 5
        share = left / max(1, len(steps) - i)
        run_step(name, command(share), share, out / f"{log_name}.log", log)

    print()
    print_table(log, columns=["step", "status", "detail"])
    print(json.dumps({"suite": "gpu_suite", "steps": len(log),
                      "ok": sum(1 for r in log if r["status"] == "ok"), "results": str(out)}))
    return 0 if all(r["status"] in ("ok", "skipped") for r in log) else 1


if __name__ == "__main__":
    raise SystemExit(main())
