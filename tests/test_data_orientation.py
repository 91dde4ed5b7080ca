"""EXIF orientation is applied by every decoder of stored bytes: augmentation (training), evaluation, hashing."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageOps

from raydino.augment.cpu import MultiCropAugment
from raydino.augment.decode import decode, exif_orientation, image_size
from raydino.config import AugmentConfig
from raydino.data.imagebytes import prepare_image
from raydino.data.labelled import DecodedImages, decode_image
from raydino.data.overlap import image_hashes

H, W = 48, 80  # not square: a missed or wrong turn changes the shape


def _upright() -> np.ndarray:
    """A smooth picture with a distinct top-left corner (JPEG keeps it well)."""
    y, x = np.mgrid[0:H, 0:W]
    img = np.stack([x * 3, y * 5, (x + y) * 2], axis=-1).astype(np.uint8)
    img[:12, :20] = (250, 30, 30)
    return img


def _encode(arr: np.ndarray, fmt: str, orientation: int = 1) -> bytes:
    buf = io.BytesIO()
    kw = {"quality": 95, "subsampling": 0} if fmt == "JPEG" else {}
    if orientation != 1:
        exif = Image.Exif()
        exif[0x0112] = orientation
        kw["exif"] = exif.tobytes()
    Image.fromarray(arr).save(buf, fmt, **kw)
    return buf.getvalue()


def _raw(data: bytes) -> np.ndarray:
    """The stored pixels, orientation ignored."""
    return np.array(Image.open(io.BytesIO(data)).convert("RGB"))


@pytest.fixture(scope="module", params=["JPEG", "PNG"])
def twins(request) -> tuple[bytes, bytes, str]:
    """(upright, rotated) twins: the rotated one stores the picture turned 90 degrees anticlockwise
    with Orientation 6 ("rotate 90 clockwise to display"), as a camera held sideways does.  A JPEG goes
    through the sharder's metadata stripping first, which keeps the tag as a minimal EXIF block (a
    JPEG's APP1, a PNG's eXIf chunk)."""
    fmt = request.param
    upright = _encode(_upright(), fmt)
    stored = _encode(np.rot90(_upright(), k=1), fmt, orientation=6)
    return upright, prepare_image(stored).data, fmt


def _check(got: np.ndarray, rotated: bytes, upright: bytes, fmt: str) -> None:
    """Same pixels as the stored array turned upright (exactly), and as the upright twin (JPEG: within its loss)."""
    np.testing.assert_array_equal(got, np.rot90(_raw(rotated), k=-1))
    assert got.shape == (H, W, 3)
    diff = np.abs(got.astype(int) - _raw(upright).astype(int))
    assert diff.max() == 0 if fmt == "PNG" else diff.mean() < 2.0


def test_tag_survives_sharding_and_is_read(twins):
    upright, rotated, fmt = twins
    assert exif_orientation(rotated) == 6 and exif_orientation(upright) == 1
    assert image_size(rotated) == (H, W) == image_size(upright)  # crop boxes are drawn on the upright size


@pytest.mark.parametrize("draft", [1, 2])
def test_training_decoder(twins, draft):
    upright, rotated, fmt = twins
    got = decode(rotated, draft).permute(1, 2, 0).numpy()
    if draft == 1:
        _check(got, rotated, upright, fmt)
    else:  # DCT-downscaled JPEG (PNG ignores draft): shape turned
        assert got.shape[:2] == ((H // 2, W // 2) if fmt == "JPEG" else (H, W))


def test_training_augmentation_sees_the_upright_picture(twins):
    """Multi-crop from the rotated bytes == multi-crop from the upright pixels given as an array."""
    upright, rotated, fmt = twins
    cfg = AugmentConfig(global_crop_size=32, local_crop_size=16, n_local_crops=2)
    from_bytes = MultiCropAugment(cfg).augment_batch([rotated] * 3, generator=0)
    from_pixels = MultiCropAugment(cfg).augment_batch([np.ascontiguousarray(np.rot90(_raw(rotated), k=-1))] * 3, generator=0)
    for name in from_bytes:
        np.testing.assert_array_equal(from_bytes[name], from_pixels[name])


def test_evaluation_decoder(twins):
    upright, rotated, fmt = twins
    _check(decode_image(rotated).permute(1, 2, 0).numpy(), rotated, upright, fmt)
    item = DecodedImages([rotated], None)[0]  # what feature extraction and the probes iterate
    _check(item.permute(1, 2, 0).numpy(), rotated, upright, fmt)


def test_leakage_hashes_see_the_upright_picture(twins):
    upright, rotated, fmt = twins
    as_png = _encode(np.ascontiguousarray(np.rot90(_raw(rotated), k=-1)), "PNG")
    assert image_hashes(rotated) == image_hashes(as_png)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_orientation_matches_pillow(orientation):
    data = _encode(_upright(), "PNG", orientation)
    jpeg = _encode(_upright(), "JPEG", orientation)
    want_jpeg = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(jpeg))).convert("RGB"))
    np.testing.assert_array_equal(decode(jpeg, 1).permute(1, 2, 0).numpy(), want_jpeg)
    want = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))
    assert exif_orientation(data) == orientation
    np.testing.assert_array_equal(decode(data, 1).permute(1, 2, 0).numpy(), want)
    np.testing.assert_array_equal(decode_image(data).permute(1, 2, 0).numpy(), want)
    assert image_size(data) == want.shape[:2]


def test_png_orientation_survives_stripping_and_reencoded_formats_are_stored_upright():
    stored = prepare_image(_encode(np.rot90(_upright(), k=1), "PNG", orientation=6))
    assert exif_orientation(stored.data) == 6 and "eXIf" in stored.removed  # the rest of the block is gone
    assert b"Exif" not in stored.data and stored.data.count(b"eXIf") == 1
    np.testing.assert_array_equal(decode_image(stored.data).permute(1, 2, 0).numpy(), _upright())
    tiff = prepare_image(_encode(np.rot90(_upright(), k=1), "TIFF", orientation=6))  # re-encoded to PNG: pixels turned
    assert exif_orientation(tiff.data) == 1 and (tiff.height, tiff.width) == (H, W)
    np.testing.assert_array_equal(_raw(tiff.data), _upright())


def test_no_tag_costs_no_exif_parse():
    """The common case (stripped shards): no APP1 segment, orientation 1 from the marker walk alone."""
    data = prepare_image(_encode(_upright(), "JPEG")).data
    assert b"Exif" not in data and exif_orientation(data) == 1
    assert exif_orientation(b"\xff\xd8\xff") == 1 and exif_orientation(b"") == 1  # truncated: no tag, no error
