"""Static report of the kd_loss kernels compiled for Hopper (sm_90a), on a machine without a GPU.

    python -m benchmarks.kernel_report [--cases NAME ...] [--dtypes bf16 fp16 fp32] [--jobs N]

A GPU kernel's speed is read from its compiled form before any timing. This report runs the
real launchers of ``clipdistill.kernels.kd_loss`` on meta tensors (no data, no device) with the
SM count of an H100/H200 (132), captures every kernel launch they make (kernel, constexprs,
``num_warps``, ``num_stages`` and the integer arguments), specializes the arguments as Triton's
runtime would (an integer divisible by 16 gets ``tt.divisibility = 16``, the integer 1 becomes a
constant, 16-byte-aligned pointers are marked aligned), compiles each distinct launch with
``triton.compile(..., target=GPUTarget("cuda", 90, 32))`` and reads the result:

- registers, stack frame and spills (``STL``/``LDL`` instructions: local-memory traffic, which
  in these kernels only register spills produce) from ``cuobjdump``;
- shared memory from the kernel's metadata;
- the ``wgmma`` shapes in the PTX and where their A operand comes from (shared memory or
  registers);
- every global atomic in the SASS, its form (e.g. ``ATOMG.E.ADD.F32x4.FTZ.RN.STRONG.GPU``) and
  how many sit inside a loop (a backward branch's range), and ``MEMBAR`` instructions.

Compilation runs in a subprocess with ``TRITON_INTERPRET`` unset (tests and the benchmarks
package set it on a CPU machine, and the interpreter cannot compile). The cases cover the
divisible-by-16 ("aligned") and the unaligned integer specializations, shared and separate
class vectors, bf16, fp16 and fp32, plus the benchmark's large-vocabulary shape.

Prints a table, then, last, one line of JSON:
``{"kernels": [{"name", "config", "registers", "spills", "shared_bytes", "wgmma_shapes",
"gpu_scope_atomics_in_loops", ...}, ...]}``.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import NamedTuple, Optional

SM_COUNT = 132  # H100 SXM / H200
TARGET_ARCH = 90
WORKER_FLAG = "--worker"


class Case(NamedTuple):
    name: str
    batch: int
    n_classes: int
    d_student: int
    d_teacher: int
    separate: bool  # separate student class vectors, which take a gradient

    def label(self) -> str:
        return (f"{self.name}:B={self.batch},C={self.n_classes},Ds={self.d_student},"
                f"Dt={self.d_teacher}," + ("separate" if self.separate else "shared"))


# Every integer (batch, classes, dims, strides) divisible by 16, or none of the shape's.
CASES = (
    Case("aligned", 256, 1024, 512, 512, False),
    Case("aligned", 256, 1024, 512, 1024, True),
    Case("unaligned", 37, 997, 200, 200, False),
    Case("unaligned", 37, 997, 200, 264, True),
)
LARGE_VOCAB = Case("large_vocab", 4096, 21843, 768, 768, False)  # bench_kd_loss's target shape
DTYPES = ("bf16", "fp16", "fp32")


# ---------------------------------------------------------------------------------------------
# Parent: run the worker in a subprocess, print the table and the JSON line
# ---------------------------------------------------------------------------------------------


def run_worker(argv: list[str], timeout: float = 900.0) -> dict:
    """Run the compiling worker with TRITON_INTERPRET unset; return its parsed JSON."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, str(Path(__file__).resolve()), WORKER_FLAG, *argv]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"kernel report worker failed (exit {proc.returncode}):\n"
                           f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1])


