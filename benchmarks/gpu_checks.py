"""The GPU suite's own measurements, one subcommand each, every row recorded as it is measured.

    python -m benchmarks.gpu_checks env                       # nvidia-smi, versions, device facts
    python -m benchmarks.gpu_checks ceilings [--size 8192] [--copy-mib 1024]
    python -m benchmarks.gpu_checks kd-correctness [--small]   # bf16/fp16/fp32 vs float64, values and gradients
    python -m benchmarks.gpu_checks kernel-resources           # real registers/spills vs benchmarks.kernel_report
    python -m benchmarks.gpu_checks nvjpeg [--images 1024] [--batch 256] [--workers 16]

Each prints a table and, last, one line of JSON; rows go through the shared harness
(``record``) to ``$CLIPDISTILL_RESULTS_DIR`` (the suite sets it), one file per check:
``device_ceilings``, ``kd_loss_correctness``, ``kernel_resources``, ``jpeg_decode``.
Exit status 0 when the check ran and held; 1 when it found a failure (a tolerance
exceeded, a decoder that does not work); the rows say which.

On the CPU (``--device cpu``, the suite's dry run) every check runs at tiny sizes so that
its code is exercised; the numbers mean nothing there.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks.harness import measure, print_table, record

LOGIT_SCALE = 100.0
# Largest error allowed relative to the float64 result's largest magnitude at logit_scale /
# temperature = 100, scaled up by (logit_scale / temperature) / 100 above that: the same table
# as tests/kernels/test_kd_loss.py (logits of size a carry a times the products' rounding).
TOLERANCE = {
    torch.float32: 1e-3,
    torch.float16: 2e-3,
    torch.bfloat16: 2e-2,
}


def _device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_checks: --device cuda, but torch sees no CUDA device (use --device cpu for a dry run)")
    return torch.device(name)


def _finish(check: str, rows: list[dict], **extra) -> None:
    if rows:
        print_table(rows)
    print(json.dumps({"check": check, "rows": len(rows), **extra}), flush=True)


# --------------------------------------------------------------------------------------- env


ENV_IMPORTS = ("clipdistill.kernels", "clipdistill.loaders", "clipdistill.engine", "open_clip", "nvidia.dali")


def check_env(device: torch.device, modules: tuple[str, ...] = ENV_IMPORTS) -> int:
    if device.type == "cuda":
        subprocess.run(["nvidia-smi"], check=False)
    versions = {}
    for name in ("torch", "triton", "torchvision", "timm", "open_clip_torch", "numpy", "pillow", "nvidia-dali-cuda130",
                 "packaging", "pytest", "clipdistill"):
        try:
            from importlib import metadata

            versions[name] = metadata.version(name)
        except Exception:
            versions[name] = None
    facts = {"python": sys.version.split()[0], "cuda_available": torch.cuda.is_available(),
             "torch_cuda": torch.version.cuda, "cpu_count": os.cpu_count()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        facts.update(device=props.name, sms=props.multi_processor_count, memory_gib=round(props.total_memory / 2**30, 1),
                     capability=f"{props.major}.{props.minor}", l2_mb=round(getattr(props, "L2_cache_size", 0) / 1e6, 1))
    imports = {}
    for module in modules:
        try:
            if module == "open_clip":
                from clipdistill.engine.models import import_open_clip

                import_open_clip()
            else:
                __import__(module)
            imports[module] = "ok"
        except Exception as exc:  # a fact to report, not a failure of this check
            imports[module] = f"{type(exc).__name__}: {exc}"[:160]
    for key, value in {**versions, **facts, **imports}.items():
        print(f"{key:28s} {value}")
    print(json.dumps({"check": "env", "versions": versions, **facts, "imports": imports}), flush=True)
    return 0


# --------------------------------------------------------------------------------------- ceilings


def measure_ceilings(device: str = "cuda", size: int = 8192, copy_mib: int = 1024, quick: bool = False) -> list[dict]:
    """The device's own limits: bf16 GEMM TFLOP/s (fp32 on the CPU) and device-to-device copy GB/s."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    stats = measure(lambda: torch.mm(a, b), device=device, warmup=2 if quick else 10, repeats=3 if quick else 50)
    gemm = {"provider": "torch.mm", "shape": f"{size}x{size}x{size}", "dtype": str(dtype).replace("torch.", ""),
            "metric": "matmul_ms", **stats, "tflops": 2.0 * size**3 / (stats["median"] * 1e-3) / 1e12}
    del a, b
    n = copy_mib * 2**20 // 4
    src = torch.empty(n, device=device, dtype=torch.float32).uniform_()
    dst = torch.empty_like(src)
    stats = measure(lambda: dst.copy_(src), device=device, warmup=2 if quick else 10, repeats=3 if quick else 50)
    copy = {"provider": "tensor.copy_", "shape": f"{copy_mib}MiB", "dtype": "float32", "metric": "copy_ms",
            **stats, "gb_per_s": 2 * n * 4 / (stats["median"] * 1e-3) / 1e9}  # bytes read + written
    return [gemm, copy]


