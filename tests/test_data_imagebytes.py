"""Metadata stripping and validation of encoded images (raydino.data.imagebytes)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from raydino.data.imagebytes import ImageRejected, prepare_image, sniff_format

from helpers.images import jpeg_bytes, png_bytes

SECRET = "PATIENT Jane Roe 1954-03-02 ID 4711"


@pytest.fixture(scope="module")
def pixels() -> np.ndarray:
    return (np.random.default_rng(0).random((48, 64, 3)) * 255).astype(np.uint8)


def _decoded(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def test_clean_jpeg_and_png_pass_through_byte_identical(pixels):
    for data, fmt in ((jpeg_bytes(pixels), "jpeg"), (jpeg_bytes(pixels, progressive=True), "jpeg"), (png_bytes(pixels), "png")):
        out = prepare_image(data)
        assert out.data == data and out.format == fmt and out.removed == ()
        assert (out.width, out.height) == (64, 48)


def test_jpeg_exif_and_comment_are_removed_pixels_untouched(pixels):
    exif = Image.Exif()
    exif[0x010E] = SECRET  # ImageDescription
    src = jpeg_bytes(pixels, exif=exif.tobytes(), comment=SECRET.encode())
    assert SECRET.encode() in src
    out = prepare_image(src)
    assert SECRET.encode() not in out.data
    assert set(out.removed) == {"EXIF", "COM"}
    assert np.array_equal(_decoded(out.data), _decoded(src))  # same compressed data, same pixels
    kept = prepare_image(src, keep_metadata=True)
    assert kept.data == src


def test_jpeg_orientation_survives_stripping(pixels):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    exif[0x013B] = SECRET  # Artist
    out = prepare_image(jpeg_bytes(pixels, exif=exif.tobytes()))
    assert SECRET.encode() not in out.data
    assert dict(Image.open(io.BytesIO(out.data)).getexif()) == {0x0112: 6}


def test_png_text_chunks_are_removed(pixels):
    info = PngImagePlugin.PngInfo()
    info.add_text("Patient", SECRET)
    info.add_itxt("Comment", SECRET)
    src = png_bytes(pixels, pnginfo=info)
    out = prepare_image(src)
    assert SECRET.encode() not in out.data and set(out.removed) == {"tEXt", "iTXt"}
    assert np.array_equal(_decoded(out.data), pixels)


def test_other_formats_become_lossless_png(pixels):
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "TIFF", description=SECRET)
    out = prepare_image(buf.getvalue())
    assert out.format == "png" and out.source_format == "tiff"
    assert SECRET.encode() not in out.data
    assert np.array_equal(_decoded(out.data), pixels)


@pytest.mark.parametrize(
    "make, reason",
    [
        (lambda j, p: b"", "empty"),
        (lambda j, p: b"name,label\nx.jpg,1\n", "not an image"),
        (lambda j, p: j[: len(j) // 2], "truncated"),
        (lambda j, p: j[:-2], "truncated"),  # only the end-of-image marker missing
        (lambda j, p: p[:-12], "truncated"),  # PNG without IEND (Pillow alone accepts this)
        (lambda j, p: p[: len(p) // 2], "truncated"),
        (lambda j, p: j[:400] + bytes(200) + j[600:], "corrupt"),
    ],
)
def test_bad_files_are_rejected_with_a_reason(pixels, make, reason):
    with pytest.raises(ImageRejected) as err:
        prepare_image(make(jpeg_bytes(pixels), png_bytes(pixels)))
    assert reason in err.value.reason


def test_sniff_format():
    assert sniff_format(b"\xff\xd8\xff\xe0") == "jpeg"
    assert sniff_format(b"\x89PNG\r\n\x1a\n....") == "png"
    assert sniff_format(b"II*\x00") == "tiff"
    assert sniff_format(b"hello") is None
