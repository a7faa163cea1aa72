"""The package foundation: layout, the torchvision compatibility measure, the CLI."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def _python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_subpackages_import_from_any_directory(tmp_path):
    proc = _python(
        "import clipdistill.engine, clipdistill.kernels, clipdistill.loaders, json;"
        "print(json.dumps([clipdistill.engine.__file__, clipdistill.kernels.__file__, clipdistill.loaders.__file__]))",
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    files = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [Path(f).parent.name for f in files] == ["engine", "kernels", "loaders"]


def test_no_top_level_modules_shadow_other_packages(tmp_path):
    # Whatever `engine` or `kernels` resolve to from a neutral directory, it must not be ours.
    proc = _python(
        "import importlib.util, json\n"
        "out = {}\n"
        "for name in ('engine', 'kernels', 'loaders'):\n"
        "    spec = importlib.util.find_spec(name)\n"
        "    out[name] = spec.origin if spec else None\n"
        "print(json.dumps(out))",
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    for name, origin in json.loads(proc.stdout.strip().splitlines()[-1]).items():
        assert origin is None or not Path(origin).resolve().is_relative_to(REPO_ROOT), (name, origin)


def test_torchvision_shim_makes_open_clip_importable(tmp_path):
    proc = _python(
        "from clipdistill.engine._torchvision_compat import ensure_torchvision_importable as e\n"
        "state = e(); assert e() == state\n"
        "import open_clip, torchvision\n"
        "from torchvision import transforms\n"
        "import torch\n"
        "t = transforms.Compose([transforms.CenterCrop(4)])\n"
        "assert t(torch.zeros(3, 8, 8)).shape == (3, 4, 4)\n"
        "print(state)",
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    state = proc.stdout.strip().splitlines()[-1]
    import torch

    assert state in ("native", "shimmed")
    if state == "shimmed":
        # Only a CPU-only torch needs the shim.
        assert not torch.cuda.is_available()


def test_torchvision_shim_compiled_ops_fail_clearly(tmp_path):
    proc = _python(
        "from clipdistill.engine._torchvision_compat import ensure_torchvision_importable as e\n"
        "state = e()\n"
        "import torch, torchvision\n"
        "try:\n"
        "    torchvision.ops.nms(torch.rand(3, 4), torch.rand(3), 0.5)\n"
        "    print(state, 'ran')\n"
        "except Exception as exc:\n"
        "    print(state, 'raised', type(exc).__name__)\n",
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    state, outcome, *_ = proc.stdout.strip().splitlines()[-1].split()
    assert (state, outcome) in {("native", "ran"), ("shimmed", "raised")}


def test_torchvision_shim_is_a_no_op_when_ops_load(monkeypatch):
    from clipdistill.engine import _torchvision_compat as compat

    monkeypatch.setattr(compat, "_STATE", None)
    monkeypatch.setattr(compat, "_SHIM_LIBRARY", None)
    monkeypatch.setitem(sys.modules, "torchvision", None)  # pretend: not yet imported ...
    monkeypatch.delitem(sys.modules, "torchvision")
    monkeypatch.setattr(compat.importlib.util, "find_spec", lambda name: object())
    monkeypatch.setattr(compat, "_torchvision_ops_load", lambda: True)  # ... and its ops load
    assert compat.ensure_torchvision_importable() == "native"
    assert compat._SHIM_LIBRARY is None


def test_torchvision_shim_reports_absent(monkeypatch):
    from clipdistill.engine import _torchvision_compat as compat

    monkeypatch.setattr(compat, "_STATE", None)
    monkeypatch.delitem(sys.modules, "torchvision", raising=False)
    monkeypatch.setattr(compat.importlib.util, "find_spec", lambda name: None)
    assert compat.ensure_torchvision_importable() == "absent"


def test_cli_version_and_info(tmp_path):
    from clipdistill.engine import __version__
    from clipdistill.engine.cli import main

    exe = Path(sys.executable).parent / "clipdistill"
    proc = subprocess.run([str(exe), "--version"], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"clipdistill {__version__}"
    proc = subprocess.run([str(exe), "info", "--json"], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert info["clipdistill"] == __version__ and "torch" in info
    assert main([]) == 2  # no subcommand: help on stderr, usage error


def test_cli_unknown_subcommand_is_an_error(capsys):
    from clipdistill.engine.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["no-such-command"])
    assert exc.value.code == 2
    assert "no-such-command" in capsys.readouterr().err


def test_editable_install_keeps_an_installed_torch(tmp_path):
    """`pip install -e .` where torch (say a CUDA build) is installed but torchvision is not.

    Unpinned, open_clip pulls the newest torchvision, which needs a newer torch,
    and pip would replace the user's torch. For an editable install the build
    backend (_build_backend.py, through setup.py) narrows torchvision to the
    release built for the installed torch (tests/test_packaging.py: wheels do not). The environment here has a stand-in
    torch 2.13.0 (its metadata only); pip resolves, without installing anything.
    """
    import venv

    env_dir = tmp_path / "env"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    info = Path(purelib) / "torch-2.13.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: torch\nVersion: 2.13.0\n")
    (info / "RECORD").write_text("")
    report = tmp_path / "report.json"
    env = {k: v for k, v in os.environ.items() if k not in ("PIP_CONSTRAINT", "CLIPDISTILL_LOOSE_REQUIREMENTS")}
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--dry-run", "--quiet",
         "--report", str(report), "-e", str(REPO_ROOT)],
        capture_output=True, text=True, env=env, timeout=600,
    )
    if proc.returncode != 0 and ("No matching distribution" in proc.stderr or "connection" in proc.stderr.lower()):
        pytest.skip(f"no package index reachable: {proc.stderr.strip().splitlines()[-1]}")
    assert proc.returncode == 0, proc.stderr
    planned = {item["metadata"]["name"].lower(): item["metadata"]["version"]
               for item in json.loads(report.read_text())["install"]}
    assert "torch" not in planned, f"pip would replace torch with {planned.get('torch')}"
    assert planned.get("torchvision", "").startswith("0.28"), planned
