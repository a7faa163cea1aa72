"""One device call on the GPU machine that surely returns the key numbers within its budget.

    python3 benchmarks/gpu_suite.py --phase core            # call 1 of a GPU window, under `timeout 540`
    python3 benchmarks/gpu_suite.py --phase dali --parts /tmp/parts   # the last call of a DALI window
    python3 benchmarks/gpu_suite.py --phase deepspeed --deepspeed throughput largest
    python  benchmarks/gpu_suite.py --phase core --dry-run  # here, on the CPU: every step at CPU size

The GPU machine (one H200) is lent now and then, for 15 minutes of device time in all (its
start included), 64 MiB carried per call, 8 files back, 10 minutes per command. So each
phase is a list of steps in priority order, each with its own cap (seconds, compile time
included) and its own arguments; ``--dry-run`` prints the cap table. Every step but the
install runs in its own process group, killed at its cap; every row is recorded by the
step as it is measured (``benchmarks.harness.record``, flushed per row); after every step,
and on SIGTERM (``timeout 540``), the suite packs what it has into ``$OUT``:

- ``results.tar.gz``: ``results/*.jsonl`` (the rows) and ``logs/*.log`` (each step's output);
- ``summary.json``: the steps, their caps, status, seconds and their last JSON line;
- ``suite.log``: this process's output.

Three files of the eight that come back. The table of steps is printed last, then one JSON line.

Phases (``--phase``):

- ``core``: install the small carried wheels (``.whl``: open_clip and what it needs that the
  machine lacks) and clipdistill from the tree; nvidia-smi and versions; the device's
  ceilings; kd_loss correctness in bf16/fp16/fp32 against float64; bench_kd_loss on the
  large-vocabulary and PromptKD shapes with every provider; the compiled kernels' registers
  and spills against ``benchmarks.kernel_report``; bench_e2e (ViT-L-14 -> ViT-B-16, batch
  256, live / cached / the re-implemented published practice); torchvision's nvJPEG against a
  PIL DataLoader; then ``pytest -m gpu`` with whatever time is left.
- ``dali``: join the split DALI wheel set (``--parts``; checksums checked), install it, then
  the DALI GPU loader benchmark and the GPU loader tests.
- ``deepspeed``: bench_zero_teacher's ZeRO-3 modes (issue 9), with DeepSpeed's wheels carried
  in ``.whl-ds``.
- ``synthesis``: data-free synthesis images/s per generator (bench_synthesis: the synthesize
  command's defaults, a random-init VQModel of taming's f16-1024 size), with diffusers carried in
  ``.whl-syn``; a call after the core phase's, in the same window when time is left.

benchmarks/README.md gives the exact device calls of a GPU window.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a script: benchmarks/ is a folder of the tree, not installed
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks.gpu_wheels import (  # noqa: E402
    CARRY_LIMIT_BYTES, MIB, folder_bytes, join_split_wheels, tree_bytes, unmet_requirements, verify_wheels)

SITE_DIR = Path("/tmp/clipdistill-site")
MAX_OUT_FILES = 8  # the device tool returns at most 8 files from $OUT
OUT_FILES = ("results.tar.gz", "summary.json", "suite.log")
CORE_WHEELS = REPO_ROOT / ".whl"
DEEPSPEED_WHEELS = REPO_ROOT / ".whl-ds"
SYNTHESIS_WHEELS = REPO_ROOT / ".whl-syn"
WHEELSETS = REPO_ROOT / "benchmarks" / "wheelsets"
DEEPSPEED_MODES = ("throughput", "largest")
PHASE_BUDGET_S = {"core": 510.0, "dali": 330.0, "deepspeed": 540.0, "synthesis": 180.0}
PHASE_TIMEOUT_S = {"core": 540, "dali": 360, "deepspeed": 570, "synthesis": 210}  # the `timeout N` around the call (README)
# In the dry run a cap is the real one scaled down, but at least this: each step is a process that
# imports torch, 5-20 s on 2 CPU cores shared with other work (measured here, 2026-11-30).
DRY_RUN_MIN_CAP_S = 30.0


def run_cap(step: "Step", scale: float, dry_run: bool) -> float:
    """A step's cap in this run: the table's cap times ``scale``; in the dry run at least DRY_RUN_MIN_CAP_S."""
    cap = step.cap_s * scale
    return max(cap, DRY_RUN_MIN_CAP_S) if dry_run else cap


class Terminated(BaseException):
    """SIGTERM arrived (the outer `timeout`): stop the current step, pack, report."""


@dataclasses.dataclass
class Step:
    """One entry of a phase: a cap, and the arguments for the GPU run and for the CPU dry run."""

    name: str
    cap_s: float
    what: str
    gpu_args: Optional[list[str]] = None  # python arguments (after the interpreter); None: an internal step
    cpu_args: Optional[list[str]] = None  # the dry run's; None: same as gpu_args
    internal: Optional[Callable[["Suite", float], tuple[str, str]]] = None  # (status, detail)
    leftover: bool = False  # takes whatever is left of the phase's budget (at least its cap)
    parse_module: Optional[str] = None  # checked in the dry run by parsing gpu_args with this module's parser
    ok_codes: tuple[int, ...] = (0,)

    def args(self, dry_run: bool) -> Optional[list[str]]:
        if dry_run and self.cpu_args is not None:
            return self.cpu_args
        return self.gpu_args


# ------------------------------------------------------------------------------------------- argument parse checks

_PARSE_SNIPPET = r"""
import argparse, json, runpy, sys
class _Parsed(BaseException):
    pass
