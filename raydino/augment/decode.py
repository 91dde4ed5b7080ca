"""Image input of the multi-crop augmentation: encoded bytes or decoded arrays -> uint8 [3, H, W].

Encoded images are measured from their header alone (the crop boxes are drawn before any pixel
is decoded) and then decoded once, JPEG in draft mode (a DCT-domain downscale) when every crop of
the image is a downsample anyway (`draft_scales`).  JPEGs are decoded by simplejpeg (libjpeg-turbo's
TurboJPEG API, straight into an HWC array) when it is installed: the same pixels as torchvision's
decoder and Pillow's draft mode (tests/test_augment.py checks), 15 % faster at full size and 20-35 %
in draft mode; torchvision, then Pillow, decode what it refuses.

EXIF orientation is applied: shards keep a JPEG's Orientation tag (as a minimal EXIF block, see
`raydino.data.imagebytes.strip_jpeg_metadata`), and a camera that stores its sensor's pixels with
"rotate 90" in the tag means the photograph is the transposed array.  `exif_orientation` reads the
tag from the bytes (a JPEG's few marker segments before the scan, a PNG's chunks before IDAT), so
the common case, no EXIF at all, costs a few byte comparisons; `image_size` reports the oriented
size (the crop boxes are drawn against it) and `decode` turns the decoded image (Pillow's transpose).
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Iterator

import numpy as np
import torch
from PIL import Image

from raydino.augment.params import CropParams

try:  # libjpeg-turbo's TurboJPEG API: the pixels of torchvision's decoder and Pillow's draft mode, 15-35 % faster
    import simplejpeg
except ImportError:  # pragma: no cover - a dependency; torchvision and Pillow decode without it
    simplejpeg = None

try:
    from torchvision.io import ImageReadMode
    from torchvision.io import decode_jpeg as _decode_jpeg

    _RGB = ImageReadMode.RGB
except ImportError:  # a future torchvision without image decoding: PIL does it
    _decode_jpeg = None

ImageInput = torch.Tensor | np.ndarray | bytes | bytearray | memoryview


_ORIENTATION = 0x0112
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _orientation_of_exif(payload: bytes) -> int:
    """Orientation (1..8) in an EXIF block (with or without its ``Exif\\0\\0`` prefix); 1 when absent or broken."""
    try:
        exif = Image.Exif()
        exif.load(payload)
        value = int(exif.get(_ORIENTATION, 1))
    except Exception:  # noqa: BLE001 - a broken EXIF block means "no orientation", as for every viewer
        return 1
    return value if 1 <= value <= 8 else 1


def exif_orientation(data: bytes) -> int:
    """EXIF Orientation tag (1..8) of encoded image bytes, 1 when there is none.

    JPEG: walks the marker segments up to the first scan (SOI, APP0, maybe APP1, tables, frame: a
    handful) and parses only an ``APP1 Exif`` block.  PNG: walks the chunks up to IDAT for ``eXIf``
    (Pillow reads it only there too).  Other formats (kept with ``--keep-metadata``): Pillow's header.
    """
    if data[:2] == b"\xff\xd8":
        for marker, pos, end in _jpeg_segments(data):
            if marker == 0xE1 and data[pos + 4 : pos + 10] == b"Exif\x00\x00":
                return _orientation_of_exif(data[pos + 4 : end])
        return 1
    if data[:8] == _PNG_SIGNATURE:
        pos, n = 8, len(data)
        while pos + 8 <= n:
            length, ctype = int.from_bytes(data[pos : pos + 4], "big"), data[pos + 4 : pos + 8]
            if ctype == b"eXIf":
                return _orientation_of_exif(data[pos + 8 : pos + 8 + length])
            if ctype in (b"IDAT", b"IEND"):
                break
            pos += 12 + length
        return 1
    try:
        with Image.open(io.BytesIO(data)) as im:
            value = int(im.getexif().get(_ORIENTATION, 1))
    except Exception:  # noqa: BLE001 - unreadable here means the decoder will say so
        return 1
    return value if 1 <= value <= 8 else 1


def _jpeg_segments(data: bytes) -> Iterator[tuple[int, int, int]]:
    """(marker, start, end) of each marker segment of a JPEG before its first scan (SOI, APP0, maybe
    APP1, tables, frame: a handful); the one walk `exif_orientation` and `_jpeg_frame` share."""
    pos, n = 2, len(data)
    while pos + 4 <= n and data[pos] == 0xFF:
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0xDA, 0xD9):  # start of scan / end of image: no header segment comes later
            return
        if 0xD0 <= marker <= 0xD8 or marker == 0x01:  # stand-alone markers
            pos += 2
            continue
        end = pos + 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
        yield marker, pos, end
        pos = end


_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # start-of-frame markers (DHT, JPG, DAC are not)


def _jpeg_frame(data: bytes) -> tuple[int, int, int] | None:
    """(height, width, components) from a JPEG's frame header, or None when the bytes are not a
    JPEG or the header is unusual (Pillow then reads it)."""
    if data[:2] != b"\xff\xd8":
        return None
    for marker, pos, _ in _jpeg_segments(data):
        if marker in _SOF:  # length (2), precision (1), height (2), width (2), components (1)
            if pos + 10 > len(data):
                return None
            h, w = int.from_bytes(data[pos + 5 : pos + 7], "big"), int.from_bytes(data[pos + 7 : pos + 9], "big")
            return (h, w, data[pos + 9]) if h > 0 and w > 0 else None  # height 0: defined later by a DNL marker
    return None


# EXIF orientation -> the Pillow transpose that shows the photograph upright (as ImageOps.exif_transpose).
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90,
}  # fmt: skip


def as_bytes(item: object) -> bytes | None:
    """The encoded bytes of an image input, or None when it is already decoded pixels."""
    if isinstance(item, (bytes, bytearray, memoryview)):
        return bytes(item)
    if isinstance(item, np.ndarray) and item.dtype == np.uint8 and item.ndim == 1:
        return item.tobytes()
    return None


def image_size(item: ImageInput) -> tuple[int, int]:
    """(height, width) without decoding pixels (image header only for encoded input)."""
    data = as_bytes(item)
    if data is not None:
        frame = _jpeg_frame(data)  # the frame header: ~20x faster than Pillow's open (it ran once per image)
        if frame is not None:
            h, w, _ = frame
        else:
            with Image.open(io.BytesIO(data)) as im:
                h, w = im.height, im.width
        return (w, h) if exif_orientation(data) >= 5 else (h, w)  # 5-8 turn the image by 90 degrees
    if isinstance(item, torch.Tensor):
        return int(item.shape[-2]), int(item.shape[-1])
    if isinstance(item, np.ndarray):
        return int(item.shape[0]), int(item.shape[1])
    raise TypeError(f"image must be encoded bytes, a uint8 CHW tensor or a uint8 HWC array, got {type(item).__name__}")


def to_chw_uint8(item: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Decoded image -> uint8 [3, H, W] with channels-last strides (what the uint8 resize kernel wants)."""
    if isinstance(item, np.ndarray):
        if item.dtype != np.uint8 or item.ndim not in (2, 3):
            raise ValueError(f"decoded image array must be uint8 HWC, got dtype {item.dtype} shape {item.shape}")
        a = np.ascontiguousarray(item if item.ndim == 3 else item[:, :, None])
        t = torch.from_numpy(a if a.flags.writeable else a.copy()).permute(2, 0, 1)  # never written to
    elif isinstance(item, torch.Tensor):
        if item.dtype != torch.uint8 or item.dim() not in (2, 3):
            raise ValueError(f"image tensor must be uint8 CHW, got dtype {item.dtype} shape {tuple(item.shape)}")
        t = item if item.dim() == 3 else item.unsqueeze(0)
    else:
        raise TypeError(f"unsupported image type {type(item).__name__}")
    if t.shape[0] == 1:
        t = t.expand(3, -1, -1)
    elif t.shape[0] == 4:
        t = t[:3]
    elif t.shape[0] != 3:
        raise ValueError(f"image must have 1, 3 or 4 channels, got {t.shape[0]} (shape {tuple(t.shape)})")
    if t.stride(0) != 1 or t.stride(2) != 3:
        t = t.permute(1, 2, 0).contiguous().permute(2, 0, 1)
    return t