def format_table(report: dict) -> str:
    header = ("kernel", "case", "dtype", "blocks (M,N,K) w/s", "spec", "regs", "spills",
              "smem", "wgmma (A from)", "atomics (in loops)")
    rows = []
    for k in report["kernels"]:
        cfg = k["config"]
        blocks = cfg["constexprs"]
        mnk = ",".join(str(blocks[b]) for b in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK_D")
                       if b in blocks)
        wgmma = " ".join(f"{s}({a})" for s, a in zip(k["wgmma_shapes"], k["wgmma_a_operand"])) \
            or "-"
        atomics = " ".join(f"{form}x{c['total']}({c['in_loops']})"
                           for form, c in k["atomics"].items()) or "-"
        rows.append((k["name"].replace("_kd_loss_", "").replace("_kernel", ""), cfg["case"],
                     cfg["dtype"], f"{mnk} {cfg['num_warps']}/{cfg['num_stages']}",
                     cfg["specialization"], str(k["registers"]), str(k["spills"]),
                     str(k["shared_bytes"]), wgmma, atomics))
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(header)]
    out = ["  ".join(h.ljust(w) for h, w in zip(header, widths)),
           "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(out)


def problems(report: dict) -> list[str]:
    """What the CPU tier fails on: spills, and GPU-scope atomics inside a loop."""
    found = []
    for k in report["kernels"]:
        where = f"{k['name']} [{k['config']['case']} {k['config']['dtype']} " \
                f"{k['config']['specialization']}]"
        if k["spills"]:
            found.append(f"{where}: {k['spills']} spill instructions "
                         f"({k['stack_bytes']} bytes of stack)")
        if k["gpu_scope_atomics_in_loops"]:
            found.append(f"{where}: {k['gpu_scope_atomics_in_loops']} GPU-scope atomics in loops")
    return found


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="*", default=None,
                        help="case names (aligned, unaligned, large_vocab); default all")
    parser.add_argument("--dtypes", nargs="*", default=None, choices=DTYPES)
    parser.add_argument("--jobs", type=int, default=None,
                        help="parallel compilations (default: CPU count, at most 4)")
    args = parser.parse_args(argv)
    worker_args = []
    if args.cases:
        worker_args += ["--cases", *args.cases]
    if args.dtypes:
        worker_args += ["--dtypes", *args.dtypes]
    if args.jobs:
        worker_args += ["--jobs", str(args.jobs)]
    report = run_worker(worker_args)
    print(f"# kd_loss kernels compiled for sm_{TARGET_ARCH}a with Triton {report['triton']} "
          f"(no GPU; SM count {SM_COUNT} for the launch configurations)")
    print(format_table(report))
    for line in problems(report):
        print(f"# PROBLEM: {line}")
    print(json.dumps({"kernels": report["kernels"]}), flush=True)
    return 0


# ---------------------------------------------------------------------------------------------
# Worker: capture the launches, compile, analyze (TRITON_INTERPRET unset)
# ---------------------------------------------------------------------------------------------


_TORCH_TO_TRITON = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "float64": "fp64"}


def _specialize(value):
    """(signature type, divisible by 16) as Triton's runtime specializes a launch argument."""
    import torch
    if isinstance(value, torch.Tensor):
        aligned = (value.storage_offset() * value.element_size()) % 16 == 0
        return "*" + _TORCH_TO_TRITON[str(value.dtype).split(".")[-1]], aligned
    if isinstance(value, bool):
        return "u1", False
    if isinstance(value, int):
        if value == 1:
            return "constexpr", False
        return ("i32" if -2**31 <= value < 2**31 else "i64"), value % 16 == 0
    if isinstance(value, float):
        return "fp32", False
    if value is None:
        return "constexpr", False
    raise TypeError(f"cannot specialize a launch argument of type {type(value).__name__}")


def _capture_launches(case: Case, dtype_name: str) -> list[dict]:
    """Run the real forward and backward launchers on meta tensors; return their launches."""
    import importlib

    import torch
    import triton

    kd = importlib.import_module("clipdistill.kernels.kd_loss")

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype_name]
    launches: list[dict] = []

    class _Capture:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launches.append(dict(kernel=self.kernel, grid=grid, args=args, kwargs=kwargs))
            return launch

    kernels = {name: obj for name, obj in vars(kd).items()
               if isinstance(obj, triton.runtime.jit.JITFunction) and name.endswith("_kernel")}
    saved_sm_count = kd._sm_count
    try:
        for name, kernel in kernels.items():
            setattr(kd, name, _Capture(kernel))
        kd._sm_count = lambda device: SM_COUNT
        meta = dict(device="meta", dtype=dtype)
        student = torch.empty(case.batch, case.d_student, **meta)
        teacher = torch.empty(case.batch, case.d_teacher, **meta)
        vectors = torch.empty(case.n_classes, case.d_teacher, **meta)
        student_vectors = (torch.empty(case.n_classes, case.d_student, **meta)
                           if case.separate else None)
        scales = dict(student_scale=100.0, teacher_scale=100.0, forward_weight=0.5,
                      reverse_weight=0.5, normalize=True)
        row_loss, row_stats, row_inv, col_inv = kd._kd_loss_rows_forward(
            student, teacher, vectors, student_vectors, *scales.values())
        kd._kd_loss_rows_backward(torch.empty_like(row_loss), student, teacher, vectors,
                                  student_vectors, row_stats, row_inv, col_inv,
                                  *scales.values(), case.separate,
                                  kd.DEFAULT_BACKWARD_MEMORY_BUDGET)
    finally:
        for name, kernel in kernels.items():
            setattr(kd, name, kernel)
        kd._sm_count = saved_sm_count
    return launches


