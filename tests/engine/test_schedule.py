"""The learning-rate schedule (engine/training/schedule.py)."""
from __future__ import annotations

import pytest

from clipdistill.engine.training.schedule import lr_at


def test_lr_schedule_warmup_then_cosine():
    kw = dict(base_lr=0.1, total_steps=10, warmup_steps=2, warmup_lr=1e-5, schedule="cosine")
    lrs = [lr_at(s, **kw) for s in range(10)]
    assert lrs[:2] == [1e-5, 1e-5] and lrs[2] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[2:], lrs[3:])) and lrs[-1] < 0.01
    assert lr_at(0, **{**kw, "warmup_lr": None}) == pytest.approx(0.05)
    assert lr_at(5, **{**kw, "schedule": "constant"}) == 0.1
