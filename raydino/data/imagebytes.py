"""Encoded image bytes: recognise, strip identifying metadata, validate.

Fundus photographs often carry patient data outside the pixels: EXIF (camera, date, sometimes
patient name or ID in ImageDescription / UserComment), XMP, IPTC, JPEG comments, PNG text
chunks.  Shards must not carry them, yet re-encoding a JPEG to drop them would change every
pixel.  So JPEG and PNG files are rewritten at the *container* level: their segments / chunks
are copied verbatim except the metadata ones.  The compressed pixel data never changes.

Nothing in the standard toolbox does this: Pillow and torchvision can only strip metadata by
decoding and re-encoding, hence the two small parsers below (JPEG markers, PNG chunks; both
formats are simple length-prefixed sequences).

Other formats (TIFF, BMP, WebP, GIF) keep metadata in places that cannot be removed without
re-encoding, and most training decoders do not read TIFF anyway, so they are re-encoded once to
PNG: losslessly for 8- and 16-bit pixels (16-bit greyscale stays 16-bit) and 32-bit integer or
float pixels whose values a 16-bit PNG holds exactly; float pixels in [0, 1] are quantised to
1/65535 (the row's note says so); other float or 32-bit ranges are rejected, never clipped.

`prepare_image` also decodes every image fully once: that is the only reliable test for
truncated or corrupt files, which are rejected with a reason instead of reaching training.
"""

from __future__ import annotations

import hashlib
import io
import struct
import warnings
import zlib
from dataclasses import dataclass

from PIL import Image, ImageOps, UnidentifiedImageError

from raydino.data.fov import ImageTransform, transform_image

# JPEG application segments kept: APP0 (JFIF/JFXX header), APP2 only when it is an ICC colour
# profile, APP14 (Adobe colour transform flag, needed to decode CMYK/YCCK correctly).
_JPEG_APP0, _JPEG_APP1, _JPEG_APP2, _JPEG_APP14, _JPEG_COM = 0xE0, 0xE1, 0xE2, 0xEE, 0xFE
# PNG chunks kept: the critical ones plus ancillary chunks that change how pixels look.
_PNG_KEEP = {
    b"IHDR", b"PLTE", b"IDAT", b"IEND", b"tRNS", b"gAMA", b"cHRM", b"sRGB", b"iCCP", b"sBIT",
    b"pHYs", b"bKGD", b"cICP", b"mDCv", b"cLLI", b"acTL", b"fcTL", b"fdAT",
}  # fmt: skip
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_EXIF_ORIENTATION = 0x0112