_original = argparse.ArgumentParser.parse_args
def _parse_then_stop(self, args=None, namespace=None):
    _original(self, args, namespace)
    raise _Parsed()
argparse.ArgumentParser.parse_args = _parse_then_stop
results = []
for module, argv in json.loads(sys.argv[1]):
    sys.argv = [module, *argv]
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=False)
        results.append([module, False, "ran to the end without parsing arguments"])
    except _Parsed:
        results.append([module, True, "ok"])
    except SystemExit as exc:
        results.append([module, False, f"argparse refused the arguments (exit {exc.code})"])
    except BaseException as exc:
        results.append([module, False, f"{type(exc).__name__}: {exc}"[:300]])
print("__PARSE__" + json.dumps(results))
"""


def parse_checks(cases: list[tuple[str, list[str]]], timeout_s: float = 120.0) -> list[tuple[str, bool, str]]:
    """Whether each module's own argument parser accepts the arguments, without running it.

    One process for all (imports are paid once): each module is run as ``__main__`` with
    ``argparse.ArgumentParser.parse_args`` replaced by one that parses and then stops.
    """
    if not cases:
        return []
    try:
        proc = subprocess.run([sys.executable, "-c", _PARSE_SNIPPET, json.dumps(cases)], cwd=REPO_ROOT,
                              capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return [(m, False, f"parse check ran past {timeout_s:.0f} s") for m, _ in cases]
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("__PARSE__"):
            return [tuple(r) for r in json.loads(line[len("__PARSE__"):])]
    return [(m, False, f"parse check failed (rc={proc.returncode}): {proc.stderr.strip()[-300:]}") for m, _ in cases]


# ------------------------------------------------------------------------------------------- steps of each phase


def e2e_entry() -> tuple[str, list[str]]:
    """The e2e benchmark's module and leading arguments (``python -m benchmarks.bench_e2e``)."""
    return "benchmarks.bench_e2e", []


def e2e_learners(wanted: tuple[str, ...] = ("coop", "promptkd")) -> tuple[list[str], str]:
    """The learners of ``wanted`` that the e2e benchmark accepts (asked of its own parser), and a note."""
    module, lead = e2e_entry()
    results = parse_checks([(module, [*lead, "--quick", "--learners", name]) for name in wanted], timeout_s=60)
    accepted = [name for name, (_, ok, _) in zip(wanted, results) if ok]
    refused = [name for name in wanted if name not in accepted]
    note = f"{module} does not accept --learners {' '.join(refused)}; not run" if refused else ""
    return accepted or ["coop"], note


# Every bench_kd_loss provider, torch.compile last: its compile (inside the cap) cannot starve the others.
KD_PROVIDERS = ["ours", "ours_fwdkl", "ours_budget0", "eager", "matmul_products", "matmul_math", "liger", "compiled",
                "compiled_fp32"]


