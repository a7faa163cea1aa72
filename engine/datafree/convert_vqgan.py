"""``clipdistill convert-vqgan``: a taming-transformers VQGAN checkpoint to a diffusers VQModel folder.

The public VQGAN weights (taming-transformers' ``vqgan_imagenet_f16_1024``, ``_16384``, the
OpenImages f8 models, ...) are PyTorch Lightning ``.ckpt`` files: a pickle holding
``{"state_dict": {...}, "epoch", "global_step", "callbacks", "optimizer_states",
"lr_schedulers", maybe "hyper_parameters"}``. The generator of :mod:`.generators` reads a
diffusers ``VQModel`` folder (``config.json`` + ``diffusion_pytorch_model.safetensors``); this
module writes one.

Reading. Never a plain unpickle: ``torch.load(weights_only=True)`` (tensors, containers and
plain values only) with an explicit allowlist of inert stand-ins for the Lightning objects such
checkpoints carry (a ``ModelCheckpoint`` callback pickled as a dictionary key or as an
instance, ...: :data:`LIGHTNING_STUB_NAMES`). A stand-in keeps the state the pickle hands it as
plain data and has no other behaviour; nothing of Lightning is imported or called. Any other
global (``os.system``, an omegaconf config, a class of taming's) is refused with a one-line
error that names it. NumPy scalars and dtypes (Lightning pickles a callback's best score as one)
are allowed: they rebuild plain numbers.

Mapping (taming -> diffusers, written from the two architectures; it agrees with diffusers'
own LDM autoencoder conversion, which reads the same taming layout):

    encoder.down.{i}.block.{j}.*          encoder.down_blocks.{i}.resnets.{j}.*
    encoder.down.{i}.attn.{j}.*           encoder.down_blocks.{i}.attentions.{j}.*
    encoder.down.{i}.downsample.conv.*    encoder.down_blocks.{i}.downsamplers.0.conv.*
    decoder.up.{i}.block.{j}.*            decoder.up_blocks.{L-1-i}.resnets.{j}.*   (taming's up[0]
    decoder.up.{i}.attn.{j}.*             decoder.up_blocks.{L-1-i}.attentions.{j}.*  is the full-
    decoder.up.{i}.upsample.conv.*        decoder.up_blocks.{L-1-i}.upsamplers.0.conv.*  resolution one)
    {enc,dec}oder.mid.block_1 / attn_1 / block_2   mid_block.resnets.0 / attentions.0 / resnets.1
    {enc,dec}oder.norm_out                 conv_norm_out;  conv_in, conv_out unchanged
    resnet nin_shortcut                    conv_shortcut;  norm1/2, conv1/2 unchanged
    attention norm / q / k / v / proj_out  group_norm / to_q / to_k / to_v / to_out.0
                                           (1x1 convolution weights squeezed to linear ones)
    quantize.embedding, quant_conv, post_quant_conv   unchanged
    loss.*  (the discriminator and LPIPS of training)  dropped

The config is read from the shapes: ``ch`` (encoder.conv_in), ``ch_mult`` (each level's first
resnet), ``num_res_blocks``, the levels with attention (encoder and decoder each),
``z_channels``, ``embed_dim``, ``n_embed``; GroupNorm with 32 groups and eps 1e-6 and SiLU are
taming's fixed choices, as are diffusers' defaults here. Refused with what was found: a Gumbel
quantizer (``quantize.embed``/``quantize.proj``), a KL autoencoder (double z), a checkpoint
without VQGAN keys.
"""
from __future__ import annotations

import importlib
import json
import os
import pickle
import re
import shutil
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch
from safetensors.torch import save_file

from clipdistill.engine.datafree.generators import load_vqgan

# The Lightning objects that taming-era and later checkpoints are known to pickle (callbacks as
# dictionary keys or instances, the trainer-state enum), under both package names.
_LIGHTNING_CALLBACKS = (
    "callbacks.model_checkpoint.ModelCheckpoint",
    "callbacks.early_stopping.EarlyStopping",
    "callbacks.lr_monitor.LearningRateMonitor",
    "callbacks.progress.ProgressBar",
    "callbacks.progress.tqdm_progress.TQDMProgressBar",
    "trainer.states.TrainerFn",
    "trainer.states.RunningStage",
    "utilities.enums.LightningEnum",
)
LIGHTNING_STUB_NAMES: tuple[str, ...] = tuple(
    f"{package}.{name}" for package in ("pytorch_lightning", "lightning.pytorch") for name in _LIGHTNING_CALLBACKS
)