def _compile_spec(launch: dict) -> dict:
    kernel, args, kwargs = launch["kernel"], launch["args"], dict(launch["kwargs"])
    names = list(kernel.arg_names)
    options = {k: kwargs.pop(k) for k in list(kwargs) if k not in names}
    bound = dict(zip(names, args))
    bound.update(kwargs)
    signature, constexprs, attrs, divisible, not_divisible = {}, {}, {}, [], []
    for index, (name, param) in enumerate(zip(names, kernel.params)):
        value = bound[name]
        if param.is_constexpr:
            signature[name] = "constexpr"
            constexprs[name] = value
            continue
        kind, aligned = _specialize(value)
        signature[name] = kind
        if kind == "constexpr":
            constexprs[name] = value
        elif aligned:
            attrs[(index,)] = [["tt.divisibility", 16]]
        if kind in ("i32", "i64"):
            (divisible if aligned else not_divisible).append(name)
    return dict(kernel=kernel, signature=signature, constexprs=constexprs, attrs=attrs,
                options=options, divisible=divisible, not_divisible=not_divisible)


def _spec_key(spec: dict) -> str:
    return repr((spec["kernel"].__name__, sorted(spec["signature"].items()),
                 sorted((k, str(v)) for k, v in spec["constexprs"].items()),
                 sorted(spec["attrs"].items()), sorted(spec["options"].items())))


def _tool(name: str) -> str:
    import triton
    try:
        from triton import knobs
        path = getattr(knobs.nvidia, name).path
        if path:
            return path
    except (ImportError, AttributeError):
        pass
    import triton.backends.nvidia as nvidia
    return str(Path(nvidia.__file__).parent / "bin" / name)


_INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_LABEL = re.compile(r"^\s*(\.L_x_\d+):")
_BRANCH = re.compile(r"\bBRA\b\s+(?:`\((\.L_x_\d+)\)|0x([0-9a-f]+))")
_GLOBAL_ATOMIC = re.compile(r"^(?:@!?U?P\w+\s+)?((?:ATOMG|REDG|RED|ATOM)(?:\.[\w]+)*)\b")
_MEMBAR = re.compile(r"^(?:@!?U?P\w+\s+)?(MEMBAR(?:\.[\w]+)*)")
_WGMMA = re.compile(r"wgmma\.mma_async\.sync\.aligned\.(m\d+n\d+k\d+)\.(\w+)\.(\w+)\.(\w+)\s*"
                    r"\{[^}]*\}\s*,\s*(\{)?")


def analyze_sass(sass: str) -> dict:
    """Atomic and MEMBAR forms, total and inside loops (ranges of backward branches)."""
    instructions, labels, pending = [], {}, []
    for line in sass.splitlines():
        label = _LABEL.match(line)
        if label:
            pending.append(label.group(1))
            continue
        match = _INSTRUCTION.search(line)
        if match:
            address = int(match.group(1), 16)
            for name in pending:
                labels[name] = address
            pending = []
            instructions.append((address, match.group(2)))
    loops = []
    for address, text in instructions:
        branch = _BRANCH.search(text)
        if not branch:
            continue
        target = labels.get(branch.group(1)) if branch.group(1) else int(branch.group(2), 16)
        if target is not None and target < address:  # (target == address: the final trap)
            loops.append((target, address))
    in_loop = lambda a: any(lo <= a <= hi for lo, hi in loops)  # noqa: E731
    atomics: dict = {}
    membars: dict = {}
    spills = 0
    for address, text in instructions:
        opcode = text.split()[0] if not text.startswith("@") else text.split()[1]
        if opcode.startswith(("STL", "LDL")):
            spills += 1
        for pattern, table in ((_GLOBAL_ATOMIC, atomics), (_MEMBAR, membars)):
            match = pattern.match(text)
            if match:
                entry = table.setdefault(match.group(1), {"total": 0, "in_loops": 0})
                entry["total"] += 1
                entry["in_loops"] += int(in_loop(address))
    # A global atomic is GPU-scoped unless SASS says otherwise (.CTA / .SM scope).
    gpu_in_loops = sum(c["in_loops"] for form, c in atomics.items()
                       if ".CTA" not in form and ".SM" not in form)
    return dict(atomics=atomics, membars=membars, spills=spills, loops=len(loops),
                gpu_scope_atomics_in_loops=gpu_in_loops)


def analyze_ptx(ptx: str) -> tuple[list[str], list[str]]:
    """Distinct wgmma shapes (with operand types) and where each takes its A operand from."""
    seen = {}
    for match in _WGMMA.finditer(ptx):
        shape = f"{match.group(1)}.{match.group(3)}"
        seen.setdefault(shape, "regs" if match.group(5) else "smem")
    return list(seen), [seen[s] for s in seen]


