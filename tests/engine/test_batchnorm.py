"""Row-masked, synchronizable batch norm (engine/batchnorm.py) and the exact cross-rank gradient
(distributed.row_share, distributed.sum_gradients): padding never enters batch statistics, and
2 ranks with unequal real rows give the single process's outputs, statistics and gradients.

The 2-process test runs two plain gloo processes (no DeepSpeed, no launcher): a few seconds.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from clipdistill.engine.parallel.batchnorm import RowBatchNorm2d, synchronize
from clipdistill.engine.prompts import ConvBNProjector

_spec = importlib.util.spec_from_file_location("_gloo", Path(__file__).with_name("_gloo.py"))
_gloo = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_gloo)


def _pair(channels: int = 6, momentum=0.1, affine: bool = True) -> tuple[RowBatchNorm2d, nn.BatchNorm2d]:
    torch.manual_seed(0)
    ours = RowBatchNorm2d(channels, momentum=momentum, affine=affine)
    plain = nn.BatchNorm2d(channels, momentum=momentum, affine=affine)
    if affine:
        with torch.no_grad():
            ours.weight.uniform_(0.5, 1.5)
            ours.bias.uniform_(-0.5, 0.5)
    plain.load_state_dict(ours.state_dict())
    return ours, plain


def test_without_a_mask_it_is_torch_batch_norm():
    ours, plain = _pair()
    x = torch.randn(5, 6, 3, 3) * 3 + 2
    assert torch.equal(ours(x), plain(x))
    for key, value in plain.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key
    ours.eval(), plain.eval()
    mask = torch.tensor([True, False, True, True, False])
    assert torch.equal(ours(x, mask), plain(x)), "eval mode uses the running statistics, mask or not"


@pytest.mark.parametrize("momentum", [0.1, None])
def test_mask_takes_statistics_from_the_real_rows_only(momentum):
    ours, plain = _pair(momentum=momentum)
    x = torch.randn(7, 6, 2, 2) * 2 - 1
    mask = torch.tensor([True, False, True, True, False, False, True])
    for _ in range(3):  # the running statistics over several steps (cumulative when momentum is None)
        padded = x.clone().requires_grad_(True)
        real = x[mask].clone().requires_grad_(True)
        got, want = ours(padded, mask), plain(real)
        torch.testing.assert_close(got[mask], want, rtol=1e-5, atol=1e-5)
        assert torch.isfinite(got).all()
        # A loss over the real rows: the same gradients, and none into the padding rows.
        probe = torch.randn_like(want)
        (got[mask] * probe).sum().backward()
        (want * probe).sum().backward()
        torch.testing.assert_close(padded.grad[mask], real.grad, rtol=1e-4, atol=1e-5)
        assert torch.count_nonzero(padded.grad[~mask]) == 0
        x = x * 0.7 + 0.3
    for key in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(ours, key), getattr(plain, key), rtol=1e-5, atol=1e-6, msg=key)
    torch.testing.assert_close(ours.weight.grad, plain.weight.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours.bias.grad, plain.bias.grad, rtol=1e-4, atol=1e-5)


def test_padding_values_do_not_matter():
    ours, _ = _pair()
    x = torch.randn(4, 6, 1, 1)
    mask = torch.tensor([True, True, False, True])
    y1 = ours(x, mask)
    stats1 = ours.running_mean.clone(), ours.running_var.clone()
    ours, _ = _pair()
    x2 = x.clone()
    x2[2] = 1e4  # a wild padding row
    y2 = ours(x2, mask)
    assert torch.equal(y1[mask], y2[mask])
    assert torch.equal(ours.running_mean, stats1[0]) and torch.equal(ours.running_var, stats1[1])


def test_a_batch_of_padding_only_leaves_the_running_statistics_alone():
    ours, _ = _pair()
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    y = ours(torch.zeros(3, 6, 1, 1), torch.zeros(3, dtype=torch.bool))
    assert torch.isfinite(y).all()
    for key, value in before.items():
        assert torch.equal(ours.state_dict()[key], value), key


def test_a_mask_of_the_wrong_shape_is_refused():
    ours, _ = _pair()
    with pytest.raises(ValueError, match=r"row_mask must be \(4,\).*got \(3,\)"):
        ours(torch.randn(4, 6, 1, 1), torch.ones(3, dtype=torch.bool))


def test_projector_passes_the_mask_and_keeps_its_checkpoint_names():
    torch.manual_seed(1)
    projector = ConvBNProjector(8, 5, 7)
    assert set(projector.state_dict()) == {
        "layers.0.weight", "layers.0.bias", "layers.1.weight", "layers.1.bias", "layers.1.running_mean",
        "layers.1.running_var", "layers.1.num_batches_tracked", "layers.3.weight", "layers.3.bias"}
    features = torch.randn(6, 8)
    mask = torch.tensor([True, True, True, False, False, True])
    masked = projector(features, mask)
    torch.manual_seed(1)
    reference = ConvBNProjector(8, 5, 7)
    torch.testing.assert_close(masked[mask], reference(features[mask]), rtol=1e-5, atol=1e-5)


def test_synchronize_converts_other_batch_norms_and_keeps_their_tensors():
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), ConvBNProjector(3, 2))
    params = {name: p for name, p in model.named_parameters()}
    keys = set(model.state_dict())
    synchronize(model)
    assert model[1].synchronized and model[2].layers[1].synchronized
    assert isinstance(model[1], nn.BatchNorm1d)
    assert {name: p for name, p in model.named_parameters()} == params and set(model.state_dict()) == keys
    # No process group: a synchronized batch norm is a plain one.
    x = torch.randn(5, 4)
    reference = nn.BatchNorm1d(3)
    reference.load_state_dict(model[1].state_dict())
    h = model[0](x)
    torch.testing.assert_close(model[1](h), reference(h), rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------------- two ranks

WORKER = r'''
import json, os, sys
import torch
from clipdistill.engine.parallel.batchnorm import sync_batch_norm
from clipdistill.engine.parallel.launch import row_share, sum_gradients
from clipdistill.engine.prompts import ConvBNProjector
torch.distributed.init_process_group("gloo", init_method="env://")
rank = torch.distributed.get_rank()
case = json.load(open(sys.argv[1]))
features = torch.tensor(case["features"])
mask = torch.tensor(case["mask"])
half = features.shape[0] // 2
rows = slice(rank * half, (rank + 1) * half)
torch.manual_seed(0)
projector = sync_batch_norm(ConvBNProjector(features.shape[1], 3, 5))
params = list(projector.parameters())
out = {"steps": []}
for step in range(2):  # two steps: the second sees the first's update of nothing but the statistics
    x, m = features[rows] * (1 + step), mask[rows]
    real = int(m.sum())
    y = projector(x, m if real < m.numel() else None)
    w = m.float()
    loss = ((y ** 2).sum(-1) * w).sum() / max(real, 1)  # this rank's mean over its real rows
    (loss * row_share(real, torch.device("cpu"))).backward()
    sum_gradients(params)
    out["steps"].append({"y": y.tolist(), "grads": [p.grad.tolist() for p in params]})
    for p in params:
        p.grad = None
out["state"] = {k: v.tolist() for k, v in projector.state_dict().items()}
json.dump(out, open(os.path.join(sys.argv[2], f"rank{rank}.json"), "w"))
torch.distributed.barrier()  # then destroy: see _gloo.py
torch.distributed.destroy_process_group()
'''


def _single_process(features: torch.Tensor, mask: torch.Tensor) -> dict:
    torch.manual_seed(0)
    projector = ConvBNProjector(features.shape[1], 3, 5)
    params = list(projector.parameters())
    out = {"steps": []}
    for step in range(2):
        real = int(mask.sum())
        y = projector(features * (1 + step), mask)
        loss = ((y ** 2).sum(-1) * mask.float()).sum() / max(real, 1)
        loss.backward()
        out["steps"].append({"y": y, "grads": [p.grad.clone() for p in params]})
        for p in params:
            p.grad = None
    out["state"] = projector.state_dict()
    return out


@pytest.mark.parametrize("mask", [
    [True] * 4 + [True, False, False, False],  # rank 1 holds one real row (a short last step, a reject)
    [True, True, False, True] + [False] * 4,  # rank 1 holds padding only
    [True] * 8,  # no padding
], ids=["4+1", "3+0", "4+4"])
def test_two_ranks_with_unequal_real_rows_equal_one_process(tmp_path, mask):
    torch.manual_seed(3)
    features = torch.randn(8, 6) * 2 + 1
    case = tmp_path / "case.json"
    case.write_text(json.dumps({"features": features.tolist(), "mask": mask}))
    _gloo.run_ranks(WORKER, [str(case), str(tmp_path)], tmp_path)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    want = _single_process(features, torch.tensor(mask))
    real = torch.tensor(mask)
    for step, w in enumerate(want["steps"]):
        y = torch.cat([torch.tensor(r["steps"][step]["y"]) for r in ranks])
        torch.testing.assert_close(y[real], w["y"][real], rtol=1e-5, atol=1e-5)
        for rank in ranks:  # the summed gradient is the same on every rank: the global batch's
            for got, expected in zip(rank["steps"][step]["grads"], w["grads"]):
                torch.testing.assert_close(torch.tensor(got), expected, rtol=1e-4, atol=1e-5)
    for rank in ranks:
        for key, value in want["state"].items():
            torch.testing.assert_close(torch.tensor(rank["state"][key], dtype=value.dtype), value, rtol=1e-5,
                                       atol=1e-6, msg=key)