def check_ceilings(device: torch.device, size: int, copy_mib: int) -> int:
    quick = device.type != "cuda"
    rows = []
    for row in measure_ceilings(device.type, size=size, copy_mib=copy_mib, quick=quick):
        rows += record("device_ceilings", [row], device=device, quick=quick)
    _finish("ceilings", rows, tflops=rows[0]["tflops"], gb_per_s=rows[1]["gb_per_s"])
    return 0


# --------------------------------------------------------------------------------------- kd_loss correctness

# (name, batch, classes, d_student, d_teacher, separate, options): the kernel's block edges are
# crossed (primes, non-powers of two) and both published losses are covered.
KD_CASES = (
    ("kdpl_shared", 300, 2011, 200, 200, False, dict(forward_weight=0.5, reverse_weight=0.5, reduction="batchmean")),
    ("kdpl_separate_T4", 300, 2011, 200, 264, True,
     dict(forward_weight=0.5, reverse_weight=0.5, reduction="batchmean", temperature=4.0)),
    ("promptkd_T0.05", 256, 1000, 768, 768, False,
     dict(forward_weight=1.0, reverse_weight=0.0, reduction="mean", temperature_squared=True, temperature=0.05)),
    ("few_shot_rows", 37, 997, 512, 512, False,
     dict(forward_weight=0.3, reverse_weight=1.7, reduction="none")),
)
KD_CASES_SMALL = (  # the dry run's: separate vectors (both gradients), a temperature, both directions
    ("tiny_separate_T0.5", 6, 11, 24, 32, True,
     dict(forward_weight=0.7, reverse_weight=0.3, reduction="mean", temperature_squared=True, temperature=0.5)),
)


def kd_errors(case: tuple, dtype: torch.dtype, device: torch.device, seed: int = 0) -> list[dict]:
    """kd_loss (Triton) against kd_loss_reference in float64: the loss and every gradient."""
    from clipdistill.kernels import kd_loss, kd_loss_reference

    name, batch, classes, ds, dt, separate, options = case
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, grad=False):
        x = torch.randn(*shape, generator=gen, dtype=torch.float64)
        return x.to(device=device, dtype=dtype).requires_grad_(grad)

    inputs = dict(student_features=rand(batch, ds, grad=True), teacher_features=rand(batch, dt),
                  class_vectors=rand(classes, dt), student_class_vectors=rand(classes, ds, grad=True) if separate else None)
    ref_inputs = {k: (None if v is None else v.detach().double().requires_grad_(v.requires_grad)) for k, v in inputs.items()}
    out = kd_loss(**inputs, logit_scale=LOGIT_SCALE, backend="triton", **options)
    ref = kd_loss_reference(**ref_inputs, logit_scale=LOGIT_SCALE, **options)
    leaves = [k for k, v in inputs.items() if v is not None and v.requires_grad]
    weights = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(7)).to(device)
    grads = torch.autograd.grad((out.double() * weights).sum(), [inputs[k] for k in leaves])
    ref_grads = torch.autograd.grad((ref * weights).sum(), [ref_inputs[k] for k in leaves])
    scale = LOGIT_SCALE / options.get("temperature", 1.0)
    tol = TOLERANCE[dtype] * max(1.0, scale / 100.0)
    rows = []
    for quantity, got, want in [("loss", out, ref)] + [(f"grad_{k}", g, r) for k, g, r in zip(leaves, grads, ref_grads)]:
        finite = bool(torch.isfinite(got).all())
        err = (got.double() - want).abs().max().item()
        bound = tol * max(want.abs().max().item(), 0.05)
        rows.append({"provider": "ours", "shape": f"{name}:B={batch},C={classes},Ds={ds},Dt={dt}",
                     "dtype": str(dtype).replace("torch.", ""), "metric": f"max_abs_err_{quantity}",
                     "median": err, "p20": err, "p80": err, "unit": "abs", "bound": bound,
                     "logit_scale_over_T": scale, "finite": finite, "ok": finite and err <= bound})
    return rows


