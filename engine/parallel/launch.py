"""Several processes under a launcher: the environment, the process group and the collectives.

    torchrun --nproc_per_node 2 -m clipdistill.engine.cli distill --config run.yaml deepspeed=ds_config.json

How a distributed run is laid out (teacher sharding, student replication, held-out selection,
checkpoints) is described in :mod:`clipdistill.engine.parallel` (the package docstring); the
ZeRO-3 teacher lives in :mod:`clipdistill.engine.parallel.zero`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Mapping, Optional

import torch

from clipdistill.engine.config.schema import ConfigError

LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
OFFLOAD_DEVICES = ("none", "cpu", "nvme")


@dataclass(frozen=True)
class LaunchEnv:
    """This process's place in a launched run (from the launcher's environment variables)."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int


def detect_launch(environ: Optional[Mapping[str, str]] = None, *, required: bool = False,
                  reason: str = "") -> Optional[LaunchEnv]:
    """The launcher environment, or None when the process was not started by a launcher.

    Args:
        environ: the environment to read (default ``os.environ``).
        required: raise when no launcher environment is present (``reason`` says why it is needed).

    Raises:
        ConfigError: some launcher variables are set and others are missing or malformed, or
            ``required`` and none are set; the message names the missing variables.
    """
    environ = os.environ if environ is None else environ
    present = [name for name in LAUNCH_VARIABLES if environ.get(name, "") != ""]
    if not present and not required:
        return None
    missing = [name for name in LAUNCH_VARIABLES if name not in present]
    if missing:
        why = f" {reason}" if reason else ""
        raise ConfigError(
            f"distributed launch: the environment lacks {', '.join(missing)}.{why} Start the run with "
            f"`torchrun --nproc_per_node N -m clipdistill.engine.cli distill ...` or `deepspeed --no_local_rank "
            f"--num_gpus N $(which clipdistill) distill ...`, which set {', '.join(LAUNCH_VARIABLES)}"
        )
    try:
        env = LaunchEnv(int(environ["RANK"]), int(environ["WORLD_SIZE"]), int(environ["LOCAL_RANK"]),
                        environ["MASTER_ADDR"], int(environ["MASTER_PORT"]))
    except ValueError as exc:
        raise ConfigError(f"distributed launch: RANK, WORLD_SIZE, LOCAL_RANK and MASTER_PORT must be integers "
                          f"({exc})") from exc
    if env.world_size < 1 or not 0 <= env.rank < env.world_size or env.local_rank < 0:
        raise ConfigError(f"distributed launch: RANK={env.rank}, WORLD_SIZE={env.world_size}, "
                          f"LOCAL_RANK={env.local_rank} do not describe a rank of the run")
    return env


def check_world(world_size: int, *, global_batch_size: int, num_samples: Optional[int]) -> None:
    """Raise a ConfigError when the ranks cannot share the run's batches (``num_samples`` None: not known yet)."""
    if num_samples is not None and world_size > num_samples:
        raise ConfigError(f"{world_size} ranks but only {num_samples} training images: every rank needs at least "
                          f"one; start fewer processes or add images")
    if global_batch_size % world_size:
        raise ConfigError(f"data.batch_size={global_batch_size} (the global batch) must be a multiple of the "
                          f"number of ranks ({world_size})")


def is_initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the initialized process group, else (0, 1)."""
    if not is_initialized():
        return 0, 1
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def init_process_group(env: LaunchEnv, device: torch.device) -> bool:
    """Join the launcher's process group (nccl on CUDA, gloo on the CPU); True if this call made it."""
    if is_initialized():
        return False
    if device.type == "cuda":
        torch.cuda.set_device(env.local_rank)
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs = {"device_id": torch.device("cuda", env.local_rank)} if device.type == "cuda" else {}
    torch.distributed.init_process_group(backend, init_method="env://", rank=env.rank,
                                         world_size=env.world_size, **kwargs)
    return True


def rank_device(device: torch.device, env: LaunchEnv) -> torch.device:
    """One GPU per process: ``cuda`` becomes ``cuda:LOCAL_RANK``; the CPU stays the CPU."""
    if device.type == "cuda":
        return torch.device("cuda", env.local_rank)
    return device


def broadcast_from_rank0(make: Callable[[], torch.Tensor], device: torch.device) -> torch.Tensor:
    """``make()`` on rank 0 only, its tensor sent to every rank (shape and dtype included)."""
    if not is_initialized():
        return make()
    rank = torch.distributed.get_rank()
    value = make() if rank == 0 else None
    meta = [(tuple(value.shape), value.dtype) if rank == 0 else None]
    torch.distributed.broadcast_object_list(meta, src=0)
    shape, dtype = meta[0]
    out = value.to(device).contiguous() if rank == 0 else torch.empty(shape, dtype=dtype, device=device)
    torch.distributed.broadcast(out, src=0)
    return out


def row_share(real_rows: int, device: torch.device) -> torch.Tensor:
    """This rank's share of the global batch's real rows, n_r / Σ_s n_s, as a 0-dim float32 tensor.

    Each rank's loss is a mean over its own real rows; scaled by its share, the ranks' losses
    sum to the global batch's mean loss, whatever padding or rejects each rank holds. One
    all-reduce of one number, enqueued on the device without a host sync (the count goes up
    with a non-blocking copy). 1 in a single process.
    """
    if not is_initialized():
        return torch.ones((), dtype=torch.float32, device=device)
    count = torch.tensor([float(real_rows)], dtype=torch.float32).to(device, non_blocking=True)
    total = count.clone()
    torch.distributed.all_reduce(total)
    return (count / total.clamp_min(1.0)).squeeze(0)


def sum_gradients(params: list[torch.Tensor]) -> None:
    """All-reduce (sum) the gradients of replicated parameters, in one flat buffer.

    With each rank's loss scaled by :func:`row_share`, the sum is the gradient of the global
    batch's loss: the single-process gradient on the same global batches, also with unequal
    real rows per rank (padding, rejects), gradient accumulation, and the batch norm's
    cross-rank terms (:mod:`clipdistill.engine.batchnorm`). The prompts are small: one call.
    """
    if not is_initialized():
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    torch.distributed.all_reduce(flat)
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset:offset + n].view_as(g).to(g.dtype)
        offset += n


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Σ over ranks of a few host numbers (one collective)."""
    if not is_initialized():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return t.tolist()


# --------------------------------------------------------------------------------- batch norm
