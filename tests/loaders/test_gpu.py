"""The dali-gpu backend (nvJPEG / hardware decoder, "mixed" device): run on the GPU machine."""
from __future__ import annotations

import pytest
import torch

from clipdistill.loaders import ImageLoader, OutputSpec

pytestmark = pytest.mark.gpu

OUT = (OutputSpec("student", 32), OutputSpec("teacher", 48))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dali_gpu_contract_and_agreement_with_dali_cpu(image_folder, cache_dir, require_dali, cuda_device, dtype):
    gpu = ImageLoader(image_folder, global_batch_size=8, outputs=OUT, backend="dali-gpu", dtype=dtype,
                      cache_dir=cache_dir, workers=2, seed=5)
    cpu = ImageLoader(image_folder, global_batch_size=8, outputs=OUT, backend="dali-cpu", cache_dir=cache_dir,
                      workers=2, seed=5)
    for a, b in zip(gpu, cpu):
        assert torch.equal(a.sample_ids, b.sample_ids) and torch.equal(a.crops, b.crops)
        for o in OUT:
            x = a.images[o.name]
            assert x.device.type == "cuda" and x.dtype == dtype and x.shape == (8, 3, o.size, o.size)
            diff = (x.float().cpu() - b.images[o.name]).abs()
            # nvJPEG's IDCT differs from libjpeg-turbo's in the last bit; fancy upsampling is on for both.
            assert diff.mean() < 0.03 and torch.quantile(diff.flatten(), 0.999) < 0.2


def test_dali_gpu_survives_bad_files(bad_folder, cache_dir, require_dali, cuda_device):
    root, kinds = bad_folder
    ld = ImageLoader(root, global_batch_size=4, outputs=OUT, backend="dali-gpu", cache_dir=cache_dir,
                     workers=2, precheck=False)
    seen, rejected = [], set()
    for b in ld:
        seen += b.sample_ids[b.mask].tolist()
        rejected |= {r.reason for r in b.rejects}
    assert len(seen) == len(set(seen)) == len(ld.samples) - 5
    assert "decode_error" in rejected


def test_auto_picks_dali_gpu_when_cuda_is_there(require_dali, cuda_device):
    from clipdistill.loaders.loader import resolve_backend

    assert resolve_backend("auto") == "dali-gpu"
