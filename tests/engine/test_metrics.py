"""Metrics (engine/distill/metrics.py): the base/novel split, the harmonic mean, the top-1 and agreement
tallies, each against a direct computation."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clipdistill.engine.distill.metrics import (AgreementTally, TopOneTally, agreement_kl, base_novel_split,
                                               harmonic_mean)


@pytest.mark.parametrize("num_classes, base, novel", [(2, [0], [1]), (5, [0, 1, 2], [3, 4]),
                                                      (6, [0, 1, 2], [3, 4, 5]), (7, [0, 1, 2, 3], [4, 5, 6])])
def test_base_novel_split_is_ceil_half_in_name_order(num_classes, base, novel):
    assert base_novel_split(num_classes) == (base, novel)


def test_base_novel_split_needs_two_classes():
    with pytest.raises(ValueError, match="at least 2 classes"):
        base_novel_split(1)


@pytest.mark.parametrize("base, novel, expected", [(80.0, 60.0, 2 * 80 * 60 / 140), (86.96, 80.73, 83.73),
                                                   (50.0, 50.0, 50.0), (0.0, 70.0, 0.0), (0.0, 0.0, 0.0)])
def test_harmonic_mean(base, novel, expected):
    # (86.96, 80.73) -> 83.73 is PromptKD's published 11-dataset average (shared/PAPERS.md).
    assert harmonic_mean(base, novel) == pytest.approx(expected, abs=5e-3)


@pytest.mark.parametrize("num_classes", [2, 7, 13])
@pytest.mark.parametrize("batches", [1, 3])
def test_top1_tally_equals_direct_computation(num_classes, batches):
    generator = torch.Generator().manual_seed(num_classes * 10 + batches)
    logits = [torch.randn(b, num_classes, generator=generator) for b in (1, 9, 4)[:batches]]
    labels = [torch.randint(0, num_classes, (x.shape[0],), generator=generator) for x in logits]
    tally = TopOneTally(num_classes, base_to_novel=True)
    for x, y in zip(logits, labels):
        tally.update(x, y)
    got = tally.result()

    x, y = torch.cat(logits).double().numpy(), torch.cat(labels).numpy()
    m = math.ceil(num_classes / 2)
    top1 = 100.0 * np.mean(x.argmax(1) == y)
    base_rows, novel_rows = y < m, y >= m
    base = 100.0 * np.mean(x[base_rows][:, :m].argmax(1) == y[base_rows]) if base_rows.any() else float("nan")
    novel = 100.0 * np.mean(x[novel_rows][:, m:].argmax(1) + m == y[novel_rows]) if novel_rows.any() else float("nan")
    assert got["top1"] == pytest.approx(top1)
    assert got["images"] == len(y)
    assert got["base_images"] == base_rows.sum() and got["novel_images"] == novel_rows.sum()
    for key, value in (("base", base), ("novel", novel)):
        assert (math.isnan(got[key]) and math.isnan(value)) or got[key] == pytest.approx(value)
    if not (math.isnan(base) or math.isnan(novel)):
        assert got["hm"] == pytest.approx(2 * base * novel / (base + novel) if base + novel else 0.0)


def test_top1_tally_restricts_each_half_to_its_own_classes():
    # Image of class 0 (base) whose best class overall is 3 (novel): wrong overall, right among the base.
    logits = torch.tensor([[2.0, 1.0, 0.0, 5.0, 0.0], [0.0, 0.0, 9.0, 1.0, 3.0]])
    tally = TopOneTally(5, base_to_novel=True)
    tally.update(logits, torch.tensor([0, 4]))
    result = tally.result()
    assert result["top1"] == 0.0
    assert result["base"] == 100.0 and result["novel"] == 100.0 and result["hm"] == 100.0


def test_agreement_kl_equals_float64_reference():
    generator = torch.Generator().manual_seed(3)
    t, s = torch.randn(11, 7, generator=generator) * 4, torch.randn(11, 7, generator=generator) * 4
    got = agreement_kl(t, s)
    pt, ps = F.softmax(t.double(), -1), F.softmax(s.double(), -1)
    kl = (pt * (pt.log() - ps.log())).sum(-1).mean().item()
    assert got["kl"] == pytest.approx(kl, rel=1e-5)
    assert got["agreement"] == pytest.approx(100.0 * (t.argmax(-1) == s.argmax(-1)).double().mean().item())
    assert got["images"] == 11
    same = agreement_kl(t, t.clone())
    assert same["agreement"] == 100.0 and abs(same["kl"]) < 1e-6
    tally = AgreementTally()
    tally.update(t[:4], s[:4])
    tally.update(t[4:], s[4:])
    assert tally.result()["kl"] == pytest.approx(got["kl"], rel=1e-6)
    assert np.isfinite(got["kl"])
    # A mask leaves padding rows out (whatever they hold); all_reduce is a no-op in one process.
    mask = torch.tensor([True, False, True, True, False, True, True, True, True, False, True])
    padded = torch.where(mask[:, None], s, torch.full_like(s, float("nan")))
    masked = AgreementTally()
    masked.update(t, padded, mask)
    masked.all_reduce(torch.device("cpu"))
    real = agreement_kl(t[mask], s[mask])
    assert masked.result()["images"] == 8
    assert masked.result()["kl"] == pytest.approx(real["kl"], rel=1e-6)
    assert masked.result()["agreement"] == pytest.approx(real["agreement"])
    with pytest.raises(ValueError, match=r"mask must be \(11,\), got \(3,\)"):
        masked.update(t, s, mask[:3])
