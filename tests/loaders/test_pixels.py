"""High-bit-depth pixels and oversized headers (issue 18, items 6 and 9): 16-bit and float images are
scaled to 8 bits as DALI scales them (a 16-bit PNG was white in the torch backend); 32-bit integer
pixels are refused with a reason; a decompression bomb is ``too_large`` in ``index --decode`` and in
training alike."""
from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from clipdistill.loaders import ImageLoader, OutputSpec, formats
from clipdistill.loaders.backends.torch import rgb8
from clipdistill.loaders.sources import SampleList

from .conftest import CPU_BACKENDS

IDENTITY = OutputSpec("img", 32, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))


def _ramp(h=32, w=32) -> np.ndarray:
    rng = np.random.default_rng(5)
    return rng.integers(0, 65536, (h, w), dtype=np.int64).astype(np.uint16)


def _png16_rgb(arr: np.ndarray) -> bytes:
    """A 16-bit RGB PNG (PIL cannot write one), written chunk by chunk."""
    h, w, _ = arr.shape
    raw = b"".join(b"\0" + arr[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def _encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def _files(tmp_path):
    g = _ramp()
    files = {
        "gray16.png": (_encode(Image.fromarray(g), "PNG"), np.rint(g / 257.0)),
        "gray16.tif": (_encode(Image.fromarray(g), "TIFF"), np.rint(g / 257.0)),
        "float.tif": (_encode(Image.fromarray((g / 65535.0).astype(np.float32)), "TIFF"), np.rint(g / 257.0)),
        "rgb16.png": (_png16_rgb(np.stack([g, g[::-1], g.T], -1)), np.rint(g / 257.0)),
    }
    for name, (data, _) in files.items():
        (tmp_path / name).write_bytes(data)
    return files


def _render(tmp_path, names, backend):
    samples = SampleList(root=str(tmp_path), paths=names)
    ld = ImageLoader(samples, global_batch_size=1, outputs=(IDENTITY,), backend=backend, workers=1)
    crops = np.array([[0, 0, 32, 32]] * len(names))
    return ld.render(list(range(len(names))), crops, np.zeros(len(names), bool))["img"].numpy()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_high_bit_depth_images_are_scaled_not_clipped(tmp_path, backend):
    files = _files(tmp_path)
    names = sorted(files)
    images = _render(tmp_path, names, backend)  # (N, 3, 32, 32), 0..1 (identity normalization)
    for name, img in zip(names, images):
        expected = files[name][1]
        red = img[0] * 255.0
        assert (img >= 0.999).mean() < 0.05, name  # was 99.6% white
        # rgb16.png: PIL reads the high byte (x >> 8), DALI rounds x / 257: at most one level apart
        tolerance = 1.01 if name == "rgb16.png" else 0.01
        assert np.abs(red - expected).max() <= tolerance, (name, np.abs(red - expected).max())


def test_torch_and_dali_agree_on_high_bit_depth_images(tmp_path):
    pytest.importorskip("nvidia.dali")
    files = _files(tmp_path)
    names = sorted(files)
    a, b = _render(tmp_path, names, "torch"), _render(tmp_path, names, "dali-cpu")
    assert np.abs(a - b).max() * 255.0 <= 1.01


def test_rgb8_on_pil_images_directly():
    g = _ramp(4, 5)
    assert np.array_equal(np.asarray(rgb8(Image.fromarray(g)))[..., 1], np.rint(g / 257.0).astype(np.uint8))
    f = Image.fromarray(np.array([[-0.5, 0.0, 0.5, 1.0, 2.0]], np.float32))
    assert np.asarray(rgb8(f))[0, :, 0].tolist() == [0, 0, 128, 255, 255]


def test_32_bit_integer_pixels_are_refused_with_a_reason(tmp_path):
    data = _encode(Image.fromarray(_ramp().astype(np.int32)), "TIFF")
    reason, detail = formats.full_decode_check(data)
    assert reason == "unsupported_format" and "32-bit integer" in detail
    (tmp_path / "int32.tif").write_bytes(data)
    (tmp_path / "ok.png").write_bytes(_encode(Image.fromarray(_ramp()), "PNG"))
    ld = ImageLoader(SampleList(root=str(tmp_path), paths=["int32.tif", "ok.png"]), global_batch_size=2,
                     outputs=(IDENTITY,), backend="torch", workers=1)
    batch = next(iter(ld))
    assert int(batch.mask.sum()) == 1
    assert [(r.location.rsplit("/", 1)[-1], r.reason) for r in batch.rejects] == [("int32.tif", "unsupported_format")]


def test_a_decompression_bomb_is_too_large_in_index_and_in_training(tmp_path):
    # Reproduction: "too_large" in index --decode, "decode_error" in training (PIL's bomb error at open).
    side = 16000  # 256M pixels: beyond PIL's bomb limit (2 x 89.5M) and the default max_pixels (2**27)
    header = Image.new("L", (side, 1))
    png = _encode(header, "PNG")
    bomb = png[:16] + struct.pack(">II", side, side) + png[24:]  # IHDR says side x side
    bomb = bomb[:29] + struct.pack(">I", zlib.crc32(bomb[12:29])) + bomb[33:]
    assert formats.full_decode_check(bomb)[0] == "too_large"
    assert formats.full_decode_check(bomb, max_pixels=2**40)[0] == "too_large"  # PIL's own limit
    (tmp_path / "bomb.png").write_bytes(bomb)
    (tmp_path / "ok.png").write_bytes(_encode(Image.fromarray(_ramp()), "PNG"))
    for max_pixels in (formats.DEFAULT_MAX_PIXELS, 2**40):
        ld = ImageLoader(SampleList(root=str(tmp_path), paths=["bomb.png", "ok.png"]), global_batch_size=2,
                         outputs=(IDENTITY,), backend="torch", workers=1, max_pixels=max_pixels)
        assert [r.reason for r in next(iter(ld)).rejects] == ["too_large"]
