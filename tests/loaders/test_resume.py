"""A resumed run yields exactly the batches of the uninterrupted one, also on another world size."""
from __future__ import annotations

import copy

import pytest
import torch

from clipdistill.loaders import ImageLoader, OutputSpec

G = 6
OUT = (OutputSpec("student", 16), OutputSpec("teacher", 24))


def _make(folder, cache_dir, backend, rank=0, world_size=1):
    return ImageLoader(folder, global_batch_size=G, outputs=OUT, backend=backend, rank=rank,
                       world_size=world_size, seed=9, cache_dir=cache_dir, workers=1)


def _global_steps(loaders, steps):
    """Run ``steps`` steps on every rank (each loader continues where it is); merge ranks per step."""
    iters = [iter(ld) for ld in loaders]
    merged = []
    while len(merged) < steps:
        parts = []
        for it in iters:
            try:
                parts.append(next(it))
            except StopIteration:
                parts.append(None)
        if all(p is None for p in parts):  # epoch boundary: every rank ends together
            iters = [iter(ld) for ld in loaders]
            continue
        assert all(p is not None for p in parts), "ranks fell out of step"
        assert len({(p.epoch, p.step) for p in parts}) == 1
        merged.append({
            "epoch": parts[0].epoch, "step": parts[0].step,
            "ids": torch.cat([p.sample_ids for p in parts]),
            "crops": torch.cat([p.crops for p in parts]),
            **{o.name: torch.cat([p.images[o.name] for p in parts]) for o in OUT},
        })
    return merged


def _assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert (x["epoch"], x["step"]) == (y["epoch"], y["step"])
        for key in ("ids", "crops", *(o.name for o in OUT)):
            assert torch.equal(x[key], y[key]), (x["epoch"], x["step"], key)


@pytest.mark.parametrize("world_before, world_after", [(1, 1), (2, 3), (3, 1)])
def test_resume_equals_uninterrupted(image_folder, cache_dir, cpu_backend, world_before, world_after):
    total = 7  # 4 steps per epoch (23 samples, G = 6): crosses an epoch boundary
    reference = _global_steps([_make(image_folder, cache_dir, cpu_backend)], total)

    before = [_make(image_folder, cache_dir, cpu_backend, r, world_before) for r in range(world_before)]
    first = _global_steps(before, 2)
    state = copy.deepcopy(before[0].state_dict())
    assert state["epoch"] == 0 and state["samples_consumed"] == 2 * G
    del before  # the interrupted run is gone; only the checkpointed state remains

    after = [_make(image_folder, cache_dir, cpu_backend, r, world_after) for r in range(world_after)]
    for ld in after:
        ld.load_state_dict(state)
    rest = _global_steps(after, total - 2)
    _assert_same(first + rest, reference)


def test_state_saved_at_the_end_of_an_epoch_resumes_at_the_next(image_folder, cache_dir):
    ld = _make(image_folder, cache_dir, "torch")
    for _ in ld:
        state = ld.state_dict()  # inside the loop, after the last batch: epoch 0, all consumed
    assert state["epoch"] == 0 and state["samples_consumed"] == 4 * G
    expected = next(iter(ld))  # epoch 1, step 0
    resumed = _make(image_folder, cache_dir, "torch")
    resumed.load_state_dict(state)
    got = next(iter(resumed))
    assert (got.epoch, got.step) == (1, 0) and torch.equal(got.sample_ids, expected.sample_ids)
    assert torch.equal(got.images["teacher"], expected.images["teacher"])


def test_incompatible_states_are_refused(image_folder, cache_dir):
    ld = _make(image_folder, cache_dir, "torch")
    state = ld.state_dict()
    with pytest.raises(ValueError, match="seed"):
        ImageLoader(image_folder, global_batch_size=G, outputs=OUT, backend="torch", seed=1,
                    cache_dir=cache_dir).load_state_dict(state)
    changed = dict(state, list_digest="0" * 16)
    with pytest.raises(ValueError, match="sample list changed"):
        ld.load_state_dict(changed)
    odd = dict(state, samples_consumed=G)
    with pytest.raises(ValueError, match="global batch size"):
        ImageLoader(image_folder, global_batch_size=4, outputs=OUT, backend="torch", seed=9,
                    cache_dir=cache_dir).load_state_dict(odd)
