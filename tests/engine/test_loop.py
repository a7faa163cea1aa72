"""The optimizer core every training loop shares (engine/training/loop.py)."""
from __future__ import annotations

import pytest
import torch

from clipdistill.engine.training.loop import OptimizerCore, make_optimizer
from clipdistill.engine.training.schedule import lr_at


def _problem(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w = torch.nn.Parameter(torch.randn(4, 3, generator=g))
    x = torch.randn(6, 4, generator=g)
    y = torch.randn(6, 3, generator=g)
    return w, x, y


def test_rates_follow_lr_at_and_accumulation_steps_every_n():
    w, x, y = _problem()
    opt = make_optimizer([w], name="sgd", lr=0.1, momentum=0.0)
    core = OptimizerCore(opt, [w], base_lr=0.1, total_steps=5, warmup_steps=2, grad_accum=3)
    seen = []
    for micro in range(15):
        seen.append(opt.param_groups[0]["lr"])
        stepped = core.backward(((x[micro % 6:micro % 6 + 1] @ w - y[micro % 6:micro % 6 + 1]) ** 2).sum())
        assert stepped == ((micro + 1) % 3 == 0)
    assert core.step == 5
    expected = [lr_at(s, base_lr=0.1, total_steps=5, warmup_steps=2, warmup_lr=None, schedule="cosine")
                for s in range(5)]
    assert seen == [r for r in expected for _ in range(3)]


def test_accumulated_step_equals_one_big_batch():
    w1, x, y = _problem()
    w2 = torch.nn.Parameter(w1.detach().clone())
    big = OptimizerCore(make_optimizer([w1], name="sgd", lr=0.05, momentum=0.0), [w1], base_lr=0.05,
                        total_steps=1, schedule="constant")
    big.backward(((x @ w1 - y) ** 2).mean())
    small = OptimizerCore(make_optimizer([w2], name="sgd", lr=0.05, momentum=0.0), [w2], base_lr=0.05,
                          total_steps=1, schedule="constant", grad_accum=2)
    small.backward(((x[:3] @ w2 - y[:3]) ** 2).mean())
    small.backward(((x[3:] @ w2 - y[3:]) ** 2).mean())
    torch.testing.assert_close(w1, w2)


def test_clip_and_before_step_run_once_per_optimizer_step():
    w, x, y = _problem()
    calls = []
    core = OptimizerCore(make_optimizer([w], name="adamw", lr=1.0), [w], base_lr=1.0, total_steps=4,
                         schedule="constant", clip_grad_norm=1e-3, grad_accum=2,
                         before_step=lambda: calls.append(float(w.grad.norm())))
    for _ in range(4):
        core.backward(((x @ w - y) ** 2).sum() * 100)
    assert len(calls) == 2 and all(c > 1e-3 for c in calls)  # called before clipping, on the summed grads
    assert w.grad is None  # zeroed after each step


def test_skip_advances_the_schedule_without_updating():
    w, _, _ = _problem()
    before = w.detach().clone()
    opt = make_optimizer([w], name="sgd", lr=0.1)
    core = OptimizerCore(opt, [w], base_lr=0.1, total_steps=4)
    core.skip()
    assert core.step == 1 and torch.equal(w, before)
    assert opt.param_groups[0]["lr"] == lr_at(1, base_lr=0.1, total_steps=4, warmup_steps=0, warmup_lr=None,
                                              schedule="cosine")


def test_bad_optimizer_and_accumulation_are_named():
    w, _, _ = _problem()
    with pytest.raises(ValueError, match="optimizer 'adam' is unknown; choose from sgd, adamw"):
        make_optimizer([w], name="adam", lr=0.1)
    with pytest.raises(ValueError, match="grad_accum must be >= 1"):
        OptimizerCore(make_optimizer([w], name="sgd", lr=0.1), [w], base_lr=0.1, total_steps=1, grad_accum=0)


@pytest.mark.parametrize("rate", [1e300, float("inf"), float("nan"), -1.0])
def test_a_learning_rate_past_float32_is_refused(rate):
    """Issue 18, item 9: lr = 1e300 made torch raise mid-step ("cannot be converted to type float")."""
    param = torch.zeros(2, requires_grad=True)
    with pytest.raises(ValueError, match="learning rate .* out of range.*float32"):
        OptimizerCore(make_optimizer([param], name="sgd", lr=1.0), [param], base_lr=rate, total_steps=2)
    with pytest.raises(ValueError, match="warm-up learning rate"):
        OptimizerCore(make_optimizer([param], name="sgd", lr=1.0), [param], base_lr=1.0, total_steps=2,
                      warmup_steps=1, warmup_lr=rate)
