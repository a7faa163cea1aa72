"""Start a ``clipdistill`` command and SIGKILL it once its run has logged some steps (resume tests)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def run_then_sigkill(argv: list[str], *, cwd: Path, metrics: Path, after_lines: int, timeout: float = 300) -> None:
    """Run ``clipdistill *argv``; kill it with SIGKILL when ``metrics`` holds ``after_lines`` lines (or it ended)."""
    exe = Path(sys.executable).parent / "clipdistill"
    child = subprocess.Popen([str(exe), *argv], cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while time.time() < deadline and child.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= after_lines:
            break
        time.sleep(0.01)
    if child.poll() is None:
        os.kill(child.pid, signal.SIGKILL)
    child.wait()
