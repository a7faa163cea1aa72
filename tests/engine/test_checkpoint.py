"""Checkpoints (engine/training/checkpoint.py): atomic safetensors files, pruning, refusals, RNG state."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from clipdistill.engine.training import checkpoint as ckpt


def test_checkpoint_roundtrip_is_atomic_and_pruned(tmp_path):
    state = {"a": torch.arange(3.0), "nested": {"b": [1, 2.5, None, "x"], 3: torch.ones(2, dtype=torch.int64)},
             "t": (1, float("inf")), "np": np.arange(4, dtype=np.int32)}
    for step in (1, 2, 3):
        ckpt.save_checkpoint(tmp_path, step, state, keep_last=2)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [2, 3]
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]
    back = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path))
    assert torch.equal(back["a"], state["a"]) and back["nested"]["b"] == [1, 2.5, None, "x"]
    assert torch.equal(back["nested"][3], state["nested"][3]) and back["t"] == (1, float("inf"))
    assert np.array_equal(back["np"], state["np"])


def test_checkpoint_refuses_garbage_and_objects(tmp_path):
    (tmp_path / "step-000000001.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ckpt.CheckpointError, match="unreadable"):
        ckpt.load_checkpoint(tmp_path / "step-000000001.safetensors")
    with pytest.raises(TypeError, match="cannot store object"):
        ckpt.save_checkpoint(tmp_path, 2, {"bad": object()})


def test_rng_state_roundtrip():
    import random

    state = ckpt.rng_state()
    first = (torch.rand(3), random.random(), np.random.rand())
    ckpt.set_rng_state(state)
    second = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(first[0], second[0]) and first[1:] == second[1:]
