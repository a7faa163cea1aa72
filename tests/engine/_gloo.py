"""Run a worker script as N plain gloo ranks on this machine (no launcher, no DeepSpeed).

Each process gets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT, as torchrun would
set them; the script calls ``torch.distributed.init_process_group("gloo", init_method="env://")``
itself and must end with ``barrier()`` then ``destroy_process_group()``: with torch 2.13's gloo a
rank that leaves otherwise aborts at exit now and then ("terminate called without an active
exception", SIGABRT, after its work is done; 2-rank workers that built a tiny open_clip model:
3 of 8 runs with destroy alone, 0 of 10 with barrier then destroy). A few seconds for 2 ranks.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(script: str, args: list[str], folder: Path, *, world_size: int = 2, timeout: float = 300) -> None:
    """Write ``script`` to ``folder/worker.py`` and run it as ``world_size`` ranks; fail with their output."""
    path = Path(folder) / "worker.py"
    path.write_text(script)
    env = {**os.environ, "WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, str(path), *args], env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(world_size)]
    failed = []
    for rank, proc in enumerate(procs):
        try:
            output, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
        if proc.returncode:
            failed.append(f"rank {rank} exited with {proc.returncode}:\n{output[-3000:]}")
    assert not failed, "\n".join(failed)