def core_steps(py_args: dict) -> list[Step]:
    e2e_module, lead = e2e_entry()
    learners = py_args.get("e2e_learners", ["coop"])
    workers = str(min(16, os.cpu_count() or 1))
    data = py_args["data_dir"]
    return [
        Step("install", 35, "carried wheels (.whl) + clipdistill from the tree", internal=install_core),
        Step("env", 20, "nvidia-smi, versions, what imports", ["-m", "benchmarks.gpu_checks", "env"],
             ["-m", "benchmarks.gpu_checks", "--device", "cpu", "env", "--imports", "clipdistill.kernels"],
             parse_module="benchmarks.gpu_checks"),
        Step("ceilings", 20, "bf16 GEMM 8192^3 TFLOP/s, 1 GiB copy GB/s", ["-m", "benchmarks.gpu_checks", "ceilings"],
             ["-m", "benchmarks.gpu_checks", "--device", "cpu", "ceilings", "--size", "256", "--copy-mib", "4"],
             parse_module="benchmarks.gpu_checks"),
        Step("kd-correctness", 40, "kd_loss bf16/fp16/fp32 vs float64, values + gradients",
             ["-m", "benchmarks.gpu_checks", "kd-correctness"],
             ["-m", "benchmarks.gpu_checks", "--device", "cpu", "kd-correctness", "--small"],
             parse_module="benchmarks.gpu_checks"),
        Step("kd-bench-large-vocab", 90, "bench_kd_loss B=4096 C=21843, every provider (compile included)",
             ["-m", "benchmarks.bench_kd_loss", "--shapes", "large_vocab", "--providers", *KD_PROVIDERS],
             ["-m", "benchmarks.bench_kd_loss", "--quick", "--shapes", "quick_shared", "--providers", "ours",
              "matmul_products"], parse_module="benchmarks.bench_kd_loss"),
        Step("kd-bench-promptkd", 45, "bench_kd_loss PromptKD B=256 C=1000, every provider",
             ["-m", "benchmarks.bench_kd_loss", "--shapes", "promptkd", "--providers", *KD_PROVIDERS],
             ["-m", "benchmarks.bench_kd_loss", "--quick", "--shapes", "quick_separate", "--providers", "eager"],
             parse_module="benchmarks.bench_kd_loss"),
        Step("kernel-resources", 45, "compiled registers/spills vs benchmarks.kernel_report (sm_90a)",
             ["-m", "benchmarks.gpu_checks", "kernel-resources", "--report-timeout-s", "35"],
             # The dry run leaves the static report out: .ci/triton36 runs it, and its compiles outlast this cap.
             ["-m", "benchmarks.gpu_checks", "--device", "cpu", "kernel-resources", "--report-timeout-s", "0"],
             parse_module="benchmarks.gpu_checks"),
        Step("e2e", 130, f"ViT-L-14 -> ViT-B-16, {'+'.join(learners)}, B=256, live/cached/reference",
             ["-m", e2e_module, *lead, "--pairs", "ViT-L-14:ViT-B-16", "--learners", *learners, "--batches", "256",
              "--modes", "live", "cached", "reference", "--steps", "8", "--warmup", "2", "--images", "512",
              "--reference-workers", "8"],
             ["-m", e2e_module, *lead, "--quick", "--learners", "coop", "--batches", "8", "--modes", "live",
              "--steps", "1", "--warmup", "0", "--images", "16", "--classes", "10"],
             parse_module=e2e_module),
        Step("nvjpeg", 50, f"decode_jpeg(device=cuda) batched vs PIL DataLoader (min(16, cores) = {workers} workers), 500x375",
             ["-m", "benchmarks.gpu_checks", "nvjpeg", "--images", "1024", "--batch", "256", "--workers", workers,
              "--data", data],
             ["-m", "benchmarks.gpu_checks", "--device", "cpu", "nvjpeg", "--images", "16", "--batch", "8",
              "--workers", "1", "--repeats", "1", "--data", data], parse_module="benchmarks.gpu_checks"),
        Step("pytest-gpu", 35, "pytest -m gpu, with whatever time is left",
             ["-m", "pytest", "-m", "gpu", "-q", "-rfEs", "-p", "no:cacheprovider", "--benchmark-disable", "tests"],
             ["-m", "pytest", "-m", "gpu", "-q", "-rfEs", "-p", "no:cacheprovider", "--benchmark-disable",
              "tests/kernels/test_kd_loss.py"], leftover=True),
    ]


def dali_steps(py_args: dict) -> list[Step]:
    workers = str(min(16, os.cpu_count() or 1))
    return [
        Step("install", 90, "join + check the DALI parts, install them, .whl, clipdistill", internal=install_dali),
        Step("env", 20, "nvidia-smi, versions, DALI imports", ["-m", "benchmarks.gpu_checks", "env"],
             ["-m", "benchmarks.gpu_checks", "--device", "cpu", "env", "--imports", "clipdistill.loaders", "nvidia.dali"],
             parse_module="benchmarks.gpu_checks"),
        Step("bench-loader", 150, f"dali-gpu vs torch (min(16, cores) = {workers} workers), 2048 photos, 224 and 224+336",
             ["-m", "benchmarks.bench_loader", "--backends", "dali-gpu", "torch", "--workers", workers,
              "--images", "2048", "--batch", "256", "--repeats", "3", "--index-files", "0", "--budget-s", "120",
              "--data", py_args["data_dir"]],
             ["-m", "benchmarks.bench_loader", "--quick", "--backends", "torch", "--workers", "1", "--images", "16",
              "--batch", "8", "--repeats", "1", "--outputs", "224", "--index-files", "0", "--budget-s", "60",
              "--data", py_args["data_dir"]], parse_module="benchmarks.bench_loader"),
        Step("pytest-gpu-loaders", 70, "pytest -m gpu tests/loaders, with whatever time is left",
             ["-m", "pytest", "-m", "gpu", "-q", "-rfEs", "-p", "no:cacheprovider", "--benchmark-disable",
              "tests/loaders"], leftover=True),
    ]


def deepspeed_steps(py_args: dict) -> list[Step]:
    modes = py_args.get("deepspeed_modes") or list(DEEPSPEED_MODES)
    extra = py_args.get("deepspeed_args", [])
    steps = [Step("install", 40, ".whl + .whl-ds (DeepSpeed) + clipdistill", internal=install_deepspeed)]
    share = (PHASE_BUDGET_S["deepspeed"] - 40) / max(1, len(modes))
    for mode in modes:
        # Its own budget ends before the cap: it stops starting cases and prints its table.
        steps.append(Step(f"zero-teacher-{mode}", share, f"bench_zero_teacher --mode {mode}",
                          ["benchmarks/bench_zero_teacher.py", "--mode", mode, "--budget-s", f"{share - 20:.0f}", *extra],
                          ["benchmarks/bench_zero_teacher.py", "--mode", mode, "--quick", "--budget-s", "30", *extra]))
    return steps