def check_kd_correctness(device: torch.device, small: bool) -> int:
    quick = device.type != "cuda"
    cases = KD_CASES_SMALL if small or quick else KD_CASES
    rows, failures = [], []
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for case in cases:
            try:
                new = kd_errors(case, dtype, device)
            except Exception as exc:  # an error is a failed case; the others still run
                failures.append(f"{case[0]} {dtype}: {type(exc).__name__}: {exc}"[:200])
                print(f"# {failures[-1]}", flush=True)
                continue
            rows += record("kd_loss_correctness", new, device=device, quick=quick)
            failures += [f"{r['shape']} {r['dtype']} {r['metric']}: {r['median']:.3g} > {r['bound']:.3g}"
                         for r in new if not r["ok"]]
    _finish("kd-correctness", rows, failures=failures, ok=not failures)
    return 1 if failures else 0


# --------------------------------------------------------------------------------------- kernel resources


def compiled_kernels(module) -> list[dict]:
    """Registers, spills and shared memory of every kernel Triton compiled in this process for ``module``.

    Read from each ``@triton.jit`` function's device caches (Triton 3.x keeps its compiled
    kernels there, with ``n_regs`` / ``n_spills`` once loaded); empty under the interpreter.
    """
    out = []
    for attr in sorted(vars(module)):
        fn = getattr(module, attr)
        caches = getattr(fn, "device_caches", None)
        if not isinstance(caches, dict):
            continue
        for device_key, entry in caches.items():
            tables = [e for e in (entry if isinstance(entry, tuple) else (entry,)) if isinstance(e, dict)]
            for table in tables:
                for key, kernel in table.items():
                    if not hasattr(kernel, "metadata"):
                        continue
                    if getattr(kernel, "n_regs", None) is None and hasattr(kernel, "_init_handles"):
                        kernel._init_handles()
                    meta = kernel.metadata
                    constants = getattr(getattr(kernel, "src", None), "constants", None) or {}
                    names = getattr(fn, "arg_names", [])
                    # Triton 3.x keys constants by argument path ((index,)); name them.
                    constants = {(names[k[0]] if isinstance(k, tuple) and len(k) == 1 and k[0] < len(names) else k): v
                                 for k, v in dict(constants).items()}
                    out.append({
                        "name": attr, "registers": getattr(kernel, "n_regs", None),
                        "spills": getattr(kernel, "n_spills", None), "shared_bytes": getattr(meta, "shared", None),
                        "num_warps": getattr(meta, "num_warps", None), "num_stages": getattr(meta, "num_stages", None),
                        "constants": {str(k): (v if isinstance(v, (int, float, str, bool)) else str(v))
                                      for k, v in dict(constants).items()},
                        "key": str(key)[:400],
                    })
    return out


def _config_matches(static_config, real: dict, dtype: str | None = None) -> bool | None:
    """True/False where the static report's config can be compared with a compiled kernel; None if not.

    A dict config (benchmarks.kernel_report's: case, dtype, constexprs, num_warps, num_stages, ...) is
    compared on the constexprs, warps and stages it shares with the compiled kernel, and on the dtype;
    a string config on its ``KEY=VALUE`` tokens.
    """
    facts = {**{str(k): v for k, v in real["constants"].items()}, "num_warps": real["num_warps"],
             "num_stages": real["num_stages"]}
    if isinstance(static_config, dict):
        flat = {k: v for k, v in static_config.items() if not isinstance(v, (dict, list))}
        flat.update(static_config.get("constexprs") or {})
        if dtype is not None and "dtype" in flat and _short_dtype(flat["dtype"]) != _short_dtype(dtype):
            return False
        # Numbers only: a dtype constexpr prints differently in the report and in Triton's cache.
        common = [k for k in flat if k in facts and isinstance(flat[k], (int, float, bool))]
        if not any(k not in ("num_warps", "num_stages") for k in common):
            return None
        return all(str(flat[k]) == str(facts[k]) for k in common)
    if isinstance(static_config, str):
        tokens = [t for t in static_config.replace(",", " ").split() if "=" in t]
        pairs = [t.split("=", 1) for t in tokens if t.split("=", 1)[0] in facts]
        if not pairs:
            return None
        return all(str(facts[k]) == v for k, v in pairs)
    return None


def _short_dtype(name) -> str:
    name = str(name).replace("torch.", "")
    return {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "float64": "fp64"}.get(name, name)


