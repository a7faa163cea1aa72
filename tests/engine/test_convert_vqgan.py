"""``clipdistill convert-vqgan``: a taming-transformers checkpoint, built here, to a diffusers VQModel.

The test writes a tiny random VQModel's tensors under taming's names (its own table, from
taming's Encoder/Decoder: ``up[0]`` is the full-resolution level, attention only where the
resolution is listed, 1x1-convolution attention weights) into a Lightning-like ``.ckpt`` that
pickles a ``ModelCheckpoint`` class and instance from a stand-in ``pytorch_lightning`` module,
converts it, and compares the decoder's outputs exactly. A pickle that names anything else is
refused before anything runs.
"""
from __future__ import annotations

import os
import sys
import types

import pytest
import torch

from clipdistill.engine.datafree import convert_vqgan as cv
from clipdistill.engine.datafree import generators

pytestmark = pytest.mark.skipif(not generators.diffusers_available(),
                                reason="diffusers is not installed (pip install 'clipdistill[datafree]')")

# Two levels (channels 32, 64: taming's GroupNorm has 32 groups), attention at the low-resolution level.
CONFIG = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "AttnDownEncoderBlock2D"),
              up_block_types=("AttnUpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(32, 64),
              layers_per_block=1, latent_channels=4, num_vq_embeddings=16, vq_embed_dim=4, norm_num_groups=32)


def _tiny_model():
    torch.manual_seed(0)
    model = generators.random_vqgan(CONFIG).eval()
    with torch.no_grad():  # GroupNorm starts at 1/0: move everything so a swapped name shows
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def _taming_name(key: str, levels: int) -> str:
    """diffusers' name -> taming's (the test's own table)."""
    resnet = {"conv_shortcut": "nin_shortcut"}
    attention = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    part, _, rest = key.partition(".")
    if part not in ("encoder", "decoder"):
        return key
    for old, new in (("conv_norm_out", "norm_out"), ("mid_block.resnets.0", "mid.block_1"),
                     ("mid_block.attentions.0", "mid.attn_1"), ("mid_block.resnets.1", "mid.block_2")):
        if rest.startswith(old):
            rest = new + rest[len(old):]
    bits = rest.split(".")
    if bits[0] in ("down_blocks", "up_blocks"):
        level = int(bits[1]) if bits[0] == "down_blocks" else levels - 1 - int(bits[1])
        head = "down" if bits[0] == "down_blocks" else "up"
        kind = {"resnets": "block", "attentions": "attn", "downsamplers": "downsample", "upsamplers": "upsample"}[bits[2]]
        if kind in ("downsample", "upsample"):
            rest = f"{head}.{level}.{kind}.{'.'.join(bits[4:])}"
        else:
            rest = f"{head}.{level}.{kind}.{bits[3]}.{'.'.join(bits[4:])}"
    table = attention if ".attn" in rest else resnet
    layer, _, param = rest.rpartition(".")
    for old, new in table.items():
        if layer.endswith("." + old):
            layer = layer[: -len(old)] + new
    return f"{part}.{layer}.{param}"


def _taming_state(model) -> dict:
    levels = len(CONFIG["block_out_channels"])
    state = {}
    for key, value in model.state_dict().items():
        name = _taming_name(key, levels)
        if ".attn" in name and name.rsplit(".", 2)[-2] in ("q", "k", "v", "proj_out") and name.endswith("weight"):
            value = value[:, :, None, None]  # taming's attention uses 1x1 convolutions
        state[name] = value.clone()
    return state


def _lightning_module(monkeypatch, sentinel):
    """A stand-in pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint that pickles under that path."""

    class ModelCheckpoint:
        def __init__(self):
            self.monitor, self.best_model_path = "val/rec_loss", "logs/last.ckpt"
            self.best_model_score = torch.tensor(0.25)

        def __setstate__(self, state):  # would show that the real class ran on load
            sentinel.write_text("ModelCheckpoint.__setstate__ ran")
            self.__dict__.update(state)

    names = ["pytorch_lightning", "pytorch_lightning.callbacks", "pytorch_lightning.callbacks.model_checkpoint"]
    for name in names:
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    ModelCheckpoint.__module__ = names[-1]
    ModelCheckpoint.__qualname__ = "ModelCheckpoint"
    sys.modules[names[-1]].ModelCheckpoint = ModelCheckpoint
    return ModelCheckpoint


def test_taming_layout_of_the_test_matches_taming(tmp_path):
    # Facts of taming's model.py the conversion depends on (so the test's table is not the converter's mirror).
    state = _taming_state(_tiny_model())
    assert state["decoder.up.0.block.0.conv1.weight"].shape[0] == 32  # up[0]: full resolution, ch * ch_mult[0]
    assert state["decoder.up.1.block.1.conv1.weight"].shape[0] == 64
    assert "decoder.up.1.upsample.conv.weight" in state and not any(k.startswith("decoder.up.0.upsample") for k in state)
    assert "encoder.down.0.downsample.conv.weight" in state and not any(k.startswith("encoder.down.1.downsample") for k in state)
    assert "encoder.down.1.attn.0.q.weight" in state and "decoder.up.1.attn.1.proj_out.weight" in state
    assert not any(k.startswith(("encoder.down.0.attn", "decoder.up.0.attn")) for k in state)
    assert state["encoder.mid.attn_1.k.weight"].shape == (64, 64, 1, 1)
    assert "encoder.down.0.block.0.nin_shortcut.weight" not in state  # 32 -> 32
    assert "encoder.down.1.block.0.nin_shortcut.weight" in state  # 32 -> 64
    assert "decoder.norm_out.weight" in state and "quantize.embedding.weight" in state