def synthesis_steps(py_args: dict) -> list[Step]:
    return [
        Step("install", 40, ".whl + .whl-syn (diffusers) + clipdistill", internal=install_synthesis),
        Step("bench-synthesis", 140, "bench_synthesis: vqgan/fourier/pixel images/s, ViT-B-32, 224 px, B=8, 16 cutouts",
             ["-m", "benchmarks.bench_synthesis"],
             ["-m", "benchmarks.bench_synthesis", "--quick", "--steps-timed", "1", "--repeats", "1"],
             parse_module="benchmarks.bench_synthesis"),
    ]


PHASES = {"core": core_steps, "dali": dali_steps, "deepspeed": deepspeed_steps, "synthesis": synthesis_steps}


# ------------------------------------------------------------------------------------------- installs


def _pip(suite: "Suite", args: list[str], timeout: float) -> int:
    cmd = [sys.executable, "-m", "pip", *args]
    suite.say("$ " + " ".join(cmd[:8]) + (" ..." if len(cmd) > 8 else ""))
    try:
        proc = subprocess.run(cmd, timeout=max(1.0, timeout), capture_output=True, text=True)
    except subprocess.TimeoutExpired:
        return 124
    if proc.returncode:
        suite.say((proc.stdout + proc.stderr).strip()[-1500:])
    return proc.returncode


def _install_wheels(suite: "Suite", wheels: list[Path], deadline: float) -> str:
    if not wheels:
        return "no wheels"
    target = suite.site_dir
    # The dry run installs for the GPU machine's interpreter (CPython 3.12, manylinux x86-64) into a
    # folder of its own: it proves that the carried set installs there, whatever Python runs it here.
    for_gpu = (["--python-version", "3.12", "--implementation", "cp", "--only-binary=:all:",
                *[f"--platform={p}" for p in ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
                                              "manylinux2014_x86_64", "manylinux1_x86_64", "manylinux_2_34_x86_64")]]
               if suite.dry_run else [])
    rc = _pip(suite, ["install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir", "--upgrade",
                      *for_gpu, "--target", str(target), *map(str, wheels)], deadline - time.time())
    if rc:
        raise RuntimeError(f"pip install of {len(wheels)} wheels failed (rc={rc})")
    if not suite.dry_run:  # the dry run only proves that they install; its children keep the venv's packages
        suite.env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(target), suite.env.get("PYTHONPATH")]))
    return f"{len(wheels)} wheels -> {target}"


def _install_clipdistill(suite: "Suite", deadline: float) -> str:
    if suite.dry_run:
        return "clipdistill: the dry run uses the installed (editable) tree"
    rc = _pip(suite, ["install", "-q", "--no-deps", "--no-build-isolation", "--no-index", "-e", str(REPO_ROOT)],
              deadline - time.time())
    if rc == 0:
        return "clipdistill -e ."
    # No usable setuptools there: lay out the clipdistill package by links (its __init__.py from
    # src/clipdistill, the three folders as its subpackages), as setup.py's package_dir maps them.
    package = suite.site_dir / "clipdistill"
    package.mkdir(parents=True, exist_ok=True)
    for name in ("__init__.py", "engine", "kernels", "loaders"):
        link = package / name
        target = REPO_ROOT / "src" / "clipdistill" / name if name.endswith(".py") else REPO_ROOT / name
        if not link.exists():
            link.symlink_to(target, target_is_directory=target.is_dir())
    suite.env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(suite.site_dir), suite.env.get("PYTHONPATH")]))
    return "clipdistill linked into site-packages (pip -e failed; no console script)"


def _core_wheels(suite: "Suite") -> tuple[list[Path], str]:
    wheels = sorted(CORE_WHEELS.glob("*.whl")) if CORE_WHEELS.is_dir() else []
    if not wheels:
        return [], "no .whl carried (bash benchmarks/prepare_gpu_wheels.sh core)"
    problems = verify_wheels(CORE_WHEELS, WHEELSETS / "core.txt")
    return wheels, ("; ".join(problems) if problems else "checksums ok")


def install_core(suite: "Suite", deadline: float) -> tuple[str, str]:
    wheels, check = _core_wheels(suite)
    details = [check]
    if wheels:
        details.append(_install_wheels(suite, wheels, deadline))
    details.append(_install_clipdistill(suite, deadline))
    status = "ok" if wheels or suite.dry_run else "warning"
    return status, "; ".join(details)