def static_report(timeout_s: float) -> tuple[list[dict] | None, str]:
    """``python -m benchmarks.kernel_report``'s kernels (its last stdout line), or None and why not."""
    if importlib.util.find_spec("benchmarks.kernel_report") is None:
        return None, "benchmarks.kernel_report does not exist in this tree"
    if timeout_s <= 0:
        return None, "benchmarks.kernel_report not run (--report-timeout-s 0)"
    try:
        proc = subprocess.run([sys.executable, "-m", "benchmarks.kernel_report"], capture_output=True, text=True,
                              timeout=timeout_s, cwd=Path(__file__).resolve().parents[1])
    except subprocess.TimeoutExpired:
        return None, f"benchmarks.kernel_report ran past {timeout_s:.0f} s"
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    # A report that found problems (spills, atomics in loops) may exit non-zero after its JSON line:
    # its numbers are still the ones to compare.
    status = "ok" if proc.returncode == 0 else f"ok (kernel_report exited {proc.returncode})"
    try:
        return json.loads(lines[-1])["kernels"], status
    except (IndexError, ValueError, KeyError, TypeError) as exc:
        return None, (f"benchmarks.kernel_report gave no JSON last line (rc={proc.returncode}, {exc!r}): "
                      f"{proc.stderr.strip()[-300:]}")


def check_kernel_resources(device: torch.device, report_timeout_s: float) -> int:
    """Run kd_loss at the benchmark's GPU shapes (bf16, fwd + bwd), then compare the compiled kernels with the static report."""
    import importlib

    quick = device.type != "cuda"
    kd_module = importlib.import_module("clipdistill.kernels.kd_loss")
    from clipdistill.kernels import kd_loss

    shapes = [(4096, 21843, 768, 768, False, "kdpl"), (256, 1000, 768, 768, False, "promptkd")]
    if quick:
        shapes = [(8, 16, 32, 32, False, "kdpl")]
    dtype = torch.bfloat16 if not quick else torch.float32
    for batch, classes, ds, dt, separate, recipe in shapes:
        gen = torch.Generator().manual_seed(0)
        s = torch.randn(batch, ds, generator=gen).to(device, dtype).requires_grad_()
        t = torch.randn(batch, dt, generator=gen).to(device, dtype)
        c = torch.randn(classes, dt, generator=gen).to(device, dtype)
        options = (dict(forward_weight=1.0, reverse_weight=0.0, reduction="mean", temperature_squared=True)
                   if recipe == "promptkd" else {})
        torch.autograd.grad(kd_loss(s, t, c, logit_scale=LOGIT_SCALE, backend="triton", **options), [s])
    if device.type == "cuda":
        torch.cuda.synchronize()
    real = compiled_kernels(kd_module)
    static, why = static_report(report_timeout_s)
    rows = []
    for kernel in real:
        row = {"provider": "compiled", "shape": kernel["name"], "dtype": str(dtype).replace("torch.", ""),
               "metric": "registers", "median": kernel["registers"], "p20": kernel["registers"],
               "p80": kernel["registers"], "unit": "regs/thread", "spills": kernel["spills"],
               "shared_bytes": kernel["shared_bytes"], "num_warps": kernel["num_warps"],
               "num_stages": kernel["num_stages"], "constants": kernel["constants"], "static_report": why}
        if static is not None:
            same_name = [k for k in static if k.get("name") == kernel["name"]]
            matched = [k for k in same_name if _config_matches(k.get("config"), kernel, str(dtype)) is True]
            pick = matched[0] if matched else (same_name[0] if len(same_name) == 1 else None)
            if pick is not None:
                row.update(static_config=pick.get("config"), static_registers=pick.get("registers"),
                           static_spills=pick.get("spills"), static_shared_bytes=pick.get("shared_bytes"),
                           matched_on="name+config" if matched else "name only",
                           registers_equal=pick.get("registers") == kernel["registers"],
                           spills_equal=pick.get("spills") == kernel["spills"])
            else:
                row["matched_on"] = f"no static entry for this specialization ({len(same_name)} with this name)"
        rows += record("kernel_resources", [row], device=device, quick=quick)
    if not real:
        reason = "no compiled kernels (the Triton interpreter compiles none)" if quick else "no compiled kernels found"
        rows += record("kernel_resources", [{"provider": "compiled", "shape": "-", "dtype": "-", "metric": "registers",
                                             "median": None, "p20": None, "p80": None, "unit": "regs/thread",
                                             "status": "skipped", "reason": reason, "static_report": why}],
                       device=device, quick=quick)
    mismatches = [r["shape"] for r in rows if r.get("registers_equal") is False or r.get("spills_equal") is False]
    _finish("kernel-resources", rows, static_report=why, compiled=len(real), mismatches=mismatches)
    # Differences are findings, not failures: the static report may target another Triton version.
    return 0 if (real or quick) else 1


