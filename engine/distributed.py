"""Data-parallel distillation across processes: a ZeRO-3-sharded teacher and replicated prompts.

    torchrun --nproc_per_node 2 -m clipdistill.engine.cli distill --config run.yaml deepspeed=ds_config.json
    deepspeed --no_local_rank --num_gpus 2 $(which clipdistill) distill --config run.yaml deepspeed=ds_config.json
    deepspeed --no_local_rank --hostfile hosts.txt $(which clipdistill) distill --config run.yaml deepspeed=...

(``--no_local_rank``: the deepspeed launcher would otherwise put ``--local_rank=N`` before the
sub-command; the rank comes from the environment, ``LOCAL_RANK``, either way.)

What runs where, with P processes (ranks) and a global batch of G samples (``data.batch_size``):

- **Launcher environment** (:func:`detect_launch`): ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
  ``MASTER_ADDR`` and ``MASTER_PORT``, set by ``torchrun`` or the ``deepspeed`` launcher. When
  they are present the run joins a process group (:func:`init_process_group`: nccl on CUDA,
  gloo on the CPU) and the loader gives rank r its fixed slice of every global batch
  (G / P samples). Without them the run is the plain single-process one, unchanged.
- **Teacher** (``train.deepspeed``, :func:`build_sharded_teacher`): only the image tower runs
  while training, so only it is sharded. It is built under ``deepspeed.zero.Init`` (every
  parameter partitioned as it is created: no rank ever holds the whole tower), its weights are
  streamed in one parameter at a time under ``GatheredParameters(..., modifier_rank=0)`` from a
  state dict that rank 0 alone holds in host memory, and it is wrapped in a ZeRO-3 engine with
  no optimizer (DeepSpeed refuses an optimizer over an empty parameter list), kept in eval mode
  (train mode under no_grad takes a wrong path in DeepSpeed). ``offload_param`` (cpu, nvme)
  comes from the DeepSpeed config. The whole open_clip ``CLIP`` cannot be built under
  zero.Init (its 0-dim ``logit_scale`` fails partitioning), another reason to shard the tower.
- **Class vectors**: computed once, on rank 0, with the teacher's text tower (moved to rank 0's
  device for that; the image tower stays in host memory) and broadcast to every rank; rank 0
  alone writes the class-vector cache.
- **Student** (ZeRO stage 0: its trainable tensors are tiny): replicated; after backward,
  :func:`average_gradients` all-reduces the gradients weighted by each rank's real rows, so a
  step equals the single-process step on the same global batch (padding included). PromptKD's
  projector batch norm is synchronized (:func:`sync_batch_norm`).
- **Checkpoints**: clipdistill's own safetensors files, written by rank 0 only (the learner and
  optimizer are identical on every rank; the loader state is world-size independent), so a
  run resumes with the same or another number of ranks.
"""
from __future__ import annotations

import importlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .config import ConfigError

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


def load_deepspeed_config(path: str | Path, *, micro_batch_size: int) -> dict:
    """Read and check a DeepSpeed JSON config for the sharded teacher.

    It must select ZeRO stage 3; ``zero_optimization.offload_param.device`` must be one of
    none, cpu, nvme (nvme needs ``nvme_path``). When the file names no batch size,
    ``train_micro_batch_size_per_gpu`` is set to ``micro_batch_size`` (DeepSpeed wants one; the
    teacher engine never steps, so it only has to be consistent).

    Raises:
        ConfigError: the file is missing, not JSON, or asks for something else.
    """
    path = Path(path)
    where = f"train.deepspeed={str(path)!r}"
    if not path.is_file():
        raise ConfigError(f"{where}: the DeepSpeed config file does not exist")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{where}: not a JSON file ({exc})") from exc
    if not isinstance(config, dict):
        raise ConfigError(f"{where}: the top level must be a JSON object, got {type(config).__name__}")
    zero = config.get("zero_optimization")
    if not isinstance(zero, dict) or zero.get("stage") != 3:
        stage = zero.get("stage") if isinstance(zero, dict) else None
        raise ConfigError(f"{where}: zero_optimization.stage must be 3 (the teacher is partitioned with ZeRO-3), "
                          f"got {stage!r}; e.g. {{\"zero_optimization\": {{\"stage\": 3}}}}")
    offload = zero.get("offload_param") or {}
    if not isinstance(offload, dict):
        raise ConfigError(f"{where}: zero_optimization.offload_param must be an object")
    device = offload.get("device", "none")
    if device not in OFFLOAD_DEVICES:
        raise ConfigError(f"{where}: zero_optimization.offload_param.device must be one of "
                          f"{', '.join(OFFLOAD_DEVICES)}, got {device!r}")
    if device == "nvme" and not offload.get("nvme_path"):
        raise ConfigError(f"{where}: offload_param.device 'nvme' needs offload_param.nvme_path (a folder on an NVMe)")
    for key in ("optimizer", "scheduler"):
        if key in config:
            raise ConfigError(f"{where}: remove {key!r}: the teacher engine has no trainable parameters, and the "
                              f"student's optimizer is set with optim.* in the run config")
    config = dict(config)
    if "train_batch_size" not in config and "train_micro_batch_size_per_gpu" not in config:
        config["train_micro_batch_size_per_gpu"] = max(1, int(micro_batch_size))
    return config


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