class LightningStub:
    """An inert stand-in for a pickled Lightning object: it keeps what the pickle gives it as data.

    ``lightning_name`` says which global it stands for; ``args`` and ``state`` are what the
    pickle passed to ``__new__`` and ``__setstate__`` (tensors, numbers, strings, containers:
    the weights-only unpickler builds nothing else).
    """

    lightning_name = ""

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        obj.args, obj.state = args, None
        return obj

    def __init__(self, *args, **kwargs):  # a REDUCE-style pickle "calls" the class: keep its arguments only
        pass

    def __setstate__(self, state) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"<inert stand-in for {self.lightning_name}>"


def _stubs() -> list[tuple[type, str]]:
    return [(type(name.rsplit(".", 1)[1], (LightningStub,), {"lightning_name": name, "__module__": __name__}), name)
            for name in LIGHTNING_STUB_NAMES]


_STUBS = _stubs()
_NUMPY_DATA = [np.dtype, type(np.dtype(np.float64)), type(np.dtype(np.float32)), type(np.dtype(np.int64))]


def _numpy_scalar():
    # numpy 1.x and 2.x name the scalar rebuild function differently; allow the one present.
    for module in ("numpy._core.multiarray", "numpy.core.multiarray"):
        try:
            return (importlib.import_module(module).scalar, f"{module}.scalar")
        except (ImportError, AttributeError):
            continue
    return None


def read_lightning_checkpoint(path: Union[str, Path]) -> dict:
    """The checkpoint's top-level dict, read with the weights-only unpickler and the allowlist.

    Raises ValueError naming the refused global when the pickle holds anything else.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} not found")
    allow: list[Any] = [*_STUBS, *_NUMPY_DATA]
    scalar = _numpy_scalar()
    if scalar is not None:
        allow.append(scalar)
    try:
        with torch.serialization.safe_globals(allow):
            data = torch.load(path, map_location="cpu", weights_only=True, mmap=False)
    except pickle.UnpicklingError as error:
        text = str(error)
        found = re.search(r"GLOBAL (\S+)", text) or re.search(r"unrecognized function (.+?)(?: which|$)", text, re.M)
        what = found.group(1) if found else text.splitlines()[0]
        raise ValueError(
            f"{path}: refused to load: its pickle needs {what}, which is neither plain data nor one of the "
            f"inert Lightning stand-ins (nothing was executed)"
        ) from None
    except (RuntimeError, EOFError) as error:
        raise ValueError(f"{path}: not a readable PyTorch checkpoint ({str(error).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a checkpoint dict, found a {type(data).__name__}")
    return data


def vqgan_state_dict(checkpoint: dict) -> dict[str, torch.Tensor]:
    """The VQGAN's tensors from a Lightning checkpoint (``state_dict``) or a bare state dict."""
    state = checkpoint.get("state_dict", checkpoint)
    if not isinstance(state, dict):
        raise ValueError("the checkpoint's state_dict is not a dict")
    for prefix in ("first_stage_model.", "model."):  # a VQGAN inside a larger model (taming's transformer)
        if not any(k.startswith("encoder.") for k in state) and any(k.startswith(prefix + "encoder.") for k in state):
            state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor) and not k.startswith("loss.")}


def _levels(state: dict, pattern: str) -> list[int]:
    return sorted({int(m.group(1)) for k in state if (m := re.match(pattern, k))})