def test_lightning_checkpoint_converts_and_decodes_exactly(tmp_path, monkeypatch):
    model = _tiny_model()
    sentinel = tmp_path / "ran.txt"
    ModelCheckpoint = _lightning_module(monkeypatch, sentinel)
    state = _taming_state(model)
    state["loss.discriminator.main.0.weight"] = torch.randn(8, 3, 4, 4)  # training-only: dropped
    ckpt = tmp_path / "last.ckpt"
    torch.save({"epoch": 3, "global_step": 1200, "pytorch-lightning_version": "1.0.8", "state_dict": state,
                "callbacks": {ModelCheckpoint: {"best_model_score": torch.tensor(0.25), "best_model_path": "x"}},
                "checkpoint_callback": ModelCheckpoint(),
                "optimizer_states": [{"state": {}, "param_groups": [{"lr": 4.5e-6, "params": [0, 1]}]}],
                "lr_schedulers": []}, ckpt)

    summary = cv.convert_vqgan(ckpt, tmp_path / "vq")
    assert not sentinel.exists(), "the pickled class itself was run"
    assert not list(tmp_path.glob(".vq.tmp*")), "the work folder was left behind"
    assert summary["dropped_prefixes"] == ["loss"] and summary["tensors"] == len(model.state_dict())
    assert summary["config"]["down_block_types"] == list(CONFIG["down_block_types"])
    assert summary["config"]["up_block_types"] == list(CONFIG["up_block_types"])
    loaded = generators.load_vqgan(tmp_path / "vq")
    torch.manual_seed(1)
    latents, images = torch.randn(2, 4, 8, 8), torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        assert torch.equal(loaded.decode(latents).sample, model.decode(latents).sample)
        assert torch.equal(loaded(images).sample, model(images).sample)
    # The generator takes the folder as --vqgan does.
    assert generators.build_generator("vqgan", 16, vqgan=tmp_path / "vq").latent_side == 8

    data = cv.read_lightning_checkpoint(ckpt)
    (key,) = data["callbacks"]
    assert isinstance(data["checkpoint_callback"], cv.LightningStub) and issubclass(key, cv.LightningStub)
    assert key.lightning_name == "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"
    assert data["checkpoint_callback"].state["monitor"] == "val/rec_loss"
    with pytest.raises(FileExistsError, match="not empty"):
        cv.convert_vqgan(ckpt, tmp_path / "vq")


class _Exploit:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"echo pwned > {self.path}",))


def test_a_pickle_that_would_run_code_is_refused_without_running_it(tmp_path):
    sentinel = tmp_path / "pwned.txt"
    ckpt = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"encoder.conv_in.weight": torch.zeros(1)}, "callbacks": _Exploit(sentinel)}, ckpt)
    with pytest.raises(ValueError, match=r"system.*nothing was executed") as info:
        cv.convert_vqgan(ckpt, tmp_path / "out")
    assert "\n" not in str(info.value)
    assert not sentinel.exists() and not (tmp_path / "out").exists()


def test_other_unknown_globals_and_wrong_layouts_are_named(tmp_path):
    ckpt = tmp_path / "gumbel.ckpt"
    torch.save({"state_dict": {"quantize.embed.weight": torch.zeros(4, 2), "encoder.conv_in.weight": torch.zeros(1)}}, ckpt)
    with pytest.raises(ValueError, match="Gumbel"):
        cv.convert_vqgan(ckpt, tmp_path / "a")
    torch.save({"state_dict": {"encoder.conv_in.weight": torch.zeros(1)}, "hparams": types.SimpleNamespace(a=1)}, ckpt)
    with pytest.raises(ValueError, match="types.SimpleNamespace"):
        cv.read_lightning_checkpoint(ckpt)
    with pytest.raises(FileNotFoundError):
        cv.read_lightning_checkpoint(tmp_path / "missing.ckpt")


def test_convert_vqgan_command(tmp_path, monkeypatch, capsys):
    import json

    from clipdistill.engine.cli import main

    state = _taming_state(_tiny_model())
    torch.save({"state_dict": state}, tmp_path / "bare.ckpt")
    assert main(["convert-vqgan", str(tmp_path / "bare.ckpt"), "--out-dir", str(tmp_path / "vq")]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["config"]["num_vq_embeddings"] == 16
    assert main(["convert-vqgan", str(tmp_path / "nothing.ckpt"), "--out-dir", str(tmp_path / "vq2")]) == 2
    assert capsys.readouterr().err.startswith("clipdistill convert-vqgan: error: CHECKPOINT: ")
    assert main(["convert-vqgan", str(tmp_path / "bare.ckpt"), "--out-dir", str(tmp_path / "vq")]) == 2  # exists
    assert capsys.readouterr().err.startswith("clipdistill convert-vqgan: error: --out-dir: ")