class ImageRejected(ValueError):
    """This file cannot go into a shard; ``reason`` says why, for the rejects file."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class PreparedImage:
    data: bytes  # what goes into the shard
    format: str  # "jpeg", "png", ... (of ``data``)
    height: int
    width: int
    sha256: str  # of ``data``
    source_format: str  # format of the file as found
    removed: tuple[str, ...]  # what was stripped ("EXIF", "COM", "tEXt", ...), for the summary
    # Only with an active ImageTransform (--fov-crop / --max-side): the size as found, the field of
    # view (cx, cy, r in original pixels; None: not found or not looked for), whether it was found
    # (None: not looked for), and whether the pixels were resized / re-encoded.
    orig_width: int | None = None
    orig_height: int | None = None
    fov: tuple[float, float, float] | None = None
    fov_found: bool | None = None
    resized: bool = False
    reencoded: bool = False


def sniff_format(data: bytes) -> str | None:
    """Image format from the magic number, or None."""
    if data[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if data[:8] == _PNG_SIGNATURE:
        return "png"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    if data[:2] == b"BM":
        return "bmp"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    return None


# ------------------------------------------------------------------ JPEG


def strip_jpeg_metadata(data: bytes, orientation: int = 1) -> tuple[bytes, tuple[str, ...]]:
    """Copy a JPEG's segments except EXIF/XMP/IPTC/comments/other APPn and trailing bytes.

    ``orientation`` other than 1 is written back as a minimal EXIF block holding only the
    Orientation tag, so the photograph still displays the right way up.
    Raises ImageRejected when the marker structure is broken or the file is truncated.
    """
    if data[:2] != b"\xff\xd8":
        raise ImageRejected("not a JPEG (no start-of-image marker)")
    out = [b"\xff\xd8"]
    removed: list[str] = []
    if orientation != 1:
        exif = Image.Exif()
        exif[_EXIF_ORIENTATION] = orientation
        payload = exif.tobytes()  # starts with b"Exif\0\0"
        out.append(b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload)
    pos, n = 2, len(data)
    in_scan = False
    while True:
        if in_scan:
            # Entropy-coded data: a 0xFF byte is followed by 0x00 (stuffing) or RSTn inside the
            # scan; anything else is the next marker.
            start = pos
            while True:
                pos = data.find(b"\xff", pos)
                if pos < 0 or pos + 1 >= n:
                    raise ImageRejected("truncated JPEG (no end-of-image marker)")
                nxt = data[pos + 1]
                if nxt == 0x00 or 0xD0 <= nxt <= 0xD7 or nxt == 0xFF:
                    pos += 1 if nxt == 0xFF else 2
                    continue
                break
            out.append(data[start:pos])
            in_scan = False
        if pos + 1 >= n:
            raise ImageRejected("truncated JPEG (no end-of-image marker)")
        if data[pos] != 0xFF:
            raise ImageRejected(f"corrupt JPEG (expected a marker at byte {pos})")
        while pos + 1 < n and data[pos + 1] == 0xFF:  # fill bytes
            pos += 1
        marker = data[pos + 1]
        if marker == 0xD9:  # EOI: done; anything after it (MPF images, vendor trailers) is dropped
            out.append(b"\xff\xd9")
            if pos + 2 < n and data[pos + 2 :].strip(b"\x00"):
                removed.append("trailing data")
            break
        if 0xD0 <= marker <= 0xD8 or marker == 0x01:  # stand-alone markers
            out.append(data[pos : pos + 2])
            pos += 2
            continue
        if pos + 4 > n:
            raise ImageRejected("truncated JPEG (segment header cut off)")
        seg_len = struct.unpack(">H", data[pos + 2 : pos + 4])[0]
        end = pos + 2 + seg_len
        if seg_len < 2 or end > n:
            raise ImageRejected("truncated JPEG (segment runs past the end of the file)")
        body = data[pos + 4 : end]
        if _jpeg_keeps(marker, body):
            out.append(data[pos:end])
        else:
            removed.append(_jpeg_segment_name(marker, body))
        pos = end
        if marker == 0xDA:  # SOS: compressed scan data follows
            in_scan = True
    return b"".join(out), tuple(removed)


def _jpeg_keeps(marker: int, body: bytes) -> bool:
    if marker == _JPEG_COM:
        return False
    if 0xE0 <= marker <= 0xEF:
        if marker == _JPEG_APP0:
            return body[:5] in (b"JFIF\x00", b"JFXX\x00")
        if marker == _JPEG_APP2:
            return body[:12] == b"ICC_PROFILE\x00"
        return marker == _JPEG_APP14 and body[:5] == b"Adobe"
    return True  # frame, tables, scan headers, restart interval ...


def _jpeg_segment_name(marker: int, body: bytes) -> str:
    if marker == _JPEG_COM:
        return "COM"
    if marker == _JPEG_APP1:
        return "EXIF" if body[:6] == b"Exif\x00\x00" else "XMP" if body[:4] == b"http" else "APP1"
    if marker == 0xED:
        return "IPTC"
    return f"APP{marker - 0xE0}"


# ------------------------------------------------------------------ PNG


def strip_png_metadata(data: bytes) -> tuple[bytes, tuple[str, ...]]:
    """Copy a PNG's chunks except text, EXIF, time and unknown ancillary chunks."""
    if data[:8] != _PNG_SIGNATURE:
        raise ImageRejected("not a PNG (bad signature)")
    out = [_PNG_SIGNATURE]
    removed: list[str] = []
    pos, n = 8, len(data)
    while True:
        if pos + 8 > n:
            raise ImageRejected("truncated PNG (no IEND chunk)")
        length = struct.unpack(">I", data[pos : pos + 4])[0]
        ctype = data[pos + 4 : pos + 8]
        end = pos + 12 + length
        if end > n:
            raise ImageRejected(f"truncated PNG ({ctype.decode('latin-1')} chunk runs past the end of the file)")
        if ctype in _PNG_KEEP:
            out.append(data[pos:end])
        else:
            removed.append(ctype.decode("latin-1"))
            if ctype == b"eXIf":  # keep the orientation alone, as for JPEG: the photograph stays upright
                orientation = _orientation_in(data[pos + 8 : end - 4])
                if orientation != 1:
                    out.append(_png_exif_chunk(orientation))
        pos = end
        if ctype == b"IEND":
            if data[pos:].strip(b"\x00"):
                removed.append("trailing data")
            break
    return b"".join(out), tuple(removed)


