"""The GPU suite on the CPU: its dry run, its caps and outputs, SIGTERM, and the carried wheels.

The dry run is the real command (``benchmarks/gpu_suite.py --phase core --dry-run``): every
step at CPU size in its own process, with the GPU arguments parsed by each step's own parser,
the carries measured and ``$OUT`` counted. Nothing here needs a GPU.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import pytest

from benchmarks import gpu_checks, gpu_suite, gpu_wheels

REPO_ROOT = Path(__file__).resolve().parents[2]
SUITE = [sys.executable, str(REPO_ROOT / "benchmarks" / "gpu_suite.py")]


def _env() -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1", TRITON_INTERPRET="1")
    env.pop("OUT", None)
    return env


# ------------------------------------------------------------------------------------------- caps and the dry run


@pytest.mark.parametrize("phase", sorted(gpu_suite.PHASES))
def test_caps_fit_the_phase_budget_and_its_timeout(phase):
    steps = gpu_suite.PHASES[phase]({"data_dir": "/tmp/x", "deepspeed_modes": None, "deepspeed_args": []})
    total = sum(s.cap_s for s in steps)
    assert total <= gpu_suite.PHASE_BUDGET_S[phase] + 1e-6
    assert gpu_suite.PHASE_BUDGET_S[phase] + 30 <= gpu_suite.PHASE_TIMEOUT_S[phase] <= 600
    if phase == "core":
        assert total <= 510
        names = [s.name for s in steps]
        # The priority order: install, versions, ceilings, kd_loss, e2e, nvJPEG, then the tests.
        assert names.index("install") < names.index("ceilings") < names.index("kd-correctness") \
            < names.index("kd-bench-large-vocab") < names.index("e2e") < names.index("nvjpeg") < names.index("pytest-gpu")
        assert steps[-1].leftover
        from benchmarks.bench_kd_loss import PROVIDERS

        assert sorted(gpu_suite.KD_PROVIDERS) == sorted(PROVIDERS)
        # torch.compile last (its compile time cannot starve the others), the bf16 baseline first of the two.
        assert gpu_suite.KD_PROVIDERS[-2:] == ["compiled", "compiled_fp32"]


def test_plan_prints_the_cap_table(capsys):
    assert gpu_suite.main(["--phase", "core", "--plan"]) == 0
    table = capsys.readouterr().out
    assert "total" in table and "510" in table and "timeout 540" in table and "kd-bench-large-vocab" in table


# The default tier runs these steps of the dry run (each a process that imports torch, a few seconds
# apiece on 2 cores); every step's GPU arguments are parsed all the same. .ci/run runs the whole dry run.
DRY_RUN_STEPS = ("ceilings", "kd-correctness", "kd-bench-promptkd", "nvjpeg")


@pytest.fixture(scope="module")
def core_dry_run(tmp_path_factory):
    """One real dry run of the core phase, on DRY_RUN_STEPS (and the install step)."""
    out = tmp_path_factory.mktemp("out")
    started = time.time()
    proc = subprocess.run([*SUITE, "--phase", "core", "--dry-run", "--out", str(out), "--only", *DRY_RUN_STEPS],
                          cwd=REPO_ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    return proc, out, time.time() - started


def test_core_dry_run_passes_with_three_files_back(core_dry_run):
    proc, out, seconds = core_dry_run
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    last = json.loads(proc.stdout.strip().splitlines()[-1])
    assert last["suite"] == "gpu_suite" and last["dry_run"] and last["failed"] == []
    assert sorted(p.name for p in out.iterdir()) == ["results.tar.gz", "suite.log", "summary.json"]
    assert len(list(out.rglob("*"))) <= gpu_suite.MAX_OUT_FILES
    # The steps' table comes last, before the JSON line.
    assert proc.stdout.strip().splitlines()[-2].startswith(DRY_RUN_STEPS[-1])


def test_core_dry_run_checks_carries_arguments_and_out(core_dry_run):
    proc, out, _ = core_dry_run
    summary = json.loads((out / "summary.json").read_text())
    checks = {c["check"]: c for c in summary["checks"]}
    assert all(c["ok"] for c in summary["checks"]), summary["checks"]
    assert checks["tree"]["mib"] < 64 and "carry .whl" in checks
    assert checks["$OUT files"]["detail"].startswith("3 files")
    parsed = [name for name in checks if name.startswith("parse ")]
    # Every subprocess step's GPU arguments were parsed, e2e's included although it did not run.
    steps = gpu_suite.core_steps({"data_dir": "x"})
    assert len(parsed) == sum(1 for s in steps if s.parse_module)
    assert any("bench_e2e" in name or "engine.cli" in name for name in parsed)
    statuses = {s["step"]: s["status"] for s in summary["steps"]}
    assert set(statuses) == {"install", *DRY_RUN_STEPS} and all(v == "ok" for v in statuses.values()), statuses


def test_core_dry_run_results_hold_every_steps_rows(core_dry_run):
    _, out, _ = core_dry_run
    with tarfile.open(out / "results.tar.gz") as tar:
        names = set(tar.getnames())
        rows = {n: tar.extractfile(n).read().decode().splitlines() for n in names if n.endswith(".jsonl")}
    for bench in ("device_ceilings", "kd_loss_correctness", "kd_loss", "jpeg_decode"):
        assert rows.get(f"results/{bench}.jsonl"), (bench, sorted(names))
    assert "summary.json" in names and {f"logs/{s}.log" for s in DRY_RUN_STEPS} <= names
    correctness = [json.loads(r) for r in rows["results/kd_loss_correctness.jsonl"]]
    assert {r["dtype"] for r in correctness} == {"bfloat16", "float16", "float32"} and all(r["ok"] for r in correctness)
    assert all(json.loads(r)["quick"] for r in rows["results/device_ceilings.jsonl"])


def test_import_results_appends_gpu_rows_and_refuses_a_dry_run(core_dry_run, tmp_path):
    _, out, _ = core_dry_run
    with pytest.raises(ValueError, match="dry run"):
        gpu_suite.import_results(out / "results.tar.gz", tmp_path)
    # A GPU run's tarball: one real row and one quick row.
    work = tmp_path / "run"
    (work / "results").mkdir(parents=True)
    rows = [{"benchmark": "kd_loss", "provider": "ours", "quick": False, "device": "NVIDIA H200"},
            {"benchmark": "kd_loss", "provider": "ours", "quick": True}]
    (work / "results" / "kd_loss.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (work / "summary.json").write_text(json.dumps({"phase": "core", "dry_run": False, "date": "2026-12-01T10:00:00Z"}))
    with tarfile.open(tmp_path / "r.tar.gz", "w:gz") as tar:
        tar.add(work / "results", arcname="results")
        tar.add(work / "summary.json", arcname="summary.json")
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "kd_loss.jsonl").write_text('{"old": 1}\n')
    report = gpu_suite.import_results(tmp_path / "r.tar.gz", dest)
    assert report["rows_added"] == {"kd_loss.jsonl": 1}
    assert len((dest / "kd_loss.jsonl").read_text().splitlines()) == 2
    assert (dest / "gpu_suite" / "20261201T100000Z_core.json").is_file()


def test_sigterm_stops_the_step_kills_its_group_and_packs(tmp_path):
    out, data = tmp_path / "out", tmp_path / "data"
    proc = subprocess.Popen([*SUITE, "--phase", "core", "--dry-run", "--out", str(out), "--only", "nvjpeg",
                             "--data", str(data)], cwd=REPO_ROOT, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    log = out / "suite.log"
    deadline = time.time() + 120
    while time.time() < deadline and not (log.exists() and "=== nvjpeg" in log.read_text()):
        time.sleep(0.2)
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    stdout, _ = proc.communicate(timeout=60)
    assert proc.returncode == 1, stdout[-3000:]
    last = json.loads(stdout.strip().splitlines()[-1])
    assert last["interrupted"] is True
    summary = json.loads((out / "summary.json").read_text())
    assert [s["status"] for s in summary["steps"] if s["step"] == "nvjpeg"] == ["terminated"]
    with tarfile.open(out / "results.tar.gz") as tar:
        assert "logs/nvjpeg.log" in tar.getnames()
    # The step's whole process group is gone (its DataLoader workers too).
    time.sleep(0.5)
    left = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if str(data).encode() in cmdline.read_bytes():
                left.append(cmdline.parent.name)
        except OSError:  # the process ended meanwhile
            pass
    assert left == [], left


# ------------------------------------------------------------------------------------------- carried wheels


def _fake_wheel(path: Path, name: str, requires: list[str], payload: bytes = b"") -> Path:
    wheel = path / f"{name}-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(f"{name}-1.0.dist-info/METADATA",
                    "Metadata-Version: 2.1\nName: " + name + "\nVersion: 1.0\n"
                    + "".join(f"Requires-Dist: {r}\n" for r in requires))
        zf.writestr(f"{name}/blob.bin", payload)
    return wheel


def test_split_deals_parts_within_budget_and_join_restores_them(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    wheels = [_fake_wheel(src, f"pkg{i}", [], os.urandom(n)) for i, n in enumerate((5_000_000, 300_000, 2_200_000))]
    budget = 2 * gpu_wheels.MIB
    folders = gpu_wheels.split_wheels(wheels, tmp_path, folder_budget_bytes=budget, prefix=".dali")
    assert [f.name for f in folders] == [f".dali{i + 1}" for i in range(len(folders))]
    assert all(gpu_wheels.folder_bytes(f) <= budget for f in folders)
    assert all((f / gpu_wheels.MANIFEST).is_file() for f in folders)
    joined = gpu_wheels.join_split_wheels(folders[::-1], tmp_path / "joined")
    assert sorted(p.read_bytes() for p in joined) == sorted(w.read_bytes() for w in wheels)


def test_join_names_a_missing_or_broken_part(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    wheel = _fake_wheel(src, "big", [], os.urandom(3_000_000))
    folders = gpu_wheels.split_wheels([wheel], tmp_path, folder_budget_bytes=gpu_wheels.MIB + 200_000)
    assert len(folders) >= 3
    with pytest.raises(ValueError, match=rf"parts missing: .*\(carry {folders[1].name}\)"):
        gpu_wheels.join_split_wheels([folders[0], folders[2]], tmp_path / "j1")
    part = next(folders[1].glob("*.part*"))
    data = bytearray(part.read_bytes())
    data[10] ^= 0xFF
    part.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum differs"):
        gpu_wheels.join_split_wheels(folders, tmp_path / "j2")
    with pytest.raises(ValueError, match="MANIFEST.json"):
        gpu_wheels.join_split_wheels([tmp_path / "src"], tmp_path / "j3")


def test_unmet_requirements_follow_markers_and_extras(tmp_path):
    a = _fake_wheel(tmp_path, "alpha", ["beta[fast]>=1", "numpy", 'winonly; sys_platform == "win32"', "gamma; extra == 'x'"])
    b = _fake_wheel(tmp_path, "beta", ['delta; extra == "fast"', 'epsilon; extra == "slow"'])
    assert gpu_wheels.unmet_requirements([a, b], {"numpy"}) == ["beta needs delta; extra == \"fast\""]
    d = _fake_wheel(tmp_path, "delta", [])
    assert gpu_wheels.unmet_requirements([a, b, d], {"numpy"}) == []
    assert gpu_wheels.unmet_requirements([a, b, d], set()) == ["alpha needs numpy"]


def test_committed_wheel_sets_are_pinned_and_hashed():
    for name in ("core.txt", "dali.txt"):
        lines = [ln for ln in (REPO_ROOT / "benchmarks" / "wheelsets" / name).read_text().splitlines()
                 if ln.strip() and not ln.startswith("#")]
        assert lines and all("==" in ln and "--hash=sha256:" in ln for ln in lines), name
    dali = (REPO_ROOT / "benchmarks" / "wheelsets" / "dali.txt").read_text()
    for needed in ("nvidia-dali-cuda130==2.4.0", "nvidia-nvimgcodec-cu13", "nvidia-libnvcomp-cu13", "nvidia-nvjpeg==",
                   "nvidia-nvjpeg2k-cu13", "nvidia-nvtiff-cu13", "nvtx==", "libcst==", "optree==", "astunparse==",
                   "gast==", "makefun=="):
        assert needed in dali, needed


def test_verify_wheels_reports_wrong_and_unknown_files(tmp_path):
    wheel = _fake_wheel(tmp_path, "alpha", [])
    good = tmp_path / "good.txt"
    good.write_text(f"alpha==1.0 --hash=sha256:{gpu_wheels.sha256(wheel)}\n")
    assert gpu_wheels.verify_wheels(tmp_path, good) == []
    bad = tmp_path / "bad.txt"
    bad.write_text("alpha==1.0 --hash=sha256:00\nbeta==2 --hash=sha256:11\n")
    problems = gpu_wheels.verify_wheels(tmp_path, bad)
    assert any("beta: no wheel" in p for p in problems) and any("sha256 differs" in p for p in problems)


# ------------------------------------------------------------------------------------------- the checks' helpers


def test_device_ceilings_on_cpu():
    gemm, copy = gpu_checks.measure_ceilings("cpu", size=64, copy_mib=1, quick=True)
    assert gemm["tflops"] > 0 and copy["gb_per_s"] > 0
    assert gemm["metric"] == "matmul_ms" and copy["metric"] == "copy_ms"


def test_static_config_matching():
    real = {"constants": {"BLOCK_M": 64, "BLOCK_N": 64}, "num_warps": 8, "num_stages": 2}
    assert gpu_checks._config_matches({"BLOCK_M": 64, "num_warps": 8, "other": 1}, real) is True
    assert gpu_checks._config_matches({"BLOCK_M": 128}, real) is False
    assert gpu_checks._config_matches("BLOCK_M=64, BLOCK_N=64 num_warps=8", real) is True
    assert gpu_checks._config_matches("64x64x64", real) is None
    # benchmarks.kernel_report's form: constexprs nested, and a dtype.
    report = {"case": "large_vocab", "dtype": "bf16", "constexprs": {"BLOCK_M": 64, "BLOCK_N": 64},
              "num_warps": 8, "num_stages": 2, "grid": [1, 2]}
    assert gpu_checks._config_matches(report, real, "bfloat16") is True
    assert gpu_checks._config_matches(report, real, "float32") is False
    assert gpu_checks._config_matches(dict(report, num_warps=4), real, "bfloat16") is False


def test_compiled_kernels_reads_triton_style_caches():
    class Meta:
        num_warps, num_stages, shared = 8, 2, 32768

    class Kernel:
        metadata, n_regs, n_spills = Meta(), 113, 0

    class Kernel:
        metadata, n_regs, n_spills = Meta(), 113, 0
        src = type("Src", (), {"constants": {(2,): 64}})()

    class Fn:
        arg_names = ["X_ptr", "n_rows", "BLOCK_M"]
        device_caches = {0: ({"key-a": Kernel()}, {}, "target", "backend", "binder")}

    module = type("M", (), {"_kd_loss_fwd_kernel": Fn(), "other": 3})
    (row,) = gpu_checks.compiled_kernels(module)
    assert row["name"] == "_kd_loss_fwd_kernel" and row["registers"] == 113 and row["spills"] == 0
    assert row["shared_bytes"] == 32768 and row["num_warps"] == 8 and row["constants"] == {"BLOCK_M": 64}


def test_documented_device_calls_parse_and_fit_the_limits():
    import re
    import shlex

    calls = []
    for doc in ("benchmarks/README.md", "DEVELOPERS.md"):
        calls += re.findall(r'^run\(command="(.*?)", carry=\[(.*?)\], timeout_s=(\d+)\)$',
                            (REPO_ROOT / doc).read_text(), re.MULTILINE)
    suite_calls = [c for c in calls if "gpu_suite.py" in c[0]]
    assert len(suite_calls) >= 4
    for command, carry, timeout_s in calls:
        assert int(timeout_s) <= 600 and len(command) <= 2000 and carry.count('"') // 2 <= 8
    for command, carry, timeout_s in suite_calls:
        words = shlex.split(command.split("&&")[-1])
        i = words.index("timeout")
        limit = int(words[i + 3]) + int(words[i + 2])  # timeout -k KILL_AFTER LIMIT
        assert limit < int(timeout_s), command
        args = gpu_suite.build_parser().parse_args(words[words.index("benchmarks/gpu_suite.py") + 1:])
        assert gpu_suite.PHASE_TIMEOUT_S[args.phase] == int(words[i + 3]), command


def test_nvjpeg_timing_path_with_a_stand_in_decoder(tmp_path, monkeypatch):
    """The batched-decode timing runs on photos of differing sizes (torchvision's ops cannot load on
    this CPU build, so a PIL stand-in plays decode_jpeg)."""
    import types

    import numpy as np
    import torch
    from PIL import Image

    def read_file(path):
        return torch.frombuffer(bytearray(Path(path).read_bytes()), dtype=torch.uint8)

    def decode_jpeg(datas, device="cpu"):
        import io

        out = []
        for data in datas:
            with Image.open(io.BytesIO(data.numpy().tobytes())) as img:
                out.append(torch.from_numpy(np.asarray(img.convert("RGB")).copy()).permute(2, 0, 1).to(device))
        return out

    fake = types.ModuleType("torchvision")
    fake.io = types.ModuleType("torchvision.io")
    fake.io.read_file, fake.io.decode_jpeg, fake.__version__ = read_file, decode_jpeg, "stand-in"
    monkeypatch.setitem(sys.modules, "torchvision", fake)
    monkeypatch.setitem(sys.modules, "torchvision.io", fake.io)
    monkeypatch.setattr("benchmarks.harness.RESULTS_DIR", tmp_path / "results")
    assert gpu_checks.check_nvjpeg(torch.device("cpu"), 8, 4, 0, 1, tmp_path / "data") == 0
    rows = [json.loads(ln) for ln in (tmp_path / "results" / "jpeg_decode.jsonl").read_text().splitlines()]
    assert rows[0]["status"] == "ok" and rows[0]["median"] == 0.0
    metrics = {(r["provider"].split("[")[0], r["metric"]) for r in rows[1:]}
    assert metrics == {("nvjpeg-batched", "decode_epoch_time"), ("nvjpeg-batched", "decode_resize_normalize_epoch_time"),
                       ("pil-dataloader", "decode_resize_normalize_epoch_time")}
    assert all(r["images_per_s"] > 0 and r["images"] == 8 for r in rows[1:])
    sizes = {Image.open(p).size for p in (tmp_path / "data").rglob("*.jpg")}
    assert len(sizes) > 1  # the photos' sizes differ: the resize cannot stack them first


def test_static_report_reads_the_last_json_line_even_after_a_failing_exit(monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "benchmarks.kernel_report" else real_find_spec(name, *a))
    kernels = [{"name": "_kd_loss_fwd_kernel", "config": {"dtype": "bf16"}, "registers": 113, "spills": 0}]

    def fake_run(cmd, **kwargs):
        assert cmd[1:] == ["-m", "benchmarks.kernel_report"] and kwargs["timeout"] == 9
        return subprocess.CompletedProcess(cmd, 1, stdout="a table\n" + json.dumps({"kernels": kernels}) + "\n",
                                           stderr="spills found")

    monkeypatch.setattr(gpu_checks.subprocess, "run", fake_run)
    got, why = gpu_checks.static_report(9)
    assert got == kernels and why == "ok (kernel_report exited 1)"
    monkeypatch.setattr(gpu_checks.subprocess, "run",
                        lambda cmd, **kw: subprocess.CompletedProcess(cmd, 2, stdout="", stderr="boom"))
    got, why = gpu_checks.static_report(9)
    assert got is None and "boom" in why
    assert gpu_checks.static_report(0) == (None, "benchmarks.kernel_report not run (--report-timeout-s 0)")
