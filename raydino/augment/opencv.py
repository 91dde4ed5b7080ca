"""The CPU fast path of the multi-crop augmentation: DINO's photometric ops on one crop at a time,
each a single SIMD pass of OpenCV (or numpy) over a float32 HWC crop that stays in the L2 cache.

Why OpenCV: torch's CPU elementwise kernels make one pass over memory per operator, so the
branch-free HSV hue rotation is ~40 plane passes and a Gaussian blur two passes per tap; OpenCV's
`cvtColor` (RGB <-> HSV), `transform` (3x3 colour matrix), `GaussianBlur` (separable) and
`convertScaleAbs` each do their whole operation in one vectorised pass.  A 224 px global crop in
float32 (600 kB) fits in L2, so doing every op of a crop back to back, crop after crop, keeps the
memory traffic on-chip.  The maths are torchvision's (tests/test_augment.py checks each op):

    brightness  x * f                                     (PIL / torchvision: blend with black)
    contrast    f * x + (1 - f) * mean(luma(x))          (blend with the mean grey)
    saturation  f * x + (1 - f) * luma(x)                (blend with the grey image)
    hue         RGB -> HSV (hexcone), H += 360 * shift, HSV -> RGB   (torchvision's adjust_hue)
    grayscale   luma(x) in all three channels, luma = 0.299 R + 0.587 G + 0.114 B (ITU-R 601-2)
    blur        Gaussian, kernel 2 * ceil(3 sigma) + 1, reflect (101) border (torchvision's gaussian_blur)
    solarize    v >= threshold -> 255 - v

Values are float32 on [0, 255] between ops and clamped to [0, 255] after a blend whose factor
is > 1 (a factor <= 1 is a convex blend and cannot leave the range), as torchvision does.
Importing this module sets OpenCV to one thread: crops are small and Ray Data runs one task per core.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

cv2.setNumThreads(1)

GRAY_WEIGHTS = np.array([0.299, 0.587, 0.114], dtype=np.float64)  # as raydino.augment.ops.GRAY_WEIGHTS
_GRAY_MATRIX = np.tile(GRAY_WEIGHTS.astype(np.float32), (3, 1))  # every output channel = luma


def brightness_(x: np.ndarray, factor: float) -> None:
    np.multiply(x, np.float32(factor), out=x)
    if factor > 1:
        x.clip(0, 255, out=x)


def contrast_(x: np.ndarray, factor: float) -> None:
    r, g, b, _ = cv2.mean(x)
    mean_luma = 0.299 * r + 0.587 * g + 0.114 * b  # mean of luma = luma of the channel means
    np.multiply(x, np.float32(factor), out=x)
    np.add(x, np.float32((1 - factor) * mean_luma), out=x)
    if factor > 1:
        x.clip(0, 255, out=x)


def saturation_(x: np.ndarray, factor: float) -> None:
    r, g, b = (1 - factor) * 0.299, (1 - factor) * 0.587, (1 - factor) * 0.114  # (1 - f) * luma weights
    matrix = np.array([[r + factor, g, b], [r, g + factor, b], [r, g, b + factor]], dtype=np.float32)
    cv2.transform(x, matrix, dst=x)  # per-pixel 3x3: reads a pixel before writing it, so in place is safe
    if factor > 1:
        x.clip(0, 255, out=x)


def hue_(x: np.ndarray, shift: float, hsv: np.ndarray) -> None:
    """Rotate the hue by `shift` turns; `hsv` is a scratch buffer of x's shape."""
    cv2.cvtColor(x, cv2.COLOR_RGB2HSV, dst=hsv)  # float input: H in degrees [0, 360), V = max
    # H + 360 * (shift mod 1) lies in [0, 720): HSV2RGB wraps H >= 360 (not negative H, hence the mod)
    cv2.add(hsv, (360.0 * (shift % 1.0), 0.0, 0.0, 0.0), dst=hsv)
    cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB, dst=x)


def grayscale_(x: np.ndarray) -> None:
    cv2.transform(x, _GRAY_MATRIX, dst=x)


def blur_radius(sigma: float, size: int) -> int:
    """Kernel half-width: ceil(3 sigma), at least 1, and less than the crop side (reflect padding)."""
    return int(min(max(1, math.ceil(3.0 * sigma)), size - 1))


def gaussian_blur(x: np.ndarray, sigma: float, out: np.ndarray) -> np.ndarray:
    """Gaussian blur of x into out (separable, float32); returns out."""
    r = blur_radius(sigma, min(x.shape[0], x.shape[1]))
    return cv2.GaussianBlur(x, (2 * r + 1, 2 * r + 1), sigmaX=sigma, dst=out, sigmaY=sigma, borderType=cv2.BORDER_REFLECT_101)


def solarize_(x: np.ndarray, threshold: float) -> None:
    np.subtract(np.float32(255.0), x, out=x, where=x >= threshold)


JITTER_FNS = (brightness_, contrast_, saturation_)  # op ids 0, 1, 2 of raydino.augment.params.JITTER_OPS; 3 is hue


class CropWorkspace:
    """Reused float32 / uint8 buffers per crop size: fresh multi-100-kB arrays cost page faults."""

    def __init__(self) -> None:
        self._bufs: dict[tuple[str, int], np.ndarray] = {}

    def get(self, name: str, size: int, dtype: type = np.float32) -> np.ndarray:
        key = (name, size)
        buf = self._bufs.get(key)
        if buf is None:
            buf = self._bufs[key] = np.empty((size, size, 3), dtype=dtype)
        return buf

    def other(self, x: np.ndarray) -> np.ndarray:
        """The float buffer of x's size that is not x (out-of-place ops such as the blur ping-pong)."""
        first = self.get("x", x.shape[0])
        return self.get("x2", x.shape[0]) if x is first else first


def to_uint8_planes(x: np.ndarray, scratch: np.ndarray, planes: list[np.ndarray]) -> None:
    """float32 HWC on [0, 255] -> rounded, saturated uint8, written channel by channel into CHW planes."""
    cv2.convertScaleAbs(x, dst=scratch)  # values are >= 0, so |x| is x; rounds to nearest
    cv2.split(scratch, planes)
