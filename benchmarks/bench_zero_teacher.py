"""DeepSpeed's ZeRO-3 teacher (engine/distributed.py): per-rank memory, the largest teacher, the step overhead.

    python benchmarks/bench_zero_teacher.py [--mode memory] [--model clipdistill-tiny-teacher] [--ranks 1 2]
    python benchmarks/bench_zero_teacher.py --mode largest [--quick] [--offload none cpu] [--dtype fp32 bf16]
                                           [--rungs NAME ...] [--from-rung NAME] [--batch 64] [--budget-s 540]
    python benchmarks/bench_zero_teacher.py --mode throughput [--quick] [--pair ViT-L-14:ViT-B-16]
                                           [--learner coop] [--providers plain zero3 ...] [--batch 64]

Every case is its own ``torchrun`` job (``python -m torch.distributed.run``, this file with
``--worker``), so a crash or an out-of-memory error never poisons the next one. Rows go through the
shared harness (device, versions and commit are added there) into ``bench_zero_teacher.jsonl``.

``memory`` (metric ``param_bytes_per_rank``): 1 and 2 CPU ranks build the sharded teacher (stage 3,
persistence threshold 0, gloo) and report, per rank, the bytes of the image tower's parameters that
rank holds (Σ ds_tensor.numel() · element size) before any forward; the full tower's bytes are
Σ ds_numel · element size. Median/p20/p80 over ranks. Not a timing benchmark.

``largest`` (metric ``teacher_forward_ms``): which random-init image tower one device runs as the
engine's sharded teacher, with and without ``offload_param`` to the CPU. A ladder of towers, from
open_clip's named ViTs (:data:`NAMED_RUNGS`, up to ViT-e-14, the largest plain ViT open_clip
ships) to synthetic scalings (:data:`SYNTHETIC_RUNGS`: ``synthetic-ViT-w{width}-L{layers}-p{patch}``,
MLP ratio 4, head width 128, 224 px, registered with open_clip inside the worker). One rank
(``--nproc_per_node 1``) runs :func:`~clipdistill.engine.parallel.zero.build_sharded_teacher`
(rank 0 first builds the whole CLIP in fp32 in host memory, then streams the tower into the
partitions) and times a forward of ``--batch`` images under no_grad, bf16 autocast on a GPU as
the trainer runs it. Per rung and mode a row: status (ok, oom, error, killed, timeout, or
``host-ram`` when rank 0's fp32 copy alone cannot fit the host's memory, so it is not tried), the
error text, the tower's parameter count, peak device memory (``torch.cuda.max_memory_allocated``,
while building and while running forwards), device memory held after building, the host's peak
RSS, build and forward times. The climb stops at the first failure of each (offload, dtype).
The teacher's parameters are fp32 unless ``--dtype bf16`` (DeepSpeed's ``"bf16": {"enabled": true}``).

``throughput`` (metric ``images_per_s``): the engine's full distillation step (teacher under
no_grad, :class:`~clipdistill.engine.step.DistillStep`, backward, the Trainer's optimizer, bf16
autocast on a GPU), built by :func:`~clipdistill.engine.training.builder.build_run` and stepped as
``benchmarks.bench_e2e``'s ``ours-live`` provider steps it, but on one fixed synthetic batch
(no loader), for the plain teacher (``plain``: :func:`~clipdistill.engine.models.build_teacher`,
bf16 weights on a GPU) and the ZeRO-3 teacher (``zero3``: fp32 partitions; ``zero3-bf16``: bf16
partitions, the engine's default on a GPU when the DeepSpeed config names no dtype;
``zero3-offload``: fp32 partitions in host memory), one torchrun process
each. Rows carry ``ratio_to_plain``: the path's overhead on one device.

Defaults are for the GPU machine (ViT-L-14 -> ViT-B-16, batch 64); ``--quick`` (and any run
without a GPU) uses the tiny shipped configs on the CPU.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

BENCHMARK = "bench_zero_teacher"
REPO_ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------- launching


@dataclass(frozen=True)
class Launched:
    """How one torchrun job ended: exit code (None: killed at its time limit) and its output."""

    returncode: Optional[int]
    stdout: str
    stderr: str

    @property
    def timed_out(self) -> bool:
        return self.returncode is None


def torchrun(ranks: int, worker_args: list[str], *, timeout: Optional[float] = None,
             cpu: bool = False) -> Launched:
    """Run this file as ``ranks`` torchrun workers (``--worker`` plus ``worker_args``).

    ``python -m torch.distributed.run`` rather than a ``torchrun`` script beside the interpreter
    (the GPU machine's may be elsewhere). The job runs in its own session: at ``timeout`` the
    whole group (launcher and workers) is killed, so an orphaned worker never keeps device memory
    from the next case. ``cpu``: DeepSpeed's CPU accelerator (gloo).
    """
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ)
    if cpu or not torch.cuda.is_available():
        env["DS_ACCELERATOR"] = "cpu"
        env["OMP_NUM_THREADS"] = "1"  # the ranks share the cores (a GPU job keeps them all: host init is slow)
        env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "clipdistill" / "torch_extensions"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_addr",
           "127.0.0.1", "--master_port", str(port), __file__, "--worker", *worker_args]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
        return Launched(proc.returncode, out, err)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the session this call started: launcher and its workers
        out, err = proc.communicate()
        return Launched(None, out, err)


def _write_json(path: Path, data: dict) -> None:
    """Replace ``path`` atomically: a worker killed mid-write leaves the previous report."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def _leave(code: int = 0) -> None:
    """End a DeepSpeed worker without the interpreter's teardown (see engine/train.py: _cmd_distill).

    Its report is written; a native destructor of a ZeRO-3 process has been seen to abort at exit.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _host_rss() -> tuple[int, int]:
    """(current, peak) resident set of this process in bytes."""
    with open("/proc/self/statm") as fh:
        current = int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return current, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _host_total() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


# --------------------------------------------------------------------------------- memory mode


def _memory_worker(model: str, out: str) -> None:
    from clipdistill.engine.parallel.launch import detect_launch, init_process_group
    from clipdistill.engine.parallel.zero import build_sharded_teacher

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
        job = torchrun(ranks, ["--mode", "memory", "--model", model, "--out", tmp], cpu=True)
        if job.returncode:
            raise RuntimeError(f"memory case {model} ranks={ranks} failed:\n{job.stderr[-4000:]}")
        return [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(ranks)]


def _memory_main(args: argparse.Namespace) -> list[dict]:
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
    written = record(BENCHMARK, rows, device="cpu", results_dir=args.results_dir)
    print(json.dumps(written))
    return written


# --------------------------------------------------------------------------------- the ladder


@dataclass(frozen=True)
class SyntheticTower:
    """A ViT image tower open_clip does not ship: width, depth, patch (MLP ratio 4, head width 128)."""

    width: int
    layers: int
    patch_size: int = 14
    image_size: int = 224
    head_width: int = 128

    @property
    def name(self) -> str:
        return f"synthetic-ViT-w{self.width}-L{self.layers}-p{self.patch_size}"

    def open_clip_config(self) -> dict:
        """An open_clip model config: this tower and a one-layer text tower (only the image tower is sharded)."""
        return {
            "embed_dim": 1024 if self.width >= 1024 else 48,
            "vision_cfg": {"image_size": self.image_size, "layers": self.layers, "width": self.width,
                           "head_width": self.head_width, "mlp_ratio": 4.0, "patch_size": self.patch_size},
            "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 128, "heads": 2, "layers": 1},
        }


# open_clip's named plain ViTs, by size; ViT-e-14 (3.8 B image-tower parameters) is the largest it
# ships. (EVA02-E-14, 4.4 B, is a timm tower; PE-Core-bigG-14-448 too: not plain open_clip ViTs.)
NAMED_RUNGS = ("ViT-L-14", "ViT-H-14", "ViT-g-14", "ViT-bigG-14", "ViT-e-14")
# Image-tower parameters ~ 12 · width² · layers: 5.9, 8.1, 12.1, 16.1, 20.1 (75 GiB in fp32), 21.8
# (ViT-22B's width, depth and MLP; 81 GiB in fp32), 28.1 and 45.1 billion (84 GiB in bf16): the
# last cannot fit 80 GB in any precision. On a 128 GiB host, rank 0's fp32 copy of the 45.1 B one
# (168 GiB) does not fit either: that rung is refused as ``host-ram`` without being started.
SYNTHETIC_RUNGS = tuple(SyntheticTower(w, n) for w, n in
                        ((3072, 52), (4096, 40), (4096, 60), (5120, 51), (5120, 64), (6144, 48), (6144, 62),
                         (8192, 56)))
# --quick: the shipped tiny teacher, then a synthetic tower twice as wide, one layer deeper (32 px, patch 8).
QUICK_RUNGS = ("clipdistill-tiny-teacher", SyntheticTower(192, 4, patch_size=8, image_size=32, head_width=32))
_SYNTHETIC_BY_NAME = {t.name: t for t in (*SYNTHETIC_RUNGS, *QUICK_RUNGS) if isinstance(t, SyntheticTower)}


def ladder(quick: bool) -> list[str]:
    """The rung names, smallest first."""
    rungs = QUICK_RUNGS if quick else (*NAMED_RUNGS, *SYNTHETIC_RUNGS)
    return [r.name if isinstance(r, SyntheticTower) else r for r in rungs]


def register_rungs(names: list[str], folder: Path) -> None:
    """Make open_clip know the synthetic rungs among ``names`` (JSON configs written to ``folder``)."""
    from clipdistill.engine.models import import_open_clip

    open_clip = import_open_clip()
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        if name in _SYNTHETIC_BY_NAME:
            (folder / f"{name}.json").write_text(json.dumps(_SYNTHETIC_BY_NAME[name].open_clip_config()))
    open_clip.add_model_config(folder)


def parameter_counts(name: str) -> dict:
    """The image tower's and the whole CLIP's parameter counts and the tower's shape, from meta tensors.

    ``name`` must be known to open_clip (:func:`register_rungs` for synthetic ones).
    """
    from clipdistill.engine.parallel.zero import build_vision_tower
    from clipdistill.engine.models import import_open_clip

    open_clip = import_open_clip()
    with torch.device("meta"):
        tower = build_vision_tower(name)
        clip = open_clip.create_model(name, device="meta")
    from open_clip.model import CLIPVisionCfg

    vision_cfg = CLIPVisionCfg(**open_clip.get_model_config(name)["vision_cfg"])  # with open_clip's defaults
    return {"params": sum(p.numel() for p in tower.parameters()), "clip_params": sum(p.numel() for p in clip.parameters()),
            "config": {k: getattr(vision_cfg, k) for k in ("width", "layers", "mlp_ratio", "patch_size", "image_size")}}


def zero3_config(offload: str, dtype: str, batch: int) -> dict:
    """The DeepSpeed config of a case: ZeRO-3 with DeepSpeed's defaults, optional CPU offload and bf16."""
    zero: dict = {"stage": 3}
    if offload != "none":
        zero["offload_param"] = {"device": offload, "pin_memory": True}
    # Said either way: without a bf16 section the engine would pick bf16 on a GPU (teacher.precision).
    return {"zero_optimization": zero, "train_micro_batch_size_per_gpu": batch, "bf16": {"enabled": dtype == "bf16"}}


def classify_failure(text: str) -> str:
    """``oom`` for the ways an allocation failure reads (torch, cuBLAS, NCCL), else ``error``."""
    low = text.lower()
    return "oom" if any(s in low for s in ("out of memory", "outofmemoryerror", "alloc_failed")) else "error"


# --------------------------------------------------------------------------------- largest: the worker


def _autocast(device: torch.device):
    """bf16 autocast on a GPU, as the trainer runs a step (``train.precision`` auto); none on the CPU."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def _largest_worker(args: argparse.Namespace) -> None:
    from benchmarks.harness import measure
    from clipdistill.engine.parallel.launch import detect_launch, init_process_group, rank_device
    from clipdistill.engine.parallel.zero import build_sharded_teacher

    report_path = Path(args.out)
    report: dict = {"phase": "start"}

    def report_phase(**fields) -> None:
        report.update(fields)
        _write_json(report_path, report)

    try:
        env = detect_launch(required=True)
        device = rank_device(torch.device(args.device), env)
        init_process_group(env, device)
        register_rungs([args.rung], report_path.parent / "configs")
        report_phase(phase="build")
        cuda = device.type == "cuda"
        started = time.perf_counter()
        (offload,), (dtype,) = args.offload, args.dtype  # one series per job
        teacher, _ = build_sharded_teacher(args.rung, None, zero3_config(offload, dtype, args.batch),
                                           device=device, seed=0,
                                           class_vectors=lambda t: torch.zeros(1, t.model.visual.output_dim))
        if cuda:
            torch.cuda.synchronize(device)
        visual = teacher.model.visual
        rss, rss_peak = _host_rss()
        report_phase(phase="forward", build_s=time.perf_counter() - started,
                     params=sum(int(p.ds_numel) for p in visual.parameters()),
                     tower_dtype=str(teacher.input_dtype).replace("torch.", ""), offload_device=teacher.offload_device,
                     host_rss_after_build_bytes=rss, host_peak_rss_bytes=rss_peak,
                     device_bytes_after_build=torch.cuda.memory_allocated(device) if cuda else None,
                     peak_device_build_bytes=torch.cuda.max_memory_allocated(device) if cuda else None)
        size = visual.image_size if isinstance(visual.image_size, int) else visual.image_size[0]
        images = torch.randn(args.batch, 3, size, size, device=device)

        def forward() -> torch.Tensor:
            with _autocast(device):
                return teacher.encode_image(images)

        features = forward()  # the first forward, untimed (also the measure's warm-up)
        report_phase(finite=bool(torch.isfinite(features).all()), output_dim=int(features.shape[1]))
        stats = measure(forward, device=device, warmup=0, repeats=args.repeats)
        rss, rss_peak = _host_rss()
        report_phase(phase="done", status="ok", stats=stats, image_size=size, host_peak_rss_bytes=rss_peak,
                     peak_device_forward_bytes=torch.cuda.max_memory_allocated(device) if cuda else None)
    except BaseException as exc:  # noqa: BLE001 - the report must say what stopped the rung, whatever it was
        text = f"{type(exc).__name__}: {exc}"
        report_phase(status=classify_failure(text), error=text[-2000:])
        _leave(1)
    _leave(0)


# --------------------------------------------------------------------------------- largest: the climb


def _rung_row(name: str, offload: str, dtype: str, batch: int, device: str, facts: dict, report: dict,
              status: str, error: Optional[str], wall_s: float) -> dict:
    stats = report.get("stats") or {}
    median = stats.get("median")
    return {
        "provider": f"deepspeed-zero3 offload={offload}", "shape": f"{name} B={batch}",
        "dtype": f"{dtype} params" + (", bf16 autocast" if device == "cuda" else ""), "metric": "teacher_forward_ms",
        "median": median, "p20": stats.get("p20"), "p80": stats.get("p80"), "unit": "ms",
        "repeats": stats.get("repeats"), "peak_mem_bytes": stats.get("peak_mem_bytes"),
        "status": status, "error": error, "failed_in": None if status == "ok" else report.get("phase"),
        "rung": name, "synthetic": name in _SYNTHETIC_BY_NAME, "offload": offload, "param_dtype": dtype,
        "tower_dtype": report.get("tower_dtype"), "offload_device": report.get("offload_device"),
        "batch": batch, "images_per_s": batch / (median * 1e-3) if median else None,
        "params": report.get("params", facts["params"]), "clip_params": facts["clip_params"],
        "config": facts["config"], "ds_config": zero3_config(offload, dtype, batch),
        "peak_device_build_bytes": report.get("peak_device_build_bytes"),
        "peak_device_forward_bytes": report.get("peak_device_forward_bytes"),
        "device_bytes_after_build": report.get("device_bytes_after_build"),
        "host_peak_rss_bytes": report.get("host_peak_rss_bytes"),
        "host_rss_after_build_bytes": report.get("host_rss_after_build_bytes"),
        "host_total_bytes": _host_total(), "build_s": report.get("build_s"), "wall_s": wall_s,
        "finite": report.get("finite"),
    }


def _run_rung(name: str, offload: str, dtype: str, *, batch: int, repeats: int, device: str, facts: dict,
              timeout: float) -> dict:
    """One rung in its own torchrun job; a row whatever happened."""
    need = 4 * facts["clip_params"] + (facts["params"] * (2 if dtype == "bf16" else 4) if offload == "cpu" else 0)
    if need > _host_total():
        error = (f"not started: rank 0 holds the whole CLIP in fp32 in host memory ({4 * facts['clip_params'] / 2**30:.0f}"
                 f" GiB){' plus the offloaded partitions' if offload == 'cpu' else ''}, at least {need / 2**30:.0f} GiB,"
                 f" and the host has {_host_total() / 2**30:.0f} GiB")
        return _rung_row(name, offload, dtype, batch, device, facts, {}, "host-ram", error, 0.0)
    with tempfile.TemporaryDirectory(prefix="zero_teacher_") as tmp:
        report_path = Path(tmp, "report.json")
        started = time.perf_counter()
        job = torchrun(1, ["--mode", "largest", "--rung", name, "--offload", offload, "--dtype", dtype, "--batch",
                           str(batch), "--repeats", str(repeats), "--device", device, "--out", str(report_path)],
                       timeout=timeout, cpu=device == "cpu")
        wall = time.perf_counter() - started
        report = json.loads(report_path.read_text()) if report_path.exists() else {}
    status, error = report.get("status"), report.get("error")
    if job.timed_out:
        status, error = "timeout", f"killed after {timeout:.0f} s in phase {report.get('phase')}"
    elif status is None or (status == "ok" and job.returncode):
        # No report of its own: the process was killed (the kernel's OOM killer sends SIGKILL) or crashed.
        tail = job.stderr.strip().splitlines()[-6:]
        killed = any(s in job.stderr for s in ("SIGKILL", "Signal 9", "exitcode  : -9"))
        status = "killed" if killed else "error"
        error = (("SIGKILL (host out of memory?)" if killed else f"exit code {job.returncode}")
                 + f" in phase {report.get('phase')}: " + " | ".join(tail))[-2000:]
    return _rung_row(name, offload, dtype, batch, device, facts, report, status, error, wall)


def climb(rungs: list[str], series: list[tuple[str, str]], run: Callable[[str, str, str], Optional[dict]],
          write: Callable[[dict], None]) -> dict[tuple[str, str], Optional[str]]:
    """Run every rung, smallest first, for each (offload, dtype) series until that series' first failure.

    ``run(rung, offload, dtype)`` returns a row (``status`` ok or not), or None when no time is
    left (the climb ends). Rows go to ``write`` as they come. Returns, per series, the largest rung
    that ran (None: none did).
    """
    largest: dict[tuple[str, str], Optional[str]] = {s: None for s in series}
    climbing = list(series)
    for rung in rungs:
        for offload, dtype in list(climbing):
            row = run(rung, offload, dtype)
            if row is None:
                return largest
            write(row)
            if row["status"] == "ok":
                largest[(offload, dtype)] = rung
            else:
                climbing.remove((offload, dtype))
        if not climbing:
            break
    return largest


def _largest_main(args: argparse.Namespace, quick: bool) -> list[dict]:
    from benchmarks.harness import print_table, record, summary_line

    device = "cpu" if quick else "cuda"
    rungs = args.rungs or ladder(quick)
    if args.from_rung:
        if args.from_rung not in rungs:
            raise SystemExit(f"--from-rung {args.from_rung!r} is not a rung: {', '.join(rungs)}")
        rungs = rungs[rungs.index(args.from_rung):]
    unknown = [r for r in rungs if r not in ladder(True) + ladder(False)]
    if unknown:
        print(f"note: {unknown} are not ladder rungs; they must be open_clip names", flush=True)
    batch = args.batch or (4 if quick else 64)
    repeats = args.repeats or (2 if quick else 3)
    deadline = time.time() + args.budget_s
    with tempfile.TemporaryDirectory(prefix="zero_teacher_configs_") as tmp:
        register_rungs(rungs, Path(tmp))
        facts = {name: parameter_counts(name) for name in rungs}
    written: list[dict] = []

    def run(rung: str, offload: str, dtype: str) -> Optional[dict]:
        left = deadline - time.time()
        if left < 30:
            print(f"budget: {left:.0f} s left, stopping before {rung} offload={offload} {dtype}", flush=True)
            return None
        print(f"{rung} ({facts[rung]['params'] / 1e9:.3g} B) offload={offload} {dtype} ...", flush=True)
        return _run_rung(rung, offload, dtype, batch=batch, repeats=repeats, device=device, facts=facts[rung],
                         timeout=min(args.rung_timeout_s, left - 10))

    def write(row: dict) -> None:
        written.extend(record(BENCHMARK, [row], device=device, quick=quick, results_dir=args.results_dir))
        print(f"  -> {row['status']}" + (f": {row['error'][:300]}" if row["error"] else ""), flush=True)

    series = [(o, d) for d in args.dtype for o in args.offload]
    largest = climb(rungs, series, run, write)
    print_table(written, ["rung", "offload", "param_dtype", "status", "params", "median", "images_per_s",
                          "peak_device_forward_bytes", "device_bytes_after_build", "host_peak_rss_bytes", "build_s"])
    summary = {f"{o}/{d}": ({"rung": r, "params": facts[r]["params"]} if r else None)
               for (o, d), r in largest.items()}
    summary_line(BENCHMARK, written, mode="largest", largest=summary)
    return written


# --------------------------------------------------------------------------------- throughput


THROUGHPUT_PROVIDERS = {  # provider -> (offload, teacher parameter dtype); plain: no DeepSpeed
    "plain": None, "zero3": ("none", "fp32"), "zero3-bf16": ("none", "bf16"), "zero3-offload": ("cpu", "fp32"),
}


def _throughput_worker(args: argparse.Namespace) -> None:
    import itertools
    from types import SimpleNamespace

    from benchmarks.harness import measure
    from benchmarks.bench_e2e import EnginePipeline, make_images, run_config
    from clipdistill.engine.config.run import load_run_config
    from clipdistill.engine.training.builder import build_run

    work = Path(args.out).parent
    teacher_name, student_name = args.pair.split(":")
    images = make_images(work / "images", args.batch, 64)  # the run needs a source; steps use tensors
    base = run_config(work, images, teacher=teacher_name, student=student_name, learner=args.learner,
                      batch=args.batch, quick=args.device == "cpu", classes=args.classes, device=args.device,
                      workers=0)
    overrides = [f"train.out_dir={work / 'run'}", "data.backend=torch"]
    sharded = THROUGHPUT_PROVIDERS[args.provider]
    if sharded is not None:
        ds_path = work / "ds_config.json"
        ds_path.write_text(json.dumps(zero3_config(*sharded, args.batch)))
        overrides.append(f"train.deepspeed={ds_path}")
    started = time.perf_counter()
    run = build_run(load_run_config(base, overrides), log=lambda m: None)
    build_s = time.perf_counter() - started
    cuda = run.device.type == "cuda"
    # One fixed batch at each resolution the run asks for, in the loader's dtype, no padding.
    batch = SimpleNamespace(images={o.name: torch.randn(args.batch, 3, o.size, o.size, device=run.device)
                                    .to(run.loader.dtype) for o in run.loader.outputs},
                            mask=torch.ones(args.batch, dtype=torch.bool))
    pipeline = EnginePipeline(run)  # the Trainer's optimizer and the step as the Trainer takes it
    pipeline.batches = itertools.repeat(batch)
    if cuda:
        torch.cuda.synchronize(run.device)
        torch.cuda.reset_peak_memory_stats(run.device)
    stats = measure(pipeline.step, device=run.device, warmup=args.warmup, repeats=args.repeats)
    teacher = run.step.teacher
    _write_json(Path(args.out), {
        "stats": stats, "build_s": build_s, "autocast": "bf16" if run.autocast_dtype == torch.bfloat16 else "off",
        "teacher_param_dtype": str(teacher.input_dtype).replace("torch.", ""),
        "offload": getattr(teacher, "offload_device", None) or "none", "teacher_type": type(teacher).__name__,
        "peak_device_bytes": torch.cuda.max_memory_allocated(run.device) if cuda else None,
        "host_peak_rss_bytes": _host_rss()[1]})
    _leave(0)


def _throughput_main(args: argparse.Namespace, quick: bool) -> list[dict]:
    from benchmarks.harness import print_table, record, summary_line

    device = "cpu" if quick else "cuda"
    pair = args.pair or ("clipdistill-tiny-teacher:clipdistill-tiny-student" if quick else "ViT-L-14:ViT-B-16")
    batch = args.batch or (8 if quick else 64)
    providers = args.providers or (["plain", "zero3"] if quick else list(THROUGHPUT_PROVIDERS))
    if providers[0] != "plain":
        providers = ["plain", *[p for p in providers if p != "plain"]]  # the ratio's denominator first
    steps, warmup = args.repeats or (4 if quick else 20), args.warmup if args.warmup is not None else (1 if quick else 3)
    deadline = time.time() + args.budget_s
    shape = f"{pair.replace(':', '->')},{args.learner},B={batch}"
    written: list[dict] = []
    plain_ips = None
    for provider in providers:
        left = deadline - time.time()
        if left < 30:
            print(f"budget: {left:.0f} s left, stopping before {provider}", flush=True)
            break
        with tempfile.TemporaryDirectory(prefix="zero_teacher_step_") as tmp:
            out = Path(tmp, "result.json")
            job = torchrun(1, ["--mode", "throughput", "--provider", provider, "--pair", pair, "--learner", args.learner,
                               "--batch", str(batch), "--classes", str(args.classes), "--repeats", str(steps),
                               "--warmup", str(warmup), "--device", device, "--out", str(out)],
                           timeout=left - 10, cpu=quick)
            result = json.loads(out.read_text()) if out.exists() else None
        if result is None:
            why = "timed out" if job.timed_out else f"exit code {job.returncode}"
            print(f"{provider}: {why}\n{job.stderr[-3000:]}", flush=True)
            row = {"provider": provider, "shape": shape, "dtype": None, "metric": "images_per_s", "median": None,
                   "p20": None, "p80": None, "unit": "images/s", "status": "timeout" if job.timed_out else "error",
                   "error": job.stderr[-2000:], "batch": batch}
        else:
            stats = result["stats"]
            ips = batch / (stats["median"] * 1e-3)
            plain_ips = ips if provider == "plain" else plain_ips
            row = {"provider": provider, "shape": shape,
                   "dtype": f"{result['teacher_param_dtype']} teacher, autocast {result['autocast']}",
                   "metric": "images_per_s", "median": ips, "p20": batch / (stats["p80"] * 1e-3),
                   "p80": batch / (stats["p20"] * 1e-3), "unit": "images/s", "repeats": stats["repeats"],
                   "peak_mem_bytes": stats["peak_mem_bytes"], "status": "ok", "step_ms": stats["median"],
                   "ratio_to_plain": ips / plain_ips if plain_ips else None, "batch": batch,
                   "teacher": pair.split(":")[0], "student": pair.split(":")[1], "learner": args.learner,
                   "classes": args.classes, "ds_config": zero3_config(*THROUGHPUT_PROVIDERS[provider], batch)
                   if THROUGHPUT_PROVIDERS[provider] else None, **{k: result[k] for k in (
                       "teacher_type", "teacher_param_dtype", "autocast", "offload", "peak_device_bytes",
                       "host_peak_rss_bytes", "build_s")}}
        written += record(BENCHMARK, [row], device=device, quick=quick, results_dir=args.results_dir)
    print_table(written, ["provider", "shape", "dtype", "median", "unit", "step_ms", "ratio_to_plain",
                          "peak_device_bytes", "status"])
    ratios = {r["provider"]: r.get("ratio_to_plain") for r in written if r["provider"] != "plain"}
    summary_line(BENCHMARK, written, mode="throughput", ratio_to_plain=ratios)
    return written


# --------------------------------------------------------------------------------- command line


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=["memory", "largest", "throughput"], default="memory")
    parser.add_argument("--quick", action="store_true", help="tiny models on the CPU (also without a GPU)")
    parser.add_argument("--results-dir", default=None)
    parser.add_argument("--budget-s", type=float, default=540.0, help="largest/throughput: total wall-clock budget")
    parser.add_argument("--batch", type=int, default=None, help="images per forward/step (default 64; quick 4/8)")
    parser.add_argument("--repeats", type=int, default=None, help="timed forwards/steps")
    parser.add_argument("--warmup", type=int, default=None, help="throughput: untimed steps first")
    memory = parser.add_argument_group("memory")
    memory.add_argument("--model", default="clipdistill-tiny-teacher")
    memory.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    largest = parser.add_argument_group("largest")
    largest.add_argument("--offload", nargs="+", choices=["none", "cpu"], default=["none", "cpu"])
    largest.add_argument("--dtype", nargs="+", choices=["fp32", "bf16"], default=["fp32"],
                         help="the sharded teacher's parameters (bf16: DeepSpeed's bf16.enabled)")
    largest.add_argument("--rungs", nargs="+", default=None, help="rung names (default: the whole ladder)")
    largest.add_argument("--from-rung", default=None, help="start the ladder at this rung")
    largest.add_argument("--rung-timeout-s", type=float, default=300.0)
    step = parser.add_argument_group("throughput")
    step.add_argument("--pair", default=None, metavar="TEACHER:STUDENT", help="default ViT-L-14:ViT-B-16")
    step.add_argument("--learner", default="coop", choices=["coop", "vpt"])
    step.add_argument("--providers", nargs="+", choices=list(THROUGHPUT_PROVIDERS), default=None,
                      help="default: all on a GPU, plain and zero3 quick")
    step.add_argument("--classes", type=int, default=100)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--rung", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--provider", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    return parser


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    if str(REPO_ROOT) not in sys.path:  # run as a script: the harness beside it
        sys.path.insert(0, str(REPO_ROOT))
    if args.worker:
        if args.mode == "memory":
            _memory_worker(args.model, args.out)
        elif args.mode == "largest":
            _largest_worker(args)
        else:
            _throughput_worker(args)
        return 0
    quick = args.quick or not torch.cuda.is_available()
    if args.mode == "memory":
        _memory_main(args)
    elif args.mode == "largest":
        _largest_main(args, quick)
    else:
        _throughput_main(args, quick)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
