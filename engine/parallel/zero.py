"""DeepSpeed: its config, up-front refusals, and the ZeRO-3-sharded teacher (plain or tuned).

See :mod:`clipdistill.engine.parallel` for how a sharded run is laid out. DeepSpeed itself is an
optional dependency, imported only inside the functions that use it.
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import os
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from clipdistill.engine.config.schema import ConfigError
from clipdistill.engine.models.clip import Teacher, _check_model_name, import_open_clip, load_clip
from clipdistill.engine.models.tuned import LEARNER_KIND, load_tuned_teacher, prompt_placement_of, read_tuned_header
from clipdistill.engine.parallel.launch import OFFLOAD_DEVICES, broadcast_from_rank0, is_initialized
from clipdistill.engine.prompts.learners import encode_deep_prompted


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
    if device == "nvme":
        folder = offload.get("nvme_path")
        if not folder:
            raise ConfigError(f"{where}: offload_param.device 'nvme' needs offload_param.nvme_path (a folder on an NVMe)")
        if not Path(folder).is_dir() or not os.access(folder, os.W_OK):
            raise ConfigError(f"{where}: offload_param.nvme_path {str(folder)!r} is not a folder this process can "
                              f"write to")
    for key in ("optimizer", "scheduler"):
        if key in config:
            raise ConfigError(f"{where}: remove {key!r}: the teacher engine has no trainable parameters, and the "
                              f"student's optimizer is set with optim.* in the run config")
    config = dict(config)
    if "train_batch_size" not in config and "train_micro_batch_size_per_gpu" not in config:
        config["train_micro_batch_size_per_gpu"] = max(1, int(micro_batch_size))
    return config


def require_deepspeed(config: dict) -> None:
    """Fail early, with what to do, when DeepSpeed or what the config asks of it is missing.

    ``offload_param.device`` nvme needs DeepSpeed's async_io op, which links libaio; without it
    DeepSpeed fails deep inside the engine ("Unable to JIT load the async_io op ..."), after the
    teacher was built.

    Raises:
        ConfigError: DeepSpeed is not installed, or NVMe offload cannot work here.
    """
    if importlib.util.find_spec("deepspeed") is None:
        raise ConfigError("train.deepspeed: DeepSpeed is not installed; pip install -e '.[deepspeed]' "
                          "(DS_BUILD_OPS=0 installs it without compiling its ops)")
    offload = (config.get("zero_optimization") or {}).get("offload_param") or {}
    if offload.get("device") == "nvme":
        from deepspeed.ops.op_builder import AsyncIOBuilder

        if not AsyncIOBuilder().is_compatible(verbose=False):
            raise ConfigError("train.deepspeed: offload_param.device 'nvme' needs DeepSpeed's async_io op, which "
                              "cannot be built here: it links libaio (headers and library, e.g. `apt install "
                              "libaio-dev`). Install it, or offload to 'cpu'")


_DS_PRECISIONS = {"fp32": None, "bf16": "bf16", "pure_bf16": "bf16", "fp16": "fp16", "pure_fp16": "fp16"}


def with_teacher_precision(config: dict, precision: Optional[str], device: torch.device) -> dict:
    """The DeepSpeed config with the sharded teacher's weight dtype set from ``teacher.precision``.

    The plain engine builds the teacher in ``teacher.precision`` (default bf16 on a GPU, fp32
    on the CPU); under ZeRO-3 the partitions' dtype is DeepSpeed's ``bf16``/``fp16`` section.
    A config without either section gets the one ``teacher.precision`` asks for (none for
    fp32); a config with one (enabled or not) wins over the default, and one that contradicts
    an explicit ``teacher.precision`` is refused. DeepSpeed's bf16 holds every weight in bf16, LayerNorm's
    too (open_clip's bf16 keeps LayerNorm in fp32).

    Raises:
        ConfigError: an unknown precision, or a config that contradicts it.
    """
    requested = precision if precision is not None else ("fp32" if device.type == "cpu" else "bf16")
    if requested not in _DS_PRECISIONS:
        raise ConfigError(f"teacher.precision={requested!r} under train.deepspeed: use one of "
                          f"{', '.join(_DS_PRECISIONS)}")
    want = _DS_PRECISIONS[requested]
    sections = {key: bool(config[key].get("enabled", False)) for key in ("bf16", "fp16")
                if isinstance(config.get(key), dict)}
    enabled = [key for key, on in sections.items() if on]
    if len(enabled) > 1:
        raise ConfigError("train.deepspeed: the config enables both bf16 and fp16; enable one")
    if sections:  # the config decides (a section with enabled false: fp32 partitions)
        chosen = enabled[0] if enabled else None
        if precision is not None and chosen != want:
            says = f"enables {chosen}" if chosen else "disables bf16 and fp16 (fp32 partitions)"
            raise ConfigError(f"teacher.precision={precision!r} but the DeepSpeed config {says}: make them "
                              f"agree (or leave teacher.precision unset to use the config's)")
        return config
    config = dict(config)
    if want is not None:
        config[want] = {"enabled": True}
    return config



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

    # Never traced by torch.compile (train.compile): DeepSpeed gathers the partitions in module
    # hooks, and dynamo, tracing through them, sees the empty local parameters and fails. The
    # teacher runs eagerly; the rest of a compiled step stays compiled.
    @torch.compiler.disable
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


def _take_image_tower(visual: nn.Module) -> dict[str, torch.Tensor]:
    """The tower's state dict (host tensors), its parameters left empty in the model.

    What remains of the model is its text side: moving the whole model to a device for the
    class vectors (``.to(device)``, also the one a learner built over it does) then moves no
    image-tower weight, so the tower is never placed on a device unsharded.
    """
    state = dict(visual.state_dict())  # detached tensors sharing the parameters' storage
    for param in visual.parameters():
        param.data = param.data.new_empty(0)
    return state


def build_vision_tower(model_name: str) -> nn.Module:
    """An open_clip model's image tower alone, random init (fp32), from its named config."""
    open_clip = import_open_clip()  # first: it applies the torchvision measure before open_clip loads
    from open_clip.model import CLIPVisionCfg, _build_vision_tower

    cfg = open_clip.get_model_config(_check_model_name(model_name))
    vision_cfg = cfg["vision_cfg"]
    if isinstance(vision_cfg, dict):
        vision_cfg = CLIPVisionCfg(**vision_cfg)
    return _build_vision_tower(cfg["embed_dim"], vision_cfg, quick_gelu=cfg.get("quick_gelu", False))


class PromptedImageTower(nn.Module):
    """An image tower with frozen deep vision prompts, as one module for a ZeRO-3 engine.

    ``forward(images (B, 3, H, W)) -> (B, D)`` unnormalized features: the prompt learners' own
    image path (:func:`clipdistill.engine.prompts.encode_deep_prompted`) with
    ``vision_prompts`` (depth, n, W_vision), or the plain tower's features without prompts.
    """

    def __init__(self, visual: nn.Module, prompt_shape: Optional[tuple[int, ...]], before_ln_pre: bool = True):
        super().__init__()
        self.visual = visual
        self.before_ln_pre = before_ln_pre
        self.vision_prompts = (nn.Parameter(torch.zeros(prompt_shape), requires_grad=False)
                               if prompt_shape is not None else None)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return encode_deep_prompted(self.visual, images, self.vision_prompts, self.before_ln_pre)


def _require_process_group() -> int:
    if not is_initialized():
        raise ConfigError("the sharded teacher needs an initialized process group (start the run with a launcher)")
    return torch.distributed.get_rank()


def _from_rank0(make_vectors: Optional[Callable[[], torch.Tensor]], meta: list,
                device: torch.device) -> tuple[torch.Tensor, list]:
    """Rank 0's class vectors (``make_vectors()``, run there only) and its ``meta`` list, on every rank."""
    vectors = broadcast_from_rank0(make_vectors, device)  # type: ignore[arg-type]
    meta = list(meta)
    torch.distributed.broadcast_object_list(meta, src=0)
    return vectors, meta


def _shard(make_module: Callable[[], nn.Module], state: dict[str, torch.Tensor], ds_config: dict,
           *, what: str) -> tuple[object, nn.Module]:
    """Build ``make_module()`` partitioned, fill it from rank 0's ``state``, wrap it in a frozen engine.

    Every parameter is partitioned as it is created (zero.Init) and filled one at a time under
    ``GatheredParameters(..., modifier_rank=0)``: no rank ever holds the whole module. Buffers
    are not partitioned; every rank gets rank 0's. ``state`` (keys as in ``state_dict``) is
    consumed on rank 0 and empty elsewhere. Returns (engine, module).
    """
    import deepspeed

    rank = torch.distributed.get_rank()
    # zero.Init patches torch.Tensor.__new__; torch._dynamo, imported lazily by torch on first use,
    # fails its own signature check when first imported inside that context: import it before.
    importlib.import_module("torch._dynamo")
    import_open_clip()
    with deepspeed.zero.Init(config_dict_or_path=ds_config):
        module = make_module()
    for name, param in module.named_parameters():
        with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
            if rank == 0:
                if name not in state:
                    raise RuntimeError(f"{what} {name!r} is not in the checkpoint")
                param.data.copy_(state.pop(name).to(param.dtype))
    for name, buf in module.named_buffers():  # buffers are not partitioned: every rank gets rank 0's
        value = buf.data
        if rank == 0 and name in state:
            value.copy_(state.pop(name).to(value.dtype))
        torch.distributed.broadcast(value, src=0)
    state.clear()
    for param in module.parameters():
        param.requires_grad_(False)
    engine, *_ = deepspeed.initialize(model=module, config=ds_config)
    engine.eval()
    return engine, module


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
    rank = _require_process_group()
    state: dict[str, torch.Tensor] = {}
    full, scale, make = None, 0.0, None
    if rank == 0:
        # Host memory only: the image tower is never placed on a device unsharded.
        torch.manual_seed(seed)
        full = load_clip(model_name, weights, device="cpu", precision="fp32")
        state = _take_image_tower(full.visual)
        scale = float(full.logit_scale.detach().float().exp())
        full.to(device)  # the text side: the tower's weights were taken out

        def make() -> torch.Tensor:
            return class_vectors(Teacher(full)).float()
    vectors, (scale,) = _from_rank0(make, [scale], device)
    del full, make  # rank 0's text side

    engine, visual = _shard(lambda: build_vision_tower(model_name), state, ds_config,
                            what=f"teacher {model_name!r}: the image tower's")
    return ShardedTeacher(engine, visual, scale, vectors.shape[1]), vectors


def build_sharded_tuned_teacher(
    path: str | Path,
    ds_config: dict,
    *,
    device: torch.device,
    class_vectors: Callable[[nn.Module], torch.Tensor],
) -> tuple[ShardedTeacher, torch.Tensor]:
    """A PromptSRC-tuned teacher (``clipdistill tune-teacher``) under ZeRO-3, and its class vectors (C, D).

    Rank 0 loads the tuned teacher into host memory and calls ``class_vectors`` (on rank 0
    only) with that :class:`~clipdistill.engine.tune_teacher.TunedTeacher`, its text side and
    prompts moved to ``device`` (e.g. ``tuned_teacher_class_vectors(t, names)``: (C, D)
    normalized); the result is broadcast. Every rank builds a :class:`PromptedImageTower` (the
    image tower and the tuned vision prompts, frozen), every parameter partitioned and filled
    from rank 0 as in :func:`build_sharded_teacher`. Its features equal
    ``load_tuned_teacher(path, precision="fp32").encode_image``: like the plain sharded
    teacher it runs in fp32.
    """
    import deepspeed

    rank = _require_process_group()
    header = read_tuned_header(path)  # on every rank: a refusal happens everywhere, before any collective
    model_name, kind = header["teacher"]["name"], header["learner"]["kind"]
    if kind != LEARNER_KIND:  # PromptSRC's image path is encode_deep_prompted over vision_prompts
        raise ConfigError(f"teacher.prompts {str(path)!r} holds a {kind!r} learner; the sharded teacher "
                          f"runs {LEARNER_KIND!r} prompts")
    state: dict[str, torch.Tensor] = {}
    tuned, scale, prompt_shape, make = None, 0.0, None, None
    if rank == 0:
        tuned = load_tuned_teacher(path, device="cpu", precision="fp32")
        state = {f"visual.{k}": v for k, v in _take_image_tower(tuned.model.visual).items()}
        prompts = tuned.learner.vision_prompts
        if prompts is not None:
            state["vision_prompts"] = prompts.detach().clone()
            prompt_shape = tuple(prompts.shape)
        scale = float(tuned.logit_scale)
        tuned.to(device)  # the text side and the prompts: the tower's weights were taken out

        def make() -> torch.Tensor:
            return class_vectors(tuned).float()
    vectors, (scale, prompt_shape) = _from_rank0(make, [scale, prompt_shape], device)
    del tuned, make  # rank 0's text side

    def prompted_tower() -> PromptedImageTower:
        module = PromptedImageTower(build_vision_tower(model_name), prompt_shape,
                                    before_ln_pre=prompt_placement_of(header) == "before_ln_pre")
        # ZeRO-3 gathers a module's own parameters when that module's forward runs. The prompted
        # path runs the tower's submodules but never ``visual.forward``, so the tower's direct
        # parameters (class_embedding, positional_embedding, proj) are gathered and released
        # with the wrapper's forward instead. (DeepSpeed 0.19's parameter getter would also find
        # them during an engine forward and gather them one by one; registering them is the
        # documented way, and does not depend on that heuristic.)
        for param in module.visual.parameters(recurse=False):
            deepspeed.zero.register_external_parameter(module, param)
        return module

    engine, module = _shard(prompted_tower, state, ds_config, what=f"tuned teacher {str(path)!r}:")
    return ShardedTeacher(engine, module.visual, scale, vectors.shape[1]), vectors