def _orientation_in(tiff_payload: bytes) -> int:
    """Orientation (1..8) in a PNG eXIf chunk's payload (a TIFF header, no ``Exif\\0\\0``); 1 if absent or broken."""
    try:
        exif = Image.Exif()
        exif.load(b"Exif\x00\x00" + tiff_payload)
        value = int(exif.get(_EXIF_ORIENTATION, 1))
    except Exception:  # noqa: BLE001 - a broken EXIF block only means "no orientation"
        return 1
    return value if 1 <= value <= 8 else 1


def _png_exif_chunk(orientation: int) -> bytes:
    """A PNG eXIf chunk holding only the Orientation tag."""
    exif = Image.Exif()
    exif[_EXIF_ORIENTATION] = orientation
    payload = exif.tobytes().removeprefix(b"Exif\x00\x00")  # PNG's eXIf holds the TIFF block alone
    body = b"eXIf" + payload
    return struct.pack(">I", len(payload)) + body + struct.pack(">I", zlib.crc32(body) & 0xFFFFFFFF)


# ------------------------------------------------------------------ validation


def _decode(data: bytes) -> tuple[Image.Image, tuple[int, int]]:
    """Open and decode every byte; returns the image and its full (width, height).

    Every failure becomes an ImageRejected with a plain reason.  JPEGs are decoded in draft
    mode (libjpeg's 1/8 DCT scaling): all entropy-coded data is still read, so truncation and
    corrupt scans are still caught, at a fraction of the cost of a full-size decode.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            size = img.size
            if img.format == "JPEG":
                img.draft(img.mode, ((size[0] + 7) // 8, (size[1] + 7) // 8))
            img.load()
        return img, size
    except UnidentifiedImageError:
        raise ImageRejected("not an image (format not recognised)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageRejected(f"image too large to decode safely ({e})") from None
    except (OSError, SyntaxError, ValueError, struct.error, EOFError) as e:
        msg = str(e) or type(e).__name__
        if "truncated" in msg:
            raise ImageRejected(f"truncated image data ({msg})") from None
        raise ImageRejected(f"corrupt image data ({msg})") from None


def prepare_image(data: bytes, *, keep_metadata: bool = False, transform: ImageTransform | None = None) -> PreparedImage:
    """Validate one encoded image and return the bytes a shard stores.

    * JPEG / PNG: the original compressed data, minus metadata segments (unless ``keep_metadata``).
    * other formats: lossless PNG re-encode (unless ``keep_metadata``, then the original bytes).
    * with an active ``transform`` (not with ``keep_metadata``), then: cropped to the field of
      view and/or capped in size and re-encoded when the pixels change (`raydino.data.fov`).
    Raises ImageRejected for empty, non-image, truncated or corrupt input.
    """
    if not data:
        raise ImageRejected("empty file (0 bytes)")
    fmt = sniff_format(data)
    if fmt is None:
        _decode(data)  # Pillow may still know it (e.g. JPEG 2000); if not this raises "not an image"
        fmt = "other"
    removed: tuple[str, ...] = ()
    if keep_metadata:
        img, size = _decode(data)
        out, out_fmt = data, (img.format or fmt).lower()
    elif fmt == "jpeg":
        orientation = _jpeg_orientation(data)
        out, removed = strip_jpeg_metadata(data, orientation)
        img, size = _decode(out)
        out_fmt = "jpeg"
    elif fmt == "png":
        out, removed = strip_png_metadata(data)
        img, size = _decode(out)
        out_fmt = "png"
    else:
        img, size = _decode(data)
        out, note = _to_png(img)
        out_fmt, removed = "png", (note,)
    width, height = size
    if transform is not None and transform.active and not keep_metadata:
        return _transformed(out, out_fmt, fmt, (int(width), int(height)), removed, transform)
    return PreparedImage(
        data=out,
        format=out_fmt,
        height=int(height),
        width=int(width),
        sha256=hashlib.sha256(out).hexdigest(),
        source_format=fmt,
        removed=removed,
    )


def _transformed(out: bytes, out_fmt: str, fmt: str, size: tuple[int, int], removed: tuple[str, ...], transform: ImageTransform) -> PreparedImage:
    """The cleaned bytes ``out`` through the field-of-view crop / size cap (`raydino.data.fov.transform_image`)."""
    try:
        t = transform_image(out, out_fmt, size, transform)
    except (OSError, SyntaxError, ValueError, struct.error, EOFError) as e:
        raise ImageRejected(f"corrupt image data ({str(e) or type(e).__name__})") from None
    data = out if t.data is None else t.data
    return PreparedImage(
        data=data,
        format=t.format,
        height=t.height,
        width=t.width,
        sha256=hashlib.sha256(data).hexdigest(),
        source_format=fmt,
        removed=removed,
        orig_width=size[0],
        orig_height=size[1],
        fov=None if t.fov is None else (t.fov.cx, t.fov.cy, t.fov.r),
        fov_found=t.fov_found,
        resized=t.resized,
        reencoded=t.data is not None,
    )


def _jpeg_orientation(data: bytes) -> int:
    """EXIF orientation (1..8) of a JPEG, 1 when absent or unreadable."""
    try:
        value = Image.open(io.BytesIO(data)).getexif().get(_EXIF_ORIENTATION, 1)
        return int(value) if int(value) in range(1, 9) else 1
    except Exception:  # noqa: BLE001 - a broken EXIF block only means "no orientation"
        return 1


def _to_png(img: Image.Image) -> tuple[bytes, str]:
    """PNG bytes of a decoded image and what the conversion did ("re-encoded losslessly to PNG", or
    the precision it cost).  16-bit greyscale stays 16-bit (PNG holds it exactly); 32-bit integer and
    float pixels are stored as 16-bit when that is exact, float in [0, 1] quantised to 1/65535 (said
    so), anything else rejected rather than clipped to 8 bits."""
    if getattr(img, "n_frames", 1) > 1:
        img.seek(0)  # first frame only: a fundus photograph is a still image
    # The EXIF block goes with the other metadata, so its orientation goes into the pixels (a transpose: lossless).
    img = ImageOps.exif_transpose(img)
    note = "re-encoded losslessly to PNG"
    if img.mode.startswith("I;16") or img.mode in ("I", "F"):
        img, note = _as_16bit(img)
    elif img.mode not in ("1", "L", "LA", "P", "RGB", "RGBA"):
        # CMYK, YCbCr, LAB, HSV, PA, La, RGBX...: 8-bit channels, converted to RGB(A) exactly or
        # as closely as Pillow's colour conversion allows.
        note = f"re-encoded to PNG from mode {img.mode} (colour converted to {'RGBA' if 'A' in img.mode else 'RGB'})"
        img = img.convert("RGBA" if "A" in img.mode else "RGB")
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=3)  # lossless; level 3: fast, small enough
    return buf.getvalue(), note


def _as_16bit(img: Image.Image) -> tuple[Image.Image, str]:
    import numpy as np  # local: only high-bit-depth TIFF/PNG sources need it

    arr = np.asarray(img)
    if img.mode.startswith("I;16"):  # any byte order: the values are kept, stored as native 16-bit
        return Image.fromarray(arr.astype(np.uint16)), "re-encoded losslessly to 16-bit PNG"
    if not np.isfinite(arr).all():
        raise ImageRejected(f"{img.mode}-mode pixels include NaN or infinity")
    lo, hi = float(arr.min()), float(arr.max())
    if lo >= 0 and hi <= 65535 and (img.mode == "I" or np.array_equal(arr, np.round(arr))):
        return Image.fromarray(arr.astype(np.uint16)), f"re-encoded losslessly to 16-bit PNG (from mode {img.mode})"
    if img.mode == "F" and lo >= 0 and hi <= 1:
        q = np.round(arr.astype(np.float64) * 65535).astype(np.uint16)
        return Image.fromarray(q), "float pixels in [0, 1] stored as 16-bit PNG (quantised to 1/65535: not lossless)"
    kind = "32-bit integer" if img.mode == "I" else "float"
    raise ImageRejected(f"{kind} pixels span [{lo:g}, {hi:g}]: no 16-bit PNG holds them; convert the file to 8 or 16 bits first")