def infer_config(state: dict[str, torch.Tensor], sample_size: int = 256) -> dict:
    """diffusers VQModel constructor arguments for a taming state dict (shapes only)."""
    if "quantize.embed.weight" in state or any(k.startswith("quantize.proj.") for k in state):
        raise ValueError("this is a Gumbel-quantized VQGAN (quantize.embed/quantize.proj): diffusers' VQModel "
                         "has no Gumbel quantizer; use a VQGAN with a plain codebook (quantize.embedding)")
    needed = ("encoder.conv_in.weight", "encoder.conv_out.weight", "decoder.conv_in.weight",
              "decoder.conv_out.weight", "quantize.embedding.weight", "quant_conv.weight", "post_quant_conv.weight")
    missing = [k for k in needed if k not in state]
    if missing:
        raise ValueError(f"not a taming-transformers VQGAN state dict: missing {missing}")
    levels = _levels(state, r"encoder\.down\.(\d+)\.")
    up_levels = _levels(state, r"decoder\.up\.(\d+)\.")
    if levels != list(range(len(levels))) or up_levels != levels:
        raise ValueError(f"encoder levels {levels} and decoder levels {up_levels} do not form one 0..L-1 range")
    blocks = _levels(state, r"encoder\.down\.0\.block\.(\d+)\.")
    channels = [int(state[f"encoder.down.{i}.block.0.conv1.weight"].shape[0]) for i in levels]
    z_channels = int(state["encoder.conv_out.weight"].shape[0])
    if int(state["decoder.conv_in.weight"].shape[1]) != z_channels:
        raise ValueError(f"encoder output {z_channels} channels but decoder input "
                         f"{int(state['decoder.conv_in.weight'].shape[1])}: a KL (double z) autoencoder, not a VQGAN")
    encoder_attn = set(_levels(state, r"encoder\.down\.(\d+)\.attn\."))
    decoder_attn = set(_levels(state, r"decoder\.up\.(\d+)\.attn\."))
    n_levels = len(levels)
    return {
        "in_channels": int(state["encoder.conv_in.weight"].shape[1]),
        "out_channels": int(state["decoder.conv_out.weight"].shape[0]),
        "down_block_types": ["AttnDownEncoderBlock2D" if i in encoder_attn else "DownEncoderBlock2D" for i in levels],
        # diffusers' up_blocks[k] is taming's up[L-1-k]
        "up_block_types": ["AttnUpDecoderBlock2D" if n_levels - 1 - k in decoder_attn else "UpDecoderBlock2D"
                           for k in range(n_levels)],
        "block_out_channels": channels,
        "layers_per_block": len(blocks),
        "act_fn": "silu",
        "latent_channels": z_channels,
        "sample_size": int(sample_size),
        "num_vq_embeddings": int(state["quantize.embedding.weight"].shape[0]),
        "vq_embed_dim": int(state["quantize.embedding.weight"].shape[1]),
        "norm_num_groups": 32,
    }


_RESNET = {"nin_shortcut": "conv_shortcut"}
_ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def _inner(rest: str, attention: bool) -> str:
    """Rename a resnet's or an attention block's own layer (``rest`` = 'layer.weight')."""
    layer, _, param = rest.rpartition(".")
    table = _ATTENTION if attention else _RESNET
    return f"{table.get(layer, layer)}.{param}"