def as_rgb(im: Image.Image) -> Image.Image:
    """8-bit RGB of a decoded image.  16-bit greyscale (what the sharder stores for 16-bit and float
    TIFFs) maps its full range onto 0..255 (value / 257); float pixels in [0, 1] are scaled by 255.
    Pillow's own convert("RGB") clips such pixels at 255 instead: a 16-bit photograph would train as
    a white disc."""
    if not (im.mode.startswith("I") or im.mode == "F"):
        return im.convert("RGB")
    arr = np.asarray(im, dtype=np.float32)
    scale = 255.0 if im.mode == "F" and float(arr.max(initial=0.0)) <= 1.0 else 1.0 / 257.0
    out = Image.fromarray(np.clip(np.rint(arr * scale), 0, 255).astype(np.uint8)).convert("RGB")
    out.info.update(im.info)  # the EXIF block (orientation) goes along, as convert() keeps it
    return out


def decode(data: bytes, draft: int) -> torch.Tensor:
    """Encoded bytes -> uint8 [3, H', W'] the right way up (EXIF orientation), JPEG DCT-downscaled by `draft` (1, 2, 4 or 8)."""
    orientation = exif_orientation(data)
    if orientation == 1 and simplejpeg is not None and data[:2] == b"\xff\xd8":
        img = _decode_turbo(data, draft)
        if img is not None:
            return img
    if orientation == 1 and draft == 1 and data[:2] == b"\xff\xd8" and _decode_jpeg is not None:  # libjpeg-turbo, ~20% faster than PIL
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torchvision 0.29 points to TorchCodec
            return to_chw_uint8(_decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=_RGB))
    with Image.open(io.BytesIO(data)) as im:
        if draft > 1:
            im.draft("RGB", (im.width // draft, im.height // draft))
        rgb = as_rgb(im)
    if orientation != 1:  # Pillow's transpose: ~0.4 ms at 512 px, several times faster than a strided tensor copy
        rgb = rgb.transpose(_TRANSPOSE[orientation])
    return to_chw_uint8(np.asarray(rgb))


def _decode_turbo(data: bytes, draft: int) -> torch.Tensor | None:
    """An upright JPEG -> uint8 [3, H', W'] with simplejpeg, DCT-scaled by 1/draft as Pillow's draft
    mode would (the same libjpeg-turbo scale, the same pixels); None for what it should not do (CMYK,
    whose Adobe inversion Pillow knows) or refuses (12-bit, a recoverable error in the data):
    Pillow and torchvision then decide."""
    frame = _jpeg_frame(data)
    if frame is None or frame[2] not in (1, 3):  # greyscale or YCbCr/RGB only
        return None
    h, w, _ = frame
    try:
        # Pillow's draft asks for (w // draft, h // draft); the factor is then exactly 1/draft
        arr = simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=h // draft, min_width=w // draft, min_factor=draft)
    except ValueError:
        return None
    if arr.shape[:2] != (-(-h // draft), -(-w // draft)):  # another scale than Pillow's: let Pillow do it
        return None
    return torch.from_numpy(arr).permute(2, 0, 1)  # HWC memory: the channels-last view the resize wants


def draft_scales(p: CropParams, sizes: np.ndarray) -> np.ndarray:
    """Per image, the largest JPEG draft factor (8, 4, 2, 1) at which every crop is still downscaled.

    Decoding at 1/s keeps the output distribution when each crop box, s times smaller, still has
    at least as many pixels per side as its output: the crop is then a downsample either way.
    Vectorised over the batch: one numpy pass, not one per image.
    """
    short = (np.minimum(p.height, p.width) / sizes).min(axis=1)  # [B]: the tightest crop of each image
    scales = np.ones(len(short), dtype=np.int64)
    for s in (2, 4, 8):
        scales[short >= s] = s
    return scales
