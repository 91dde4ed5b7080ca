"""What the benchmarks share: the input fundus photograph and a CPU/wall timer."""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from typing import Any

import numpy as np


def fundus_jpeg(size: int, quality: int = 90) -> tuple[bytes, str]:
    """A size x size JPEG of a colour fundus photograph and a note on where it came from."""
    from PIL import Image

    try:
        from skimage import data as skdata

        rgb = skdata.retina()  # ships with scikit-image (no download)
        source = "scikit-image data.retina() (real fundus photograph, 1411 px)"
    except Exception as e:  # pragma: no cover - depends on the installed scikit-image
        rgb = _synthetic_fundus(1024)
        source = f"synthetic fundus drawn by the bench (scikit-image retina unavailable: {e})"
    img = Image.fromarray(rgb).convert("RGB").resize((size, size), Image.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue(), f"{source}, resized to {size} px, JPEG quality {quality}"


def _synthetic_fundus(size: int) -> np.ndarray:
    """Orange disc on black with a bright optic disc and dark vessels: enough texture for timing."""
    yy, xx = np.mgrid[0:size, 0:size] / size - 0.5
    r = np.hypot(xx, yy)
    disc = (r < 0.45).astype(np.float32) * (1.0 - 0.6 * r)
    optic = np.exp(-((xx - 0.2) ** 2 + yy**2) / 0.003)
    vessels = 0.3 * (np.abs(np.sin(12 * np.arctan2(yy, xx - 0.2) + 8 * r)) < 0.08)
    base = np.clip(disc - vessels * disc + optic, 0, 1)
    rgb = np.stack([base * 0.95, base * 0.45 + optic * 0.4, base * 0.15 + optic * 0.2], -1)
    return (np.clip(rgb, 0, 1) * 255).astype(np.uint8)


def time_images(fn: Callable[[], Any], n_images: int) -> tuple[float, float]:
    """(images per CPU second, images per wall second) of running fn once over n_images."""
    c0, w0 = time.process_time(), time.perf_counter()
    fn()
    c1, w1 = time.process_time(), time.perf_counter()
    return n_images / max(c1 - c0, 1e-9), n_images / max(w1 - w0, 1e-9)
