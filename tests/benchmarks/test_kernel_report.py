"""benchmarks.kernel_report: the kd_loss kernels compiled for sm_90a on this CPU, read statically.

The report runs as CI runs it (``python -m benchmarks.kernel_report`` from the repository root,
which compiles in a subprocess with TRITON_INTERPRET unset) and the test fails on register
spills or on a GPU-scope atomic inside a loop, for the divisible-by-16 and the unaligned integer
specializations. The SASS parser is also checked on a hand-written listing.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

from benchmarks import kernel_report  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[2]
FIELDS = ("name", "config", "registers", "spills", "shared_bytes", "wgmma_shapes",
          "gpu_scope_atomics_in_loops")


@pytest.fixture(scope="module")
def report() -> dict:
    proc = subprocess.run([sys.executable, "-m", "benchmarks.kernel_report"], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[0].startswith("# kd_loss kernels compiled for sm_90a")
    return json.loads(lines[-1])


def test_last_line_is_the_documented_json(report):
    assert set(report) == {"kernels"}
    assert report["kernels"]
    for kernel in report["kernels"]:
        assert set(FIELDS) <= set(kernel), kernel["name"]
        assert kernel["name"].startswith("_kd_loss_") and kernel["name"].endswith("_kernel")
        assert 0 < kernel["registers"] <= 255


def test_every_kernel_in_both_specializations(report):
    seen = {}
    for kernel in report["kernels"]:
        seen.setdefault(kernel["name"], set()).add(kernel["config"]["specialization"])
    assert "_kd_loss_fwd_kernel" in seen
    for name, specializations in seen.items():
        assert {"aligned", "unaligned"} <= specializations, (name, specializations)


def test_no_register_spills(report):
    spilled = [(k["name"], k["config"]["case"], k["config"]["dtype"], k["spills"])
               for k in report["kernels"] if k["spills"]]
    assert not spilled


def test_no_gpu_scope_atomics_in_loops(report):
    found = [(k["name"], k["config"]["case"], k["config"]["dtype"], k["atomics"])
             for k in report["kernels"] if k["gpu_scope_atomics_in_loops"]]
    assert not found


SASS = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   ATOMG.E.ADD.F32.FTZ.RN.STRONG.GPU PT, RZ, desc[UR4][R2.64], R5 ;
        /*0020*/                   MEMBAR.ALL.GPU ;
        /*0030*/                   REDG.E.ADD.F32x4.FTZ.RN.STRONG.GPU desc[UR4][R2.64], R8 ;
        /*0040*/              @!P0 BRA 0x20 ;
        /*0050*/                   STL [R1], R9 ;
        /*0060*/                   REDG.E.ADD.F32.FTZ.RN.STRONG.GPU desc[UR4][R2.64], R8 ;
        /*0070*/                   EXIT ;
        /*0080*/                   BRA 0x80;
"""


def test_sass_parser_finds_atomics_in_loops():
    code = kernel_report.analyze_sass(SASS)
    assert code["loops"] == 1  # the trap at the end branches to itself: not a loop
    assert code["atomics"]["REDG.E.ADD.F32x4.FTZ.RN.STRONG.GPU"] == {"total": 1, "in_loops": 1}
    assert code["atomics"]["ATOMG.E.ADD.F32.FTZ.RN.STRONG.GPU"] == {"total": 1, "in_loops": 0}
    assert code["atomics"]["REDG.E.ADD.F32.FTZ.RN.STRONG.GPU"] == {"total": 1, "in_loops": 0}
    assert code["membars"]["MEMBAR.ALL.GPU"] == {"total": 1, "in_loops": 1}
    assert code["gpu_scope_atomics_in_loops"] == 1
    assert code["spills"] == 1


def test_ptx_parser_reads_wgmma_shapes_and_operands():
    ptx = ("wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%f1, %f2}, %rd1, %rd2, 1;\n"
           "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 {%f1, %f2}, {%r1, %r2}, %rd2;\n")
    shapes, operands = kernel_report.analyze_ptx(ptx)
    assert shapes == ["m64n128k16.bf16", "m64n64k16.f16"]
    assert operands == ["smem", "regs"]


def test_wide_wgmma_in_half_precision_logit_sweeps(report):
    """fp16/bf16 forward and backward sweeps issue wgmma with N >= 64 (m64n32 caps the tensor
    cores at about half their peak with both operands from shared memory)."""
    narrow = []
    for kernel in report["kernels"]:
        if kernel["config"]["dtype"] not in ("bf16", "fp16") or \
                kernel["name"] not in ("_kd_loss_fwd_kernel", "_kd_loss_bwd_kernel"):
            continue
        assert kernel["wgmma_shapes"], kernel["name"]
        for shape in kernel["wgmma_shapes"]:
            n = int(shape.split("n")[1].split("k")[0])
            if n < 64:
                narrow.append((kernel["name"], kernel["config"]["case"], shape))
    assert not narrow