def _resource_usage(cubin_path: str) -> dict:
    out = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", cubin_path],
                         capture_output=True, text=True, check=True).stdout
    fields = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", out))
    return {k: int(v) for k, v in fields.items()}


def _compile_and_analyze(spec: dict) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget

    src = triton.compiler.ASTSource(fn=spec["kernel"], signature=spec["signature"],
                                    constexprs=spec["constexprs"], attrs=spec["attrs"])
    compiled = triton.compile(src, target=GPUTarget("cuda", TARGET_ARCH, 32),
                              options=spec["options"])
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "kernel.cubin")
        with open(cubin, "wb") as f:
            f.write(compiled.asm["cubin"])
        usage = _resource_usage(cubin)
        sass = subprocess.run([_tool("cuobjdump"), "-sass", cubin], capture_output=True,
                              text=True, check=True).stdout
    code = analyze_sass(sass)
    shapes, a_operand = analyze_ptx(compiled.asm["ptx"])
    return dict(registers=usage.get("REG", -1), stack_bytes=usage.get("STACK", 0),
                spills=code["spills"], shared_bytes=int(compiled.metadata.shared),
                wgmma_shapes=shapes, wgmma_a_operand=a_operand,
                gpu_scope_atomics_in_loops=code["gpu_scope_atomics_in_loops"],
                atomics=code["atomics"], membars=code["membars"])


_SPECS: list = []  # inherited by forked pool workers


def _compile_index(index: int) -> dict:
    try:
        return _compile_and_analyze(_SPECS[index])
    except Exception as exc:  # one failing kernel is itself a finding; keep the others
        return dict(error=f"{type(exc).__name__}: {str(exc)[-2000:]}")


def _constexpr_json(value):
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    return str(value)


def worker(argv: list[str]) -> int:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("the kernel report compiles for a GPU: run it with TRITON_INTERPRET "
                         "unset (python -m benchmarks.kernel_report does that)")
    parser = argparse.ArgumentParser()
    parser.add_argument(WORKER_FLAG, action="store_true")
    parser.add_argument("--cases", nargs="*", default=None)
    parser.add_argument("--dtypes", nargs="*", default=list(DTYPES))
    parser.add_argument("--jobs", type=int, default=None)
    args = parser.parse_args(argv)
    import triton

    plan = [(case, dtype) for case in CASES for dtype in args.dtypes]
    plan.append((LARGE_VOCAB, "bf16"))
    if args.cases:
        plan = [(c, d) for c, d in plan if c.name in args.cases]
    rows, unique = [], {}
    for case, dtype in plan:
        for launch in _capture_launches(case, dtype):
            spec = _compile_spec(launch)
            key = _spec_key(spec)
            if key not in unique:
                unique[key] = len(_SPECS)
                _SPECS.append(spec)
            # "aligned": every integer argument divisible by 16 (ints_divisible_by_16 lists
            # which are in an unaligned launch).
            specialization = "unaligned" if spec["not_divisible"] else "aligned"
            config = dict(case=case.label(), dtype=dtype, specialization=specialization,
                          grid=[int(g) for g in launch["grid"]],
                          constexprs={k: _constexpr_json(v)
                                      for k, v in spec["constexprs"].items()},
                          num_warps=spec["options"].get("num_warps", 4),
                          num_stages=spec["options"].get("num_stages", 3),
                          ints_divisible_by_16=spec["divisible"])
            rows.append((spec["kernel"].__name__, config, unique[key]))
    jobs = args.jobs or min(4, os.cpu_count() or 1)
    if jobs > 1 and len(_SPECS) > 1:
        import multiprocessing
        with multiprocessing.get_context("fork").Pool(jobs) as pool:
            results = pool.map(_compile_index, range(len(_SPECS)), chunksize=1)
    else:
        results = [_compile_index(i) for i in range(len(_SPECS))]
    kernels, seen = [], set()
    for name, config, index in rows:
        key = (name, json.dumps(dict(config, grid=None), sort_keys=True))
        if key in seen:  # e.g. the inverse-norm kernel launched for several inputs alike
            continue
        seen.add(key)
        result = results[index]
        if "error" in result:
            raise SystemExit(f"compiling {name} ({config}) failed: {result['error']}")
        kernels.append(dict(name=name, config=config, **result))
    print(json.dumps({"triton": triton.__version__, "kernels": kernels}), flush=True)
    return 0


if __name__ == "__main__":
    if WORKER_FLAG in sys.argv[1:]:
        raise SystemExit(worker(sys.argv[1:]))
    raise SystemExit(main())
