"""Recognizing image files cheaply: magic bytes, end markers, header sizes.

The cheap check reads the first bytes of a file (its format's signature) and,
for JPEG and PNG, looks for the format's end marker near the end: a JPEG must
hold an EOI marker (FF D9) in its last 64 KiB (bytes after it are legal: some
cameras append trailers), a PNG an IEND chunk. Most truncated files fail this
check; files that pass it and still fail to decode are caught at run time by the
loader (see ``loader.py``).

This module imports only the standard library and PIL (no numpy, torch or
DALI), so the ``clipdistill index`` command starts fast.
"""
from __future__ import annotations

import io
import os
import warnings

from PIL import Image

# How far from the end the JPEG EOI / PNG IEND marker may sit.
TAIL_WINDOW = 64 * 1024
HEAD_BYTES = 16

# Formats both decoding paths handle (DALI's decoders and PIL).
DECODABLE_FORMATS = frozenset({"jpeg", "png", "webp", "bmp", "tiff"})

# Reject reasons; the reject list and the loader's state use these words.
EMPTY = "empty"
MISSING = "missing"
UNREADABLE = "unreadable"
UNKNOWN_FORMAT = "unknown_format"
UNSUPPORTED_FORMAT = "unsupported_format"
TRUNCATED = "truncated"
DECODE_ERROR = "decode_error"
TOO_LARGE = "too_large"
# Entries a folder scan does not list (see sources.walk_folder).
SYMLINK_LOOP = "symlink_loop"
DUPLICATE = "duplicate"
UNSUPPORTED = "unsupported"

# A default bound on width*height: 2**27 pixels (e.g. 11585 x 11585) decodes to
# 384 MiB of RGB; larger files are rejected rather than risking the host or GPU.
DEFAULT_MAX_PIXELS = 2**27

_JPEG_EOI = b"\xff\xd9"
_PNG_IEND = b"IEND"


