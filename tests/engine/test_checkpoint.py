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


def test_pruning_keeps_other_runs_and_the_newest_of_this_one(tmp_path):
    """Issue 18, item 2: keep_last counts and removes the current run's checkpoints only, never the new one."""
    state = {"x": torch.randn(3)}
    for step in (4, 6):
        ckpt.save_checkpoint(tmp_path, step, state, keep_last=3, run_id="first")
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [4, 6]  # fewer than keep_last: all stay
    ckpt.save_checkpoint(tmp_path, 2, state, keep_last=1, run_id="second")  # older step, newer run
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [2, 4, 6]
    assert [ckpt.read_checkpoint_run_id(p) for _, p in ckpt.list_checkpoints(tmp_path)] == ["second", "first",
                                                                                              "first"]
    ckpt.save_checkpoint(tmp_path, 3, state, keep_last=1, run_id="second")
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [3, 4, 6]
    # A file whose header cannot be read is nobody's: never pruned.
    (tmp_path / "step-000000001.safetensors").write_bytes(b"\x00" * 16)
    ckpt.save_checkpoint(tmp_path, 5, state, keep_last=1, run_id="second")
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [1, 4, 5, 6]


def test_garbled_tensor_bytes_are_refused_by_the_checksum(tmp_path):
    path = ckpt.save_checkpoint(tmp_path, 1, {"x": torch.randn(64), "n": torch.arange(5)}, run_id="r")
    raw = bytearray(path.read_bytes())
    raw[-20] ^= 0xFF  # inside the tensor data: the header still parses, the values are wrong
    path.write_bytes(bytes(raw))
    with pytest.raises(ckpt.CheckpointError, match="corrupt: its tensors do not match the checksum"):
        ckpt.load_checkpoint(path)
    path.write_bytes(bytes(raw[:len(raw) // 2]))  # truncated
    with pytest.raises(ckpt.CheckpointError, match="unreadable"):
        ckpt.load_checkpoint(path)