def install_dali(suite: "Suite", deadline: float) -> tuple[str, str]:
    part_dirs = suite.part_dirs()
    if not part_dirs:
        if suite.dry_run:
            status, detail = install_core(suite, deadline)
            return status, "no DALI parts here (dry run); " + detail
        raise RuntimeError("no DALI part folders: give --parts (the folder the calls copied them to) "
                           "or carry .dali1 .. .daliN")
    joined = join_split_wheels(part_dirs, (suite.work if suite.dry_run else Path(tempfile.gettempdir())) / "clipdistill-joined")
    wheels, check = _core_wheels(suite)
    if suite.dry_run:  # what the GPU machine has (KINDS.md), not what this venv has
        have = {ln.split("#")[0].strip() for ln in (WHEELSETS / "gpu_machine.txt").read_text().splitlines()} - {""}
    else:
        from importlib import metadata

        have = {d.metadata["Name"] or "" for d in metadata.distributions()}
    unmet = unmet_requirements(joined + wheels, have)
    detail = [f"joined {len(joined)} wheels from {len(part_dirs)} folders (checksums ok)", check,
              ("unmet: " + "; ".join(unmet)) if unmet else "every requirement met",
              _install_wheels(suite, joined + wheels, deadline), _install_clipdistill(suite, deadline)]
    return "ok", "; ".join(detail)


def install_synthesis(suite: "Suite", deadline: float) -> tuple[str, str]:
    wheels, check = _core_wheels(suite)
    syn = sorted(SYNTHESIS_WHEELS.glob("*.whl")) if SYNTHESIS_WHEELS.is_dir() else []
    problems = verify_wheels(SYNTHESIS_WHEELS, WHEELSETS / "synthesis.txt") if syn else []
    detail = [check, ("; ".join(problems) if problems else f"{len(syn)} synthesis wheels, checksums ok") if syn
              else "no .whl-syn carried (bash benchmarks/prepare_gpu_wheels.sh synthesis)"]
    if wheels or syn:
        detail.append(_install_wheels(suite, wheels + syn, deadline))
    detail.append(_install_clipdistill(suite, deadline))
    return ("ok" if (syn and not problems) or suite.dry_run else "warning"), "; ".join(detail)


def install_deepspeed(suite: "Suite", deadline: float) -> tuple[str, str]:
    wheels, check = _core_wheels(suite)
    ds = sorted(DEEPSPEED_WHEELS.glob("*.whl")) if DEEPSPEED_WHEELS.is_dir() else []
    detail = [check, f"{len(ds)} DeepSpeed wheels" if ds else "no .whl-ds carried"]
    if wheels or ds:
        detail.append(_install_wheels(suite, wheels + ds, deadline))
    detail.append(_install_clipdistill(suite, deadline))
    return ("ok" if ds or suite.dry_run else "warning"), "; ".join(detail)


# ------------------------------------------------------------------------------------------- the runner


class _Tee:
    def __init__(self, *streams):
        self.streams = streams

    def write(self, text):
        for s in self.streams:
            s.write(text)
            s.flush()
        return len(text)

    def flush(self):
        for s in self.streams:
            s.flush()


