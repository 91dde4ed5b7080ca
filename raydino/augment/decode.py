"""Image input of the multi-crop augmentation: encoded bytes or decoded arrays -> uint8 [3, H, W].

Encoded images are measured from their header alone (the crop boxes are drawn before any pixel
is decoded) and then decoded once, JPEG in draft mode (a DCT-domain downscale) when every crop of
the image is a downsample anyway (`draft_scale`).
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import torch
from PIL import Image

from raydino.augment.params import CropParams

try:
    from torchvision.io import ImageReadMode
    from torchvision.io import decode_jpeg as _decode_jpeg

    _RGB = ImageReadMode.RGB
except ImportError:  # a future torchvision without image decoding: PIL does it
    _decode_jpeg = None

ImageInput = torch.Tensor | np.ndarray | bytes | bytearray | memoryview


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
        with Image.open(io.BytesIO(data)) as im:
            return im.height, im.width
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


def decode(data: bytes, draft: int) -> torch.Tensor:
    """Encoded bytes -> uint8 [3, H', W'], JPEG DCT-downscaled by `draft` (1, 2, 4 or 8)."""
    if draft == 1 and data[:2] == b"\xff\xd8" and _decode_jpeg is not None:  # libjpeg-turbo, ~20% faster than PIL
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torchvision 0.29 points to TorchCodec
            return to_chw_uint8(_decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=_RGB))
    with Image.open(io.BytesIO(data)) as im:
        if draft > 1:
            im.draft("RGB", (im.width // draft, im.height // draft))
        return to_chw_uint8(np.asarray(im.convert("RGB")))


def draft_scale(p: CropParams, b: int, sizes: np.ndarray) -> int:
    """Largest JPEG draft factor (8, 4, 2, 1) at which every crop of image b is still downscaled.

    Decoding at 1/s keeps the output distribution when each crop box, s times smaller, still has
    at least as many pixels per side as its output: the crop is then a downsample either way.
    """
    short = np.minimum(p.height[b], p.width[b]) / sizes
    for s in (8, 4, 2):
        if (short >= s).all():
            return s
    return 1