# --------------------------------------------------------------------------------------- JPEG decoding

MEAN = (0.48145466, 0.4578275, 0.40821073)  # CLIP's normalization, as the loaders use
STD = (0.26862954, 0.26130258, 0.27577711)


class _PILDecodeResize:
    """A map-style dataset: PIL decode, resize to ``size`` (bilinear), uint8 CHW; the published loaders' work."""

    def __init__(self, paths: list[str], size: int):
        self.paths, self.size = paths, size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        import numpy as np
        from PIL import Image

        with Image.open(self.paths[index]) as img:
            img = img.convert("RGB").resize((self.size, self.size), Image.BILINEAR)
            return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)


def _normalize(batch_uint8: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    mean = torch.tensor(MEAN, device=batch_uint8.device).view(1, 3, 1, 1) * 255
    std = torch.tensor(STD, device=batch_uint8.device).view(1, 3, 1, 1) * 255
    return ((batch_uint8.float() - mean) / std).to(dtype)


# Long on purpose: one device check that must run start to finish in a single capped call (make the
# photos, probe nvJPEG, time GPU decoding, time the PIL DataLoader, record); its parts share the
# photo list and the timing settings, and each is a few lines.
def check_nvjpeg(device: torch.device, n_images: int, batch: int, workers: int, repeats: int, data: Path) -> int:
    """torchvision.io.decode_jpeg(device="cuda") (nvJPEG), batched, against a PIL DataLoader."""
    import numpy as np
    import torch.nn.functional as F

    from benchmarks.bench_loader import PHOTO_SIZE, ensure_photos

    quick = device.type != "cuda"
    dtype = torch.bfloat16 if not quick else torch.float32
    started = time.perf_counter()
    photos = ensure_photos(data, n_images)
    paths = sorted(str(p) for p in photos.rglob("*.jpg"))[:n_images]
    print(f"data: {len(paths)} photos at {photos} ({time.perf_counter() - started:.1f} s)", flush=True)
    shape = f"{len(paths)}x{PHOTO_SIZE[0]}x{PHOTO_SIZE[1]}->224,B={batch}"
    rows: list[dict] = []
    ok = True

    # 1. Does it work here? Decode a few on the device and compare with PIL.
    status, reason = "ok", ""
    try:
        import torchvision
        from torchvision.io import decode_jpeg, read_file

        from PIL import Image

        sample = paths[:8]
        decoded = decode_jpeg([read_file(p) for p in sample], device=device.type)
        diffs = []
        for p, got in zip(sample, decoded):
            with Image.open(p) as img:
                want = torch.from_numpy(np.asarray(img.convert("RGB")).copy()).permute(2, 0, 1)
            diffs.append((got.cpu().float() - want.float()).abs().mean().item())
        mean_diff = float(np.mean(diffs))
        if mean_diff > 3.0:  # grey levels; nvJPEG's IDCT differs from libjpeg-turbo's in the last bits
            status, reason = "wrong", f"mean |nvJPEG - PIL| = {mean_diff:.2f} grey levels"
    except Exception as exc:
        status, reason, mean_diff = ("skipped" if quick else "error"), f"{type(exc).__name__}: {exc}"[:300], None
    rows += record("jpeg_decode", [{"provider": f"torchvision.io.decode_jpeg[{device.type}]", "shape": shape,
                                     "dtype": "uint8", "metric": "mean_abs_diff_vs_pil", "median": mean_diff,
                                     "p20": mean_diff, "p80": mean_diff, "unit": "grey levels", "status": status,
                                     "reason": reason,
                                     "torchvision": getattr(sys.modules.get("torchvision"), "__version__", None)}],
                   device=device, quick=quick)
    print(f"# decode_jpeg on {device.type}: {status} {reason}", flush=True)
    if status != "ok" and not quick:
        ok = False

    # 2. Images/s: nvJPEG decode (+ resize, normalize) in batches, files read inside the timing.
    if status == "ok":
        def gpu_epoch(resize: bool):
            def run():
                for i in range(0, len(paths) - batch + 1, batch):
                    images = decode_jpeg([read_file(p) for p in paths[i:i + batch]], device=device.type)
                    if resize:  # sizes differ (the generated photos jitter around 500x375): one at a time
                        x = torch.cat([F.interpolate(img[None].float(), size=(224, 224), mode="bilinear",
                                                     antialias=True) for img in images])
                        _normalize(x, dtype)
                if device.type == "cuda":
                    torch.cuda.synchronize()
            return run

        n_timed = (len(paths) // batch) * batch
        for resize, metric in ((False, "decode"), (True, "decode_resize_normalize")):
            stats = measure(gpu_epoch(resize), device="cpu", warmup=1, repeats=repeats)  # wall clock: host work counts
            rows += record("jpeg_decode", [{"provider": f"nvjpeg-batched[{device.type}]", "shape": shape,
                                             "dtype": str(dtype).replace("torch.", ""), "metric": f"{metric}_epoch_time",
                                             **stats, "images": n_timed, "batch": batch,
                                             "images_per_s": round(n_timed / (stats["median"] / 1e3), 1)}],
                           device=device, quick=quick)
            print_table(rows[-1:])

    # 3. The PIL DataLoader the published code uses: decode + resize in worker processes.
    loader = torch.utils.data.DataLoader(_PILDecodeResize(paths, 224), batch_size=batch, num_workers=workers,
                                         drop_last=True, persistent_workers=workers > 0,
                                         pin_memory=device.type == "cuda")

    def pil_epoch():
        for x in loader:
            _normalize(x.to(device, non_blocking=True), dtype)
        if device.type == "cuda":
            torch.cuda.synchronize()

    n_timed = (len(paths) // batch) * batch
    stats = measure(pil_epoch, device="cpu", warmup=1, repeats=repeats)
    rows += record("jpeg_decode", [{"provider": f"pil-dataloader[{workers} workers]", "shape": shape,
                                     "dtype": str(dtype).replace("torch.", ""),
                                     "metric": "decode_resize_normalize_epoch_time", **stats, "images": n_timed,
                                     "batch": batch, "workers": workers,
                                     "images_per_s": round(n_timed / (stats["median"] / 1e3), 1)}],
                   device=device, quick=quick)
    per_s = {r["provider"] + ":" + r["metric"]: r.get("images_per_s") for r in rows if r.get("images_per_s")}
    _finish("nvjpeg", rows, decode_jpeg=status, reason=reason, images_per_s=per_s)
    return 0 if ok else 1


# --------------------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: the suite's dry run")
    sub = parser.add_subparsers(dest="check", required=True)
    env = sub.add_parser("env", help="nvidia-smi, versions, device facts, what imports")
    env.add_argument("--imports", nargs="*", default=list(ENV_IMPORTS), help="modules to try importing")
    ceilings = sub.add_parser("ceilings", help="bf16 GEMM TFLOP/s and copy GB/s")
    ceilings.add_argument("--size", type=int, default=8192)
    ceilings.add_argument("--copy-mib", type=int, default=1024)
    kd = sub.add_parser("kd-correctness", help="kd_loss in bf16/fp16/fp32 against float64")
    kd.add_argument("--small", action="store_true", help="tiny shapes only")
    resources = sub.add_parser("kernel-resources", help="compiled kd_loss kernels vs benchmarks.kernel_report")
    resources.add_argument("--report-timeout-s", type=float, default=60.0,
                           help="limit for python -m benchmarks.kernel_report (0: do not run it)")
    jpeg = sub.add_parser("nvjpeg", help="torchvision's nvJPEG decode vs a PIL DataLoader")
    jpeg.add_argument("--images", type=int, default=1024)
    jpeg.add_argument("--batch", type=int, default=256)
    jpeg.add_argument("--workers", type=int, default=16)
    jpeg.add_argument("--repeats", type=int, default=3)
    jpeg.add_argument("--data", type=Path, default=None, help="folder for generated photos (bench_loader's default)")
    args = parser.parse_args(argv)

    device = _device(args.device)
    if args.check == "env":
        return check_env(device, tuple(args.imports))
    if args.check == "ceilings":
        return check_ceilings(device, args.size, args.copy_mib)
    if args.check == "kd-correctness":
        return check_kd_correctness(device, args.small)
    if args.check == "kernel-resources":
        return check_kernel_resources(device, args.report_timeout_s)
    from benchmarks.bench_loader import default_data_dir

    return check_nvjpeg(device, args.images, args.batch, args.workers, args.repeats, args.data or default_data_dir())


if __name__ == "__main__":
    raise SystemExit(main())
