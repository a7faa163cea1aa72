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


def _segments(jpeg: bytes) -> dict[int, bytes]:
    """The marker segments of a one-scan JPEG before its SOS, by marker, and its scan data (under 0xDA)."""
    pos, found = 2, {}
    while True:
        marker, length = jpeg[pos + 1], int.from_bytes(jpeg[pos + 2:pos + 4], "big")
        if marker == 0xDA:
            found[0xDA] = jpeg[pos + 2 + length:jpeg.rindex(b"\xff\xd9")]
            return found
        found[marker] = jpeg[pos:pos + 2 + length]
        pos += 2 + length


def _non_interleaved(planes: list[np.ndarray]) -> bytes:
    """A sequential baseline JPEG with one scan per component (PIL cannot write one): three greyscale
    JPEGs' scans of the Y, Cb and Cr planes, under one SOF of three 1x1-sampled components."""
    parts = []
    for plane in planes:
        buf = io.BytesIO()
        Image.fromarray(plane, "L").save(buf, "JPEG", quality=90)
        parts.append(_segments(buf.getvalue()))
    assert all(p[0xDB] == parts[0][0xDB] and p[0xC4] == parts[0][0xC4] for p in parts)  # shared tables
    h, w = planes[0].shape
    sof = b"\xff\xc0" + (8 + 3 * 3).to_bytes(2, "big") + b"\x08" + h.to_bytes(2, "big") + w.to_bytes(2, "big") \
        + b"\x03" + b"".join(bytes([c, 0x11, 0]) for c in (1, 2, 3))
    scans = b"".join(b"\xff\xda\x00\x08\x01" + bytes([c]) + b"\x00\x00\x3f\x00" + p[0xDA]
                     for c, p in zip((1, 2, 3), parts))
    return b"\xff\xd8" + parts[0][0xE0] + parts[0][0xDB] + sof + parts[0][0xC4] + scans + b"\xff\xd9"


def test_multi_scan_jpegs_are_not_called_truncated(tmp_path, capsys):
    # Reproduction: a valid non-interleaved baseline JPEG (one scan per component) was `truncated`:
    # libjpeg reads such a file whole before it writes a row, as it does a progressive one.
    rng = np.random.default_rng(5)
    ycbcr = Image.fromarray(natural_image(rng, 64, 48)).convert("YCbCr")
    good = _non_interleaved([np.asarray(band) for band in ycbcr.split()])
    img, _ = formats.image_size(good)
    assert (img.format, img.mode, img.size, img.info.get("progressive")) == ("JPEG", "RGB", (64, 48), None)
    assert formats.full_decode_check(good) == (None, "jpeg")  # was ("truncated", "jpeg data ends 48 of 48 rows ...")
    assert formats.jpeg_is_multi_scan(good)
    decoded = np.asarray(Image.open(io.BytesIO(good)).convert("RGB"), dtype=np.int16)
    assert np.abs(decoded - np.asarray(ycbcr.convert("RGB"), dtype=np.int16)).mean() < 4  # the picture, not grey
    buf = io.BytesIO()
    Image.fromarray(natural_image(rng, 64, 48)).save(buf, "JPEG", quality=85, progressive=True)
    progressive = buf.getvalue()
    assert formats.jpeg_is_multi_scan(progressive) and formats.full_decode_check(progressive) == (None, "jpeg")
    single = _jpeg(rng, 64, 48)
    assert not formats.jpeg_is_multi_scan(single) and not formats.jpeg_is_multi_scan(_forge(single, 0.3))
    root = tmp_path / "data"
    root.mkdir()
    (root / "non_interleaved.jpg").write_bytes(good)
    (root / "progressive.jpg").write_bytes(progressive)
    (root / "forged.jpg").write_bytes(_forge(_jpeg(rng, 96, 80), 0.4))  # single-scan cuts are still found
    assert main(["index", str(root), "--out", str(tmp_path / "clean.list"), "--decode", "--workers", "1",
                 "--cache-dir", str(tmp_path / "cache"), "--no-progress"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (summary["valid"], summary["reasons"]) == (2, {"truncated": 1})