class Suite:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.dry_run = args.dry_run
        self.phase = args.phase
        self.out = Path(args.out or os.environ.get("OUT") or Path(tempfile.gettempdir()) / "gpu_suite_out")
        self.out.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        self.work = Path(tempfile.mkdtemp(prefix=f"gpu_suite_{self.phase}_{stamp}_"))
        self.results = self.work / "results"
        self.logs = self.work / "logs"
        self.results.mkdir()
        self.logs.mkdir()
        self.site_dir = self.work / "site" if self.dry_run else SITE_DIR
        self.env = dict(os.environ, CLIPDISTILL_RESULTS_DIR=str(self.results), PYTHONUNBUFFERED="1")
        if self.dry_run:
            self.env.setdefault("TRITON_INTERPRET", "1")
        self.scale, self.budget = _scale_and_budget(args)
        self.started = time.time()
        self.deadline = self.started + self.budget
        self.rows: list[dict] = []
        self.checks: list[dict] = []
        self.current: Optional[subprocess.Popen] = None
        self._log = open(self.out / "suite.log", "w", encoding="utf-8")
        self.stdout = sys.stdout
        sys.stdout = _Tee(self.stdout, self._log)

    def say(self, text: str) -> None:
        print(text, flush=True)

    def part_dirs(self) -> list[Path]:
        if self.args.parts:
            return [p for p in self.args.parts if p.is_dir()]
        return sorted(p for p in REPO_ROOT.glob(".dali[0-9]*") if p.is_dir())

    # --- one step
    def run_step(self, step: Step) -> None:
        left = self.deadline - time.time()
        cap = run_cap(step, self.scale, self.dry_run)
        limit = max(cap, left) if step.leftover else min(cap, left)
        row = {"step": step.name, "cap_s": round(cap, 1), "status": "", "seconds": 0.0, "detail": ""}
        self.rows.append(row)
        if limit < 5:
            row.update(status="skipped", detail="no time left")
            return
        started = time.time()
        self.say(f"=== {step.name} (cap {limit:.0f} s): {step.what}")
        try:
            if step.internal is not None:
                status, detail = step.internal(self, started + limit)
                row.update(status=status, detail=detail)
            else:
                row.update(self._run_process(step, limit))
        except Terminated:
            row.update(status="terminated", detail="SIGTERM (the outer timeout) during this step")
            raise
        except Exception as exc:  # a broken step is a result; the next steps still run
            row.update(status="error", detail=f"{type(exc).__name__}: {exc}"[:300])
        finally:
            row["seconds"] = round(time.time() - started, 1)
            self.say(f"--- {step.name}: {row['status']} in {row['seconds']} s {row['detail'][:200]}")
            self.pack()

    def _run_process(self, step: Step, limit: float) -> dict:
        argv = [sys.executable, *step.args(self.dry_run)]
        log_path = self.logs / f"{step.name}.log"
        with open(log_path, "w", encoding="utf-8") as log:
            log.write("$ " + " ".join(argv) + "\n")
            log.flush()
            self.current = subprocess.Popen(argv, cwd=REPO_ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)
            try:
                rc = self._wait(self.current, limit)
            finally:
                self._kill(self.current)
                self.current = None
        tail = log_path.read_text(errors="replace").splitlines()
        self.say("\n".join(tail[-12:]))
        last_json = next((ln for ln in reversed(tail) if ln.startswith("{") and ln.endswith("}")), None)
        result = {"log": f"logs/{log_path.name}"}
        if last_json:
            try:
                result["json"] = json.loads(last_json)
            except ValueError:
                pass
        if rc is None:
            result.update(status="timeout", detail=f"killed at its cap of {limit:.0f} s; rows so far are kept")
        else:
            result.update(status="ok" if rc in step.ok_codes else f"rc={rc}",
                          detail=(tail[-1][:200] if tail and rc not in step.ok_codes else ""))
        return result

    @staticmethod
    def _wait(proc: subprocess.Popen, limit: float) -> Optional[int]:
        end = time.time() + limit
        while time.time() < end:
            try:
                return proc.wait(timeout=min(0.5, max(0.01, end - time.time())))
            except subprocess.TimeoutExpired:
                continue
        return None

    @staticmethod
    def _kill(proc: subprocess.Popen) -> None:
        """End the step's whole process group (DataLoader workers, compile workers, torchrun children)."""
        for sig, grace in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 2.0)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                proc.wait(timeout=grace)
                if sig == signal.SIGTERM:
                    # The leader is gone; stragglers of its group get the KILL too.
                    continue
            except subprocess.TimeoutExpired:
                continue

    # --- outputs
    def summary(self) -> dict:
        ok = [r for r in self.rows if r["status"] == "ok"]
        return {"suite": "gpu_suite", "phase": self.phase, "dry_run": self.dry_run,
                "budget_s": round(self.budget, 1), "elapsed_s": round(time.time() - self.started, 1),
                "steps": self.rows, "checks": self.checks, "ok": len(ok), "of": len(self.rows),
                "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "commit": _git("rev-parse", "HEAD"),
                "dirty": bool(_git("status", "--porcelain", "--untracked-files=no"))}

    def pack(self) -> None:
        """Rewrite results.tar.gz and summary.json in $OUT (atomically: a kill mid-write leaves the last ones)."""
        (self.work / "summary.json").write_text(json.dumps(self.summary(), indent=1, default=str))
        tmp = self.out / ".results.tar.gz.tmp"
        with tarfile.open(tmp, "w:gz") as tar:
            for folder in (self.results, self.logs):
                tar.add(folder, arcname=folder.name)
            tar.add(self.work / "summary.json", arcname="summary.json")
        os.replace(tmp, self.out / "results.tar.gz")
        shutil.copyfile(self.work / "summary.json", self.out / ".summary.json.tmp")
        os.replace(self.out / ".summary.json.tmp", self.out / "summary.json")

    def close(self) -> None:
        sys.stdout = self.stdout
        self._log.close()
        if self.dry_run:  # everything worth keeping is in $OUT; a dali dry run's folder holds ~1 GB
            shutil.rmtree(self.work, ignore_errors=True)


def _scale_and_budget(args: argparse.Namespace) -> tuple[float, float]:
    """The caps' factor (1 on the GPU, 0.5 in the dry run unless --cap-scale) and the phase's scaled budget."""
    scale = args.cap_scale if args.cap_scale is not None else (0.5 if args.dry_run else 1.0)
    budget = (args.budget_s if args.budget_s is not None else PHASE_BUDGET_S[args.phase]) * scale
    if args.dry_run:  # the caps' floor raises the dry run's budget to their sum
        budget = max(budget, sum(run_cap(s, scale, True) for s in PHASES[args.phase]({"data_dir": ""})))
    return scale, budget


