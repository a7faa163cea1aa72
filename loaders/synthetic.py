"""Generated images for tests and benchmarks: natural-looking photos and every kind of bad file.

:func:`natural_image` sums smooth random fields at several scales (a 1/f-like
spectrum, as in photographs), adds a gentle gradient and fine grain: JPEG
compresses it like a photo (about 60-120 KiB at 500x375, quality 90), unlike
flat colours or white noise: smooth fields plus a few sharp-edged shapes, a
coarse texture and grain.
"""
from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


def natural_image(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """(height, width, 3) uint8 with photo-like statistics."""
    img = np.zeros((height, width, 3), np.float32)
    for octave in range(1, 7):
        cells = 2 ** octave
        small = rng.random((cells + 1, max(2, int(cells * width / height) + 1), 3))
        up = Image.fromarray((small * 255).astype(np.uint8)).resize((width, height), Image.Resampling.BICUBIC)
        img += np.asarray(up, np.float32) / octave**1.3
    gy, gx = np.mgrid[0:height, 0:width].astype(np.float32)
    direction = rng.normal(size=2)
    img += ((gx / width) * direction[0] + (gy / height) * direction[1])[..., None] * 60.0
    img = (img - img.min()) / max(1e-6, float(img.max() - img.min())) * 235.0 + 10.0
    # Objects: a few shapes with sharp edges and their own texture, as photos have.
    canvas = Image.fromarray(img.astype(np.uint8))
    draw = ImageDraw.Draw(canvas, "RGBA")
    for _ in range(int(rng.integers(3, 9))):
        x0, y0 = rng.uniform(-0.2, 0.9) * width, rng.uniform(-0.2, 0.9) * height
        x1, y1 = x0 + rng.uniform(0.1, 0.6) * width, y0 + rng.uniform(0.1, 0.6) * height
        color = tuple(int(c) for c in rng.integers(0, 256, 3)) + (int(rng.integers(90, 220)),)
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=color)
    img = np.asarray(canvas, np.float32)
    texture = np.asarray(Image.fromarray((rng.random((height // 3 + 1, width // 3 + 1)) * 255).astype(np.uint8))
                         .resize((width, height), Image.Resampling.BILINEAR), np.float32)
    img += (texture[..., None] - 127.5) * 0.25 + rng.normal(0.0, 4.0, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def encode(array: np.ndarray, fmt: str = "JPEG", mode: str | None = None, quality: int = 90) -> bytes:
    """Encode an RGB array (optionally converted to ``mode`` first: "L", "CMYK", ...)."""
    img = Image.fromarray(array)
    if mode is not None:
        img = img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, fmt, **({"quality": quality} if fmt == "JPEG" else {}))
    return buf.getvalue()


def write_dataset(root: str | os.PathLike, count: int, *, size: tuple[int, int] = (500, 375),
                  jitter: float = 0.0, seed: int = 0, quality: int = 90, subfolders: int = 0) -> list[Path]:
    """Write ``count`` natural-looking JPEGs under ``root``; returns their paths.

    Args:
        size: (width, height); with ``jitter`` j, each side is scaled by a random factor in [1-j, 1+j].
        subfolders: spread files over this many subfolders (0: all in ``root``).
    """
    rng = np.random.default_rng(seed)
    root = Path(root)
    paths = []
    for i in range(count):
        w, h = size
        if jitter:
            w = max(8, int(w * rng.uniform(1 - jitter, 1 + jitter)))
            h = max(8, int(h * rng.uniform(1 - jitter, 1 + jitter)))
        folder = root / f"d{i % subfolders:03d}" if subfolders else root
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"img_{i:06d}.jpg"
        path.write_bytes(encode(natural_image(rng, w, h), quality=quality))
        paths.append(path)
    return paths


def corrupt_scan_jpeg(jpeg: bytes) -> bytes:
    """A JPEG whose headers parse (size known) but whose scan cannot decode.

    The start-of-scan header names a component the frame does not have: every
    decoder stops with "Invalid component ID", yet the file starts with FFD8 and
    ends with FFD9, so the cheap check passes. It exercises the decode-failure path.
    """
    sos = jpeg.index(b"\xff\xda")
    data = bytearray(jpeg)
    data[sos + 5] = 0x09  # first component selector of the scan
    return bytes(data)


def write_bad_files(folder: str | os.PathLike, seed: int = 0) -> dict[str, Path]:
    """Write one file of each kind the loader must survive; returns {kind: path}.

    Kinds that must be rejected: truncated, random_bytes, empty, text, corrupt_scan.
    Kinds that must load (as RGB): png_named_jpg, grayscale, cmyk.
    """
    rng = np.random.default_rng(seed)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    good = encode(natural_image(rng, 96, 72))
    files = {
        "truncated": good[: len(good) // 2],
        "random_bytes": rng.bytes(4000),
        "empty": b"",
        "text": b"this is not an image, only text named .jpg\n" * 20,
        "corrupt_scan": corrupt_scan_jpeg(good),
        "png_named_jpg": encode(natural_image(rng, 80, 64), fmt="PNG"),
        "grayscale": encode(natural_image(rng, 90, 70), mode="L"),
        "cmyk": encode(natural_image(rng, 70, 90), mode="CMYK"),
    }
    paths = {}
    for kind, data in files.items():
        path = folder / f"bad_{kind}.jpg"
        path.write_bytes(data)
        paths[kind] = path
    return paths


REJECTED_KINDS = ("truncated", "random_bytes", "empty", "text", "corrupt_scan")
LOADABLE_KINDS = ("png_named_jpg", "grayscale", "cmyk")