def average_gradients(params: list[torch.Tensor], real_rows: int) -> None:
    """All-reduce the gradients of replicated parameters, weighted by each rank's real rows.

    Each rank's loss is a mean over its own real rows, so the global-batch gradient is
    Σ_r n_r·g_r / Σ_r n_r; with equal shares this is the plain average. One flat buffer,
    one all-reduce (the prompts are small). A rank with no real rows contributes nothing.
    """
    if not is_initialized():
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    device = grads[0].device
    flat = torch.cat([g.reshape(-1).float() for g in grads]
                     + [torch.tensor([float(real_rows)], device=device)])
    flat[:-1] *= float(real_rows)
    torch.distributed.all_reduce(flat)
    total = flat[-1].clamp_min(1.0)
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = (flat[offset:offset + n] / total).view_as(g).to(g.dtype)
        offset += n


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Σ over ranks of a few host numbers (one collective)."""
    if not is_initialized():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return t.tolist()


# --------------------------------------------------------------------------------- batch norm


class _GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Batch norm whose training statistics are taken over every rank's batch (any backend).

    torch's SyncBatchNorm refuses CPU tensors; this one all-reduces the per-channel sum,
    sum of squares and count through ``torch.distributed.nn`` (differentiable), so the
    gradient flows through the global statistics as in SyncBatchNorm. Eval mode and a
    single process behave as the wrapped BatchNorm.
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (N, C, ...), got {input.dim()}D")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not (self.training and is_initialized()):
            return super().forward(input)
        from torch.distributed.nn.functional import all_reduce

        dims = [0] + list(range(2, input.dim()))
        x = input.float()
        c = x.shape[1]
        # Two passes, as torch's batch norm: the global mean first, then the global sum of squared
        # deviations from it (E[x²] - mean² loses float32 precision when |mean| >> std).
        count = torch.tensor([float(x.numel() // c)], device=x.device)
        stats = all_reduce(torch.cat([x.sum(dims), count]))
        n = stats[-1]
        mean = stats[:c] / n
        shape = [1, c] + [1] * (input.dim() - 2)
        centered = x - mean.view(shape)
        var = all_reduce((centered * centered).sum(dims)) / n
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(m * mean.detach())
                self.running_var.mul_(1 - m).add_(m * var.detach() * n / (n - 1).clamp_min(1.0))
        y = centered * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(input.dtype)


def sync_batch_norm(module: nn.Module) -> nn.Module:
    """Synchronize every BatchNorm in ``module`` across ranks (torch's SyncBatchNorm on CUDA).

    Parameters and buffers are kept (the same tensors), so optimizer and checkpoint names
    do not change.
    """
    if not is_initialized():
        return module
    on_cuda = any(p.is_cuda for p in module.parameters())
    if on_cuda:
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    for name, child in list(module.named_children()):
        if isinstance(child, nn.modules.batchnorm._BatchNorm) and not isinstance(child, _GlobalBatchNorm):
            child.__class__ = type(f"Global{type(child).__name__}", (_GlobalBatchNorm,), {})
        else:
            sync_batch_norm(child)
    return module


# --------------------------------------------------------------------------------- the sharded teacher


class ShardedTeacher(nn.Module):
    """The teacher's image tower as a ZeRO-3 engine: what DistillStep needs of a teacher.

    ``encode_image(images) -> (B, D)`` float32, L2-normalized; ``logit_scale`` (a 0-dim
    float32 tensor, already exponentiated); ``output_dim``; ``model.visual`` (the sharded
    tower, for its input size and normalization). Always in eval mode. The engine is kept out
    of the module tree so that ``.to()``, ``state_dict()`` and ``parameters()`` of a
    DistillStep never touch the partitioned parameters.
    """

    def __init__(self, engine, visual: nn.Module, logit_scale: float, output_dim: int):
        super().__init__()
        object.__setattr__(self, "engine", engine)
        object.__setattr__(self, "model", _VisualOnly(visual))
        self.output_dim = int(output_dim)
        self.register_buffer("_logit_scale", torch.tensor(float(logit_scale)), persistent=False)
        self.engine.eval()
        super().train(False)

    def train(self, mode: bool = True) -> "ShardedTeacher":
        self.engine.eval()
        return super().train(False)

    @property
    def logit_scale(self) -> torch.Tensor:
        return self._logit_scale

    @property
    def offload_device(self) -> str:
        """Where DeepSpeed keeps the partitions (``offload_param.device`` as the engine took it): none, cpu, nvme."""
        offload = self.engine.zero_offload_param()
        device = getattr(offload, "device", None) if offload is not None else None
        return str(getattr(device, "value", device) or "none")

    @property
    def input_dtype(self) -> torch.dtype:
        return next(self.model.visual.parameters()).dtype

    @torch.no_grad()
    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """images (B, 3, H, W) -> features (B, D) float32 (every rank must call it: a collective)."""
        features = self.engine(images.to(self.input_dtype)).float()
        return F.normalize(features, dim=-1) if normalize else features

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.encode_image(images)


class _VisualOnly:
    """Stands in for the open_clip model where only ``.visual`` is asked for."""

    def __init__(self, visual: nn.Module):
        self.visual = visual


def _text_side_to(model: nn.Module, device: torch.device) -> None:
    """Move everything of a CLIP but its image tower to ``device`` (for the class vectors)."""
    for name, child in model.named_children():
        if name != "visual":
            child.to(device)
    for name, param in model.named_parameters(recurse=False):
        param.data = param.data.to(device)
    for name, buf in model.named_buffers(recurse=False):
        setattr(model, name, buf.to(device))


def build_vision_tower(model_name: str) -> nn.Module:
    """An open_clip model's image tower alone, random init (fp32), from its named config."""
    from .models import _check_model_name, import_open_clip

    open_clip = import_open_clip()  # first: it applies the torchvision measure before open_clip loads
    from open_clip.model import CLIPVisionCfg, _build_vision_tower

    cfg = open_clip.get_model_config(_check_model_name(model_name))
    vision_cfg = cfg["vision_cfg"]
    if isinstance(vision_cfg, dict):
        vision_cfg = CLIPVisionCfg(**vision_cfg)
    return _build_vision_tower(cfg["embed_dim"], vision_cfg, quick_gelu=cfg.get("quick_gelu", False))


def build_sharded_teacher(
    model_name: str,
    weights: Optional[str],
    ds_config: dict,
    *,
    device: torch.device,
    class_vectors: Callable[[nn.Module], torch.Tensor],
    seed: int,
) -> tuple[ShardedTeacher, torch.Tensor]:
    """The ZeRO-3 teacher and its class vectors (C, D) on every rank (see the module docstring).

    Args:
        model_name, weights: the teacher (weights None: random init from ``seed``, the same
            weights the single-process run builds).
        ds_config: a checked DeepSpeed config (:func:`load_deepspeed_config`).
        device: this rank's device.
        class_vectors: called on rank 0 only with a :class:`~clipdistill.engine.models.Teacher`
            whose text side is on ``device``; returns (C, D) normalized class vectors.
        seed: the seed the teacher is built with.
    """
    import deepspeed

    from .models import Teacher, import_open_clip, load_clip

    if not is_initialized():
        raise ConfigError("the sharded teacher needs an initialized process group (start the run with a launcher)")
    rank = torch.distributed.get_rank()
    full = None
    state: dict[str, torch.Tensor] = {}
    if rank == 0:
        # Host memory only: the image tower is never placed on a device unsharded.
        torch.manual_seed(seed)
        full = load_clip(model_name, weights, device="cpu", precision="fp32")
        state = {k[len("visual."):]: v for k, v in full.state_dict().items() if k.startswith("visual.")}
        scale = float(full.logit_scale.detach().float().exp())
        _text_side_to(full, device)

        def make() -> torch.Tensor:
            return class_vectors(Teacher(full)).float()
    else:
        scale = 0.0
        make = None  # type: ignore[assignment]
    vectors = broadcast_from_rank0(make, device)
    meta = [scale]
    torch.distributed.broadcast_object_list(meta, src=0)
    scale = float(meta[0])
    del full

    # zero.Init patches torch.Tensor.__new__; torch._dynamo, imported lazily by torch on first use,
    # fails its own signature check when first imported inside that context: import it before.
    importlib.import_module("torch._dynamo")

    import_open_clip()
    with deepspeed.zero.Init(config_dict_or_path=ds_config):
        visual = build_vision_tower(model_name)
    for name, param in visual.named_parameters():
        with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
            if rank == 0:
                if name not in state:
                    raise RuntimeError(f"teacher {model_name!r}: the image tower's {name!r} is not in the checkpoint")
                param.data.copy_(state.pop(name).to(param.dtype))
    for name, buf in visual.named_buffers():  # buffers are not partitioned: every rank gets rank 0's
        value = buf.data
        if rank == 0 and name in state:
            value.copy_(state.pop(name).to(value.dtype))
        torch.distributed.broadcast(value, src=0)
    state.clear()
    for param in visual.parameters():
        param.requires_grad_(False)
    engine, *_ = deepspeed.initialize(model=visual, config=ds_config)
    engine.eval()
    return ShardedTeacher(engine, visual, scale, vectors.shape[1]), vectors


__all__ = [
    "LaunchEnv", "detect_launch", "load_deepspeed_config", "check_world", "init_process_group", "rank_and_world",
    "rank_device", "broadcast_from_rank0", "average_gradients", "all_reduce_sum", "sync_batch_norm",
    "ShardedTeacher", "build_vision_tower", "build_sharded_teacher",
]