def sniff_format(head: bytes) -> str | None:
    """The image format named by a file's first bytes ("jpeg", "png", ...), or None."""
    if head[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if head[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if head[:2] == b"BM":
        return "bmp"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    if head[:12] == b"\x00\x00\x00\x0cjP  \r\n\x87\n" or head[:4] == b"\xff\x4f\xff\x51":
        return "jpeg2000"
    return None


def _end_marker(fmt: str) -> bytes | None:
    return _JPEG_EOI if fmt == "jpeg" else _PNG_IEND if fmt == "png" else None


def check_bytes(data: bytes) -> tuple[str | None, str]:
    """Cheap check of a whole encoded file in memory.

    Returns:
        (reason, detail): reason is None for a file that passes, else one of the
        reject reasons of this module; detail is a short human-readable note.
    """
    if not data:
        return EMPTY, "0 bytes"
    fmt = sniff_format(data[:HEAD_BYTES])
    if fmt is None:
        return UNKNOWN_FORMAT, f"first bytes {data[:8].hex()}"
    if fmt not in DECODABLE_FORMATS:
        return UNSUPPORTED_FORMAT, fmt
    marker = _end_marker(fmt)
    if marker is not None and data.rfind(marker, max(0, len(data) - TAIL_WINDOW)) < 0:
        return TRUNCATED, f"{fmt} without its end marker in the last {TAIL_WINDOW // 1024} KiB"
    return None, fmt


def check_file_range(path: str, offset: int = 0, size: int | None = None) -> tuple[str | None, str]:
    """Cheap check of a file (or of ``size`` bytes at ``offset`` in it, for a tar member).

    Reads 16 bytes at the start and, for JPEG/PNG, the last bytes: first just the
    marker's length (the common case: the file ends with it), then up to 64 KiB.
    One open, one fstat and two or three preads per file.
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return MISSING, "file not found"
    except OSError as exc:
        return UNREADABLE, f"{type(exc).__name__}: {exc.strerror or exc}"
    try:
        if size is None:
            size = os.fstat(fd).st_size
        if size == 0:
            return EMPTY, "0 bytes"
        head = os.pread(fd, min(HEAD_BYTES, size), offset)
        fmt = sniff_format(head)
        if fmt is None:
            return UNKNOWN_FORMAT, f"first bytes {head[:8].hex()}"
        if fmt not in DECODABLE_FORMATS:
            return UNSUPPORTED_FORMAT, fmt
        marker = _end_marker(fmt)
        if marker is None:
            return None, fmt
        # PNG's IEND is followed by its 4-byte CRC; JPEG's EOI usually ends the file.
        quick = len(marker) + (4 if fmt == "png" else 0)
        if size >= quick and os.pread(fd, len(marker), offset + size - quick) == marker:
            return None, fmt
        start = max(0, size - TAIL_WINDOW)
        tail = os.pread(fd, size - start, offset + start)
        if tail.rfind(marker) < 0:
            return TRUNCATED, f"{fmt} without its end marker in the last {TAIL_WINDOW // 1024} KiB"
        return None, fmt
    except OSError as exc:
        return UNREADABLE, f"{type(exc).__name__}: {exc.strerror or exc}"
    finally:
        os.close(fd)


def image_size(data: bytes):
    """Open an encoded image's header with PIL (no decoding): (PIL image, (width, height)).

    Raises:
        OSError / ValueError (PIL's UnidentifiedImageError is an OSError) when the
        header cannot be parsed.
    """
    with warnings.catch_warnings():
        # Size is bounded by the caller's max_pixels, not by PIL's bomb heuristic.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        img = Image.open(io.BytesIO(data))
    return img, img.size


# PIL modes of pixels deeper than 8 bits that the loaders scale to 8 bits as DALI does:
# 16-bit integers by x / 257 (0..65535 -> 0..255), 32-bit floats by x * 255 (0..1 -> 0..255), rounded.
# 32-bit integer pixels (mode "I", e.g. some TIFFs) have no such range: DALI refuses them, and so do we.
SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
FLOAT_MODES = frozenset({"F"})
REFUSED_MODES = {"I": "32-bit integer pixels (PIL mode I): no defined 8-bit range"}


def open_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS):
    """Parse an encoded image's header (no decoding): (reason or None, detail, PIL image, (width, height)).

    The one header check of ``index --decode`` and of the training backends, so both name a
    file the same way: images over ``max_pixels`` (and PIL's decompression bombs) are
    ``too_large``, pixel modes without an 8-bit range ``unsupported_format``, the rest of a
    header that does not parse ``decode_error``.
    """
    try:
        img, (width, height) = image_size(data)
    except Image.DecompressionBombError as exc:
        return TOO_LARGE, str(exc)[:200], None, None
    except Exception as exc:  # PIL: UnidentifiedImageError, SyntaxError, struct.error ...
        return DECODE_ERROR, f"header: {type(exc).__name__}: {exc}"[:200], None, None
    if width * height > max_pixels:
        return TOO_LARGE, f"{width}x{height} > {max_pixels} pixels", None, None
    if width < 1 or height < 1:
        return DECODE_ERROR, f"header: size {width}x{height}", None, None
    if img.mode in REFUSED_MODES:
        return UNSUPPORTED_FORMAT, REFUSED_MODES[img.mode], None, None
    return None, "", img, (width, height)


def full_decode_check(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[str | None, str]:
    """Cheap check, then a full PIL decode (what ``clipdistill index --decode`` runs)."""
    reason, detail = check_bytes(data)
    if reason is not None:
        return reason, detail
    reason, why, img, _ = open_image(data, max_pixels)
    if reason is not None:
        return reason, why
    try:
        load_checked(img, data)
    except TruncatedImage as exc:
        return TRUNCATED, str(exc)
    except Image.DecompressionBombError as exc:
        return TOO_LARGE, str(exc)[:200]
    except Exception as exc:  # PIL raises OSError, ValueError, SyntaxError, struct.error ...
        return DECODE_ERROR, f"{type(exc).__name__}: {exc}"[:200]
    return None, detail


class TruncatedImage(OSError):
    """An image whose data ends before its last row, though its end marker is there."""


def load_checked(img, data: bytes | None = None) -> None:
    """Decode ``img`` (a PIL image from :func:`open_image` of ``data``) in place.

    With ``data``, a sequential JPEG is decoded in two parts to catch a file cut short
    whose end marker was put back (FF D9 after a truncated scan): libjpeg then fills the
    missing rows with grey, warns, and PIL ignores the warning. Fed everything up to its
    final end marker, a complete file's scan yields every row but at most the last two MCU
    rows (the decoder waits for the marker before it ends the last one); a truncated file
    stops where its data stops, so a cut more than two MCU rows (16 to 32 rows) before the end
    is found. The rest is then fed, so the image is decoded once.

    Raises:
        TruncatedImage: more rows than two MCU rows were missing before the end marker.
        OSError, ValueError, ...: whatever PIL raises on bad data.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        if data is not None and img.format == "JPEG" and not img.info.get("progressive") and len(img.tile) == 1:
            _load_jpeg_checked(img, data)
        img.load()


# Values no decoder is expected to fill whole rows with: the rows still equal to them after the
# first part are those not decoded yet (one match is verified with the second value).
_SENTINELS = ({"L": 3, "RGB": (3, 251, 6), "CMYK": (3, 251, 6, 250)},
              {"L": 252, "RGB": (250, 4, 249), "CMYK": (250, 4, 249, 5)})


def _load_jpeg_checked(img, data: bytes) -> None:
    end = data.rfind(_JPEG_EOI)
    if img.mode not in _SENTINELS[0] or end < 0 or jpeg_is_multi_scan(data):
        return  # img.load() decodes it as usual (a multi-scan file: cannot tell, see jpeg_is_multi_scan)
    # libjpeg holds back up to two MCU rows (the last one, and one for upsampling's context).
    allowed = 16 * max((v for _, _, v, _ in getattr(img, "layer", [])), default=2)
    missing, core = _rows_before_eoi(img, data, end, _SENTINELS[0][img.mode])
    if missing > allowed:
        missing = min(missing, _rows_before_eoi(img, data, end, _SENTINELS[1][img.mode], finish=False)[0])
    if missing > allowed:
        raise TruncatedImage(f"jpeg data ends {missing} of {img.size[1]} rows before the last "
                             "(an end marker follows the cut)")
    if core is not None:
        img.im = core
        img.tile = []


_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # DHT, JPG and DAC share the range


def jpeg_is_multi_scan(data: bytes) -> bool:
    """Whether a JPEG's image data comes in more than one scan (the truncation check cannot tell then).

    True when its first SOS lists fewer components than its SOF (a non-interleaved sequential
    file: one scan per component) or a second SOS follows (progressive files, and any other
    scan split). libjpeg buffers such a file whole and writes no row before the end marker, so
    a complete one looks as cut short as a truncated one. False for a single interleaved scan,
    and for data whose markers do not parse up to the first SOS (the check runs as usual).
    """
    pos, n = 2, len(data)
    components, scans = None, []
    while pos + 4 <= n and data[pos] == 0xFF:
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        if marker == 0xD9:
            break
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # TEM, RSTn: no length
            pos += 2
            continue
        length = int.from_bytes(data[pos + 2:pos + 4], "big")
        if length < 2:
            break
        if marker in _SOF_MARKERS and pos + 9 < n:
            components = data[pos + 9]
        elif marker == 0xDA and pos + 4 < n:
            scans.append(data[pos + 4])
            if len(scans) > 1 or (components is not None and scans[0] < components):
                return True
            pos += 2 + length
            while True:  # skip the entropy-coded data: up to the next FF not followed by 00 or RSTn
                pos = data.find(b"\xff", pos)
                if pos < 0 or pos + 1 >= n:
                    return False
                following = data[pos + 1]
                if following != 0x00 and not 0xD0 <= following <= 0xD7 and following != 0xFF:
                    break
                pos += 1 if following == 0xFF else 2
            continue
        pos += 2 + length
    return False


def _rows_before_eoi(img, data: bytes, end: int, sentinel, finish: bool = True):
    """(rows not decoded from the data before the final EOI, the finished core image or None)."""
    decoder_name, extents, offset, args = img.tile[0]
    core = Image.core.fill(img.mode, img.size, sentinel)
    decoder = Image._getdecoder(img.mode, decoder_name, args, img.decoderconfig)
    try:
        decoder.setimage(core, extents)
        used, err = decoder.decode(data[offset:end])
        if used < 0:  # finished without the marker: nothing can be missing
            return (0, core if err >= 0 and finish else None)
        if err < 0:
            raise OSError(f"decoder error {err}")
        missing = _trailing_rows_equal(img._new(core), sentinel)
        if not finish:
            return missing, None
        used2, err = decoder.decode(data[offset + used:end + 2])
        if used2 >= 0 or err < 0:
            return missing, None  # not finished: let img.load() decode (and raise) as usual
        return missing, core
    finally:
        decoder.cleanup()


def _trailing_rows_equal(img, value) -> int:
    """How many rows at the bottom of ``img`` hold ``value`` in every pixel."""
    width, height = img.size
    target = bytes(value if isinstance(value, tuple) else (value,)) * width
    rows = img.tobytes()
    stride = len(target)
    count = 0
    while count < height and rows[(height - 1 - count) * stride:(height - count) * stride] == target:
        count += 1
    return count