def taming_to_diffusers(state: dict[str, torch.Tensor], n_levels: int) -> dict[str, torch.Tensor]:
    """Rename every tensor of a taming VQGAN state dict to diffusers' VQModel layout."""
    out: dict[str, torch.Tensor] = {}
    mid = {"block_1": ("resnets.0", False), "attn_1": ("attentions.0", True), "block_2": ("resnets.1", False)}
    for key, tensor in state.items():
        new, attention = None, False
        if m := re.fullmatch(r"(encoder|decoder)\.(conv_in|conv_out)\.(weight|bias)", key):
            new = key
        elif m := re.fullmatch(r"(encoder|decoder)\.norm_out\.(weight|bias)", key):
            new = f"{m.group(1)}.conv_norm_out.{m.group(2)}"
        elif m := re.fullmatch(r"(quant_conv|post_quant_conv)\.(weight|bias)|quantize\.embedding\.weight", key):
            new = key
        elif m := re.fullmatch(r"(encoder|decoder)\.mid\.(block_1|attn_1|block_2)\.(.+)", key):
            target, attention = mid[m.group(2)]
            new = f"{m.group(1)}.mid_block.{target}.{_inner(m.group(3), attention)}"
        elif m := re.fullmatch(r"encoder\.down\.(\d+)\.(block|attn)\.(\d+)\.(.+)", key):
            attention = m.group(2) == "attn"
            kind = "attentions" if attention else "resnets"
            new = f"encoder.down_blocks.{m.group(1)}.{kind}.{m.group(3)}.{_inner(m.group(4), attention)}"
        elif m := re.fullmatch(r"encoder\.down\.(\d+)\.downsample\.conv\.(weight|bias)", key):
            new = f"encoder.down_blocks.{m.group(1)}.downsamplers.0.conv.{m.group(2)}"
        elif m := re.fullmatch(r"decoder\.up\.(\d+)\.(block|attn)\.(\d+)\.(.+)", key):
            attention = m.group(2) == "attn"
            kind = "attentions" if attention else "resnets"
            block = n_levels - 1 - int(m.group(1))
            new = f"decoder.up_blocks.{block}.{kind}.{m.group(3)}.{_inner(m.group(4), attention)}"
        elif m := re.fullmatch(r"decoder\.up\.(\d+)\.upsample\.conv\.(weight|bias)", key):
            new = f"decoder.up_blocks.{n_levels - 1 - int(m.group(1))}.upsamplers.0.conv.{m.group(2)}"
        if new is None:
            raise ValueError(f"unexpected key {key!r} in the VQGAN state dict (not part of taming's VQModel)")
        if attention and new.endswith(("to_q.weight", "to_k.weight", "to_v.weight", "to_out.0.weight")):
            tensor = tensor.reshape(tensor.shape[0], tensor.shape[1])  # a 1x1 convolution is a linear map
        out[new] = tensor.contiguous()
    return out


def _sample_size(checkpoint: dict) -> int:
    """ddconfig.resolution from plain-dict hyper_parameters, else taming's usual 256."""
    hp = checkpoint.get("hyper_parameters")
    try:
        return int(hp["ddconfig"]["resolution"])
    except (TypeError, KeyError, ValueError):
        return 256


def convert_vqgan(checkpoint_path: Union[str, Path], out_dir: Union[str, Path]) -> dict:
    """Convert a taming-transformers VQGAN ``.ckpt`` into a diffusers VQModel folder at ``out_dir``.

    The folder is written, then loaded back with :func:`~.generators.load_vqgan` and checked to
    hold every tensor exactly. Returns a summary (config, tensors, dropped keys).
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} exists and is not empty: choose a new --out folder")
    checkpoint = read_lightning_checkpoint(checkpoint_path)
    raw = checkpoint.get("state_dict", checkpoint)
    state = vqgan_state_dict(checkpoint)
    config = infer_config(state, _sample_size(checkpoint))
    converted = taming_to_diffusers(state, len(config["block_out_channels"]))
    # Written beside the target and renamed into place once it loads back exactly: a failed
    # conversion leaves no folder that --vqgan could pick up.
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    work = out_dir.parent / f".{out_dir.name}.tmp{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    try:
        model_config = {"_class_name": "VQModel", **config}
        (work / "config.json").write_text(json.dumps(model_config, indent=1) + "\n", encoding="utf-8")
        save_file(converted, str(work / "diffusion_pytorch_model.safetensors"))
        loaded = load_vqgan(work).state_dict()
        absent = sorted(set(loaded) - set(converted))
        extra = sorted(set(converted) - set(loaded))
        different = [k for k in converted
                     if k in loaded and not torch.equal(loaded[k].to(converted[k].dtype), converted[k])]
        if absent or extra or different:
            raise RuntimeError(f"conversion check failed: not written {absent[:5]}, not used {extra[:5]}, "
                               f"changed on load {different[:5]}")
        if out_dir.exists():
            out_dir.rmdir()  # empty (checked above)
        os.replace(work, out_dir)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    dropped = sorted(k for k in raw if k not in state) if isinstance(raw, dict) else []
    return {"out": str(out_dir), "config": config, "tensors": len(converted),
            "dropped": len(dropped), "dropped_prefixes": sorted({k.split(".")[0] for k in dropped})}