def _git(*args: str) -> str:
    try:
        out = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def _fmt_table(rows: list[dict], columns: list[str]) -> str:
    cells = [[str(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def cap_table(steps: list[Step], scale: float, dry_run: bool, budget: float, phase: str = "core") -> str:
    rows = [{"step": s.name, "cap_s": f"{s.cap_s:.0f}", "run_cap_s": f"{run_cap(s, scale, dry_run):.0f}" + ("+" if s.leftover else ""),
             "what": s.what} for s in steps]
    total = sum(s.cap_s for s in steps)
    rows.append({"step": "total", "cap_s": f"{total:.0f}", "run_cap_s": f"{budget:.0f}",
                 "what": f"phase budget (run under `timeout {PHASE_TIMEOUT_S[phase]}`); caps x{scale:g}"
                         f"{f', at least {DRY_RUN_MIN_CAP_S:.0f} (dry run)' if dry_run else ''}"})
    return _fmt_table(rows, ["step", "cap_s", "run_cap_s", "what"])


# ------------------------------------------------------------------------------------------- dry-run checks


def carry_checks(phase: str) -> list[dict]:
    """Each device call's carry (tree + carried folders) against the 64 MiB limit, and the DALI parts' 55 MiB."""
    tree = tree_bytes()
    rows = [{"check": "tree", "mib": round(tree / MIB, 2), "limit_mib": 64, "ok": tree < CARRY_LIMIT_BYTES,
             "detail": "git-tracked + untracked-not-ignored files"}]
    calls = {"core": [[CORE_WHEELS]], "deepspeed": [[CORE_WHEELS, DEEPSPEED_WHEELS]],
             "synthesis": [[CORE_WHEELS, SYNTHESIS_WHEELS]]}.get(phase)
    if phase == "dali":
        parts = sorted(p for p in REPO_ROOT.glob(".dali[0-9]*") if p.is_dir())
        calls = [[p] for p in parts[:-1]] + [[parts[-1], CORE_WHEELS]] if parts else [[CORE_WHEELS]]
    for folders in calls:
        present = [f for f in folders if f.exists()]
        size = tree + sum(folder_bytes(f) for f in present)
        names = "+".join(f.name for f in folders)
        limit = 55 if any(f.name.startswith(".dali") for f in folders) else 64
        rows.append({"check": f"carry {names}", "mib": round(size / MIB, 2), "limit_mib": limit,
                     "ok": size <= limit * MIB,
                     "detail": "tree + " + (", ".join(f"{f.name} {folder_bytes(f) / MIB:.2f} MiB" for f in present)
                                            or "nothing prepared here (benchmarks/prepare_gpu_wheels.sh)")})
    return rows


def out_check(out: Path) -> dict:
    files = [p for p in out.rglob("*") if p.is_file()]
    return {"check": "$OUT files", "mib": round(sum(p.stat().st_size for p in files) / MIB, 2),
            "limit_mib": 64, "ok": len(files) <= MAX_OUT_FILES and all(p.stat().st_size < 16 * MIB for p in files),
            "detail": f"{len(files)} files (at most {MAX_OUT_FILES}, each < 16 MiB): "
                      + ", ".join(sorted(p.name for p in files))}


# ------------------------------------------------------------------------------------------- results back here


def import_results(tarball: Path, results_dir: Path = REPO_ROOT / "benchmarks" / "results") -> dict:
    """Append a GPU run's rows to ``benchmarks/results/<benchmark>.jsonl`` and keep its summary.

    Rows of a dry run (``quick``) are left out. The summary (steps, caps, statuses, the commit and
    date of the run) goes to ``benchmarks/results/gpu_suite/<date>_<phase>.json``. Returns counts.
    """
    added: dict[str, int] = {}
    with tarfile.open(tarball) as tar:
        summary = json.loads(tar.extractfile("summary.json").read())
        if summary.get("dry_run"):
            raise ValueError(f"{tarball} is a dry run's: its numbers are not results")
        for member in tar.getmembers():
            if not (member.isfile() and member.name.startswith("results/") and member.name.endswith(".jsonl")):
                continue
            rows = [ln for ln in tar.extractfile(member).read().decode().splitlines()
                    if ln.strip() and not json.loads(ln).get("quick")]
            if rows:
                target = results_dir / Path(member.name).name
                with open(target, "a", encoding="utf-8") as fh:
                    fh.write("\n".join(rows) + "\n")
                added[target.name] = len(rows)
    runs = results_dir / "gpu_suite"
    runs.mkdir(parents=True, exist_ok=True)
    stamp = summary.get("date", "unknown").replace(":", "").replace("-", "")
    (runs / f"{stamp}_{summary.get('phase', 'phase')}.json").write_text(json.dumps(summary, indent=1) + "\n")
    return {"rows_added": added, "summary": str(runs / f"{stamp}_{summary.get('phase', 'phase')}.json")}


# ------------------------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--phase", choices=sorted(PHASES), default="core")
    parser.add_argument("--dry-run", action="store_true",
                        help="on the CPU: every step at CPU size, caps scaled down; checks carries, $OUT and arguments")
    parser.add_argument("--plan", action="store_true", help="print the cap table and exit")
    parser.add_argument("--budget-s", type=float, default=None,
                        help=f"the phase's budget before scaling (default {PHASE_BUDGET_S})")
    parser.add_argument("--cap-scale", type=float, default=None, help="multiply every cap (default 1; 0.5 dry run)")
    parser.add_argument("--out", type=Path, default=None, help="default: $OUT, else a temporary folder")
    parser.add_argument("--parts", type=Path, nargs="*", default=None,
                        help="dali phase: folders holding the split parts (default: .dali1 .. .daliN)")
    parser.add_argument("--only", nargs="*", default=None, help="run only these steps (names from the table)")
    parser.add_argument("--skip", nargs="*", default=[], help="leave these steps out")
    parser.add_argument("--data", type=Path, default=None, help="folder for generated photos (default: a fresh one)")
    parser.add_argument("--deepspeed", nargs="*", choices=list(DEEPSPEED_MODES), default=None,
                        help="deepspeed phase: bench_zero_teacher modes (default both)")
    parser.add_argument("--deepspeed-args", default="", help='more arguments for bench_zero_teacher, e.g. "--offload cpu"')
    parser.add_argument("--import-results", type=Path, default=None, metavar="TARBALL",
                        help="here, after a GPU run: append its rows to benchmarks/results and keep its summary")
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.import_results is not None:
        print(json.dumps(import_results(args.import_results)))
        return 0
    if args.plan:  # the cap table only: nothing is written
        scale, budget = _scale_and_budget(args)
        steps = PHASES[args.phase]({"data_dir": str(args.data or "<work>/data"), "deepspeed_modes": args.deepspeed,
                                    "deepspeed_args": shlex.split(args.deepspeed_args)})
        print(cap_table(steps, scale, args.dry_run, budget, args.phase))
        return 0
    suite = Suite(args)
    data_dir = str(args.data or (suite.work / "data"))
    py_args = {"data_dir": data_dir, "deepspeed_modes": args.deepspeed, "deepspeed_args": shlex.split(args.deepspeed_args)}
    steps = all_steps = PHASES[args.phase](py_args)
    if args.only is not None:
        steps = [s for s in steps if s.name in args.only or s.name == "install"]
    steps = [s for s in steps if s.name not in args.skip]

    def on_term(signum, frame):
        raise Terminated()

    previous_handler = signal.signal(signal.SIGTERM, on_term)
    interrupted = False
    try:
        suite.say(f"gpu_suite --phase {args.phase}{' --dry-run' if args.dry_run else ''}: results -> {suite.out}")
        suite.say(cap_table(steps, suite.scale, args.dry_run, suite.budget, args.phase))
        if args.dry_run:
            suite.checks += carry_checks(args.phase)
        for step in steps:
            if args.phase == "core" and step.name == "e2e" and step.gpu_args and not args.dry_run:
                # Ask the benchmark's own parser (after the install) which of CoOp / PromptKD it runs.
                learners, note = e2e_learners()
                step = dataclasses.replace(step, gpu_args=_with_learners(step.gpu_args, learners))
                if note:
                    suite.checks.append({"check": "e2e learners", "ok": True, "detail": note})
            suite.run_step(step)
        if args.dry_run:
            # Every step's GPU arguments, parsed by the step's own parser (after the install step), and
            # whether the e2e benchmark accepts PromptKD: one process, imports paid once.
            cases = [(s.parse_module, s.gpu_args[2:]) for s in all_steps if s.parse_module and s.gpu_args]
            e2e_module, lead = e2e_entry()
            probe = [(e2e_module, [*lead, "--quick", "--learners", "promptkd"])] if args.phase == "core" else []
            results = parse_checks(cases + probe)
            for (module, argv_), (_, ok, detail) in zip(cases, results):
                suite.checks.append({"check": f"parse {module} {' '.join(argv_)}"[:90], "ok": ok, "detail": detail})
            if probe:
                suite.checks.append({"check": "e2e learners", "ok": True,
                                     "detail": "coop" + (" promptkd" if results[-1][1] else
                                                         f"; {e2e_module} does not accept --learners promptkd")})
    except Terminated:
        interrupted = True
        suite.say("=== SIGTERM: packing what was measured")
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the report below must not be cut short
        suite.pack()
        suite.checks.append(out_check(suite.out))
        suite.pack()
        print()
        if suite.checks:
            print(_fmt_table([dict(c, ok="yes" if c["ok"] else "NO") for c in suite.checks],
                             ["check", "mib", "limit_mib", "ok", "detail"]))
            print()
        print(_fmt_table(suite.rows, ["step", "cap_s", "seconds", "status", "detail"]))
        failed = [r["step"] for r in suite.rows if r["status"] not in ("ok", "skipped")]
        failed += [c["check"] for c in suite.checks if not c["ok"]]
        # Each step's own last JSON line (its key numbers), so that the call's output tail holds them
        # even if no file came back.
        key = {r["step"]: {k: v for k, v in r["json"].items() if k not in ("device", "versions", "imports")}
               for r in suite.rows if isinstance(r.get("json"), dict)}
        print(json.dumps({"suite": "gpu_suite", "phase": args.phase, "dry_run": args.dry_run,
                          "steps": len(suite.rows), "ok": sum(r["status"] == "ok" for r in suite.rows),
                          "failed": failed, "interrupted": interrupted, "key": key,
                          "elapsed_s": round(time.time() - suite.started, 1), "out": str(suite.out),
                          "files": sorted(p.name for p in suite.out.iterdir() if p.is_file())}), flush=True)
        suite.close()
        signal.signal(signal.SIGTERM, previous_handler)
    return 1 if (failed or interrupted) else 0


def _with_learners(args: list[str], learners: list[str]) -> list[str]:
    i = args.index("--learners")
    j = i + 1
    while j < len(args) and not args[j].startswith("--"):
        j += 1
    return [*args[:i + 1], *learners, *args[j:]]


if __name__ == "__main__":
    raise SystemExit(main())
