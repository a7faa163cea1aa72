"""A JPEG cut short mid-scan with its end marker put back (FF D9) passes the cheap check and decodes
to a grey remainder (libjpeg warns, PIL ignores the warning): ``index --decode`` and the torch backend
reject it as ``truncated`` (issue 18, item 7), and decode good JPEGs to exactly PIL's pixels."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from clipdistill.loaders import ImageLoader, OutputSpec, formats
from clipdistill.loaders.cli import main
from clipdistill.loaders.sources import SampleList
from clipdistill.loaders.synthetic import natural_image


def _jpeg(rng, w, h, subsampling=2, quality=85, mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(natural_image(rng, w, h)).convert(mode).save(buf, "JPEG", quality=quality,
                                                                 subsampling=subsampling)
    return buf.getvalue()


def _forge(jpeg: bytes, fraction: float) -> bytes:
    """Cut the scan at ``fraction`` of its bytes and append the end marker."""
    sos = jpeg.index(b"\xff\xda")
    return jpeg[:sos + int((len(jpeg) - sos) * fraction)] + b"\xff\xd9"


@pytest.mark.parametrize("w, h, subsampling, mode", [(120, 90, 2, "RGB"), (97, 131, 0, "RGB"), (200, 77, 1, "RGB"),
                                                     (90, 100, 0, "L")])
def test_forged_end_markers_are_found_and_good_files_decode_as_pil_decodes(w, h, subsampling, mode):
    rng = np.random.default_rng(w)
    good = _jpeg(rng, w, h, subsampling, mode=mode)
    assert formats.full_decode_check(good) == (None, "jpeg")
    img, _ = formats.image_size(good)
    formats.load_checked(img, good)
    assert np.array_equal(np.asarray(img), np.asarray(Image.open(io.BytesIO(good))))
    for fraction in (0.2, 0.5):
        forged = _forge(good, fraction)
        assert formats.check_bytes(forged) == (None, "jpeg")  # the cheap check cannot see it
        Image.open(io.BytesIO(forged)).load()  # nor can PIL alone
        reason, detail = formats.full_decode_check(forged)
        assert reason == "truncated" and f"of {h} rows" in detail


def test_index_decode_and_the_torch_backend_reject_a_forged_jpeg(tmp_path, capsys):
    # Reproduction: it passed `index --decode` and both backends trained on its grey remainder.
    rng = np.random.default_rng(0)
    root = tmp_path / "data"
    root.mkdir()
    for i in range(3):
        (root / f"ok{i}.jpg").write_bytes(_jpeg(rng, 96, 80))
    (root / "forged.jpg").write_bytes(_forge(_jpeg(rng, 96, 80), 0.4))
    assert main(["index", str(root), "--out", str(tmp_path / "clean.list"), "--decode", "--workers", "1",
                 "--cache-dir", str(tmp_path / "cache"), "--no-progress"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (summary["valid"], summary["reasons"]) == (3, {"truncated": 1})
    ld = ImageLoader(SampleList(root=str(root), paths=sorted(p.name for p in root.iterdir())), global_batch_size=4,
                     outputs=(OutputSpec("img", 16),), backend="torch", workers=1)
    batch = next(iter(ld))
    assert int(batch.mask.sum()) == 3
    assert [(r.location.rsplit("/", 1)[-1], r.reason) for r in batch.rejects] == [("forged.jpg", "truncated")]
