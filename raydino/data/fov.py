"""Field-of-view crop and size cap: the optional pixel path of `raydino.shard` (``--fov-crop``, ``--max-side``).

A colour fundus photograph is a bright disc (the field of view, FOV) on black; cameras write it
into a 3:2 or 4:3 frame, often wider than the frame is tall, so the disc is clipped at the top and
bottom.  Random crops taken from the whole frame land on black a good part of the time, and a
camera-size image (3000 x 2000 px and more) costs more to decode than the crops made from it.

`detect_fov` finds the disc on a downscaled copy:

1. brightness = the largest channel value of each pixel (the red channel of a colour fundus image,
   the grey value of a grey one, the green one of a red-free photograph);
2. threshold = background + 30 % of (retina level - background): background the 1st percentile,
   retina level the median of what is clearly brighter than it; so an underexposed photograph
   (retina at 20 of 255) is found as well as a bright one, and a black or flat image has no
   contrast and no disc;
3. the largest connected bright region, and its left and right edge in every row (sub-pixel:
   where the brightness crosses the threshold).  Those points lie on the circle whether or not its
   top and bottom are clipped; points on the image's own left or right border are left out;
4. a least-squares circle through them (Kasa's algebraic fit, refitted twice without the
   outliers), then a plausibility check: enough rows, a small residual, a radius of at least
   15 % of the short side, the centre inside the image, and the circle mostly filled.

Why not OpenCV's ``HoughCircles`` (OpenCV is a dependency, for the augmentation): it votes on
edge pixels, and in a fundus photograph most edges are vessels, the optic disc and lesions; it
needs per-dataset parameters (accumulator resolution, two thresholds, a radius range) and
returns integer-ish circles; a clipped disc's straight top and bottom edges vote for wrong
circles.  The FOV border is the one global, high-contrast feature of the image, so a threshold
and a least-squares fit to its row extents is exact, fast (~1 ms on a 400 px copy) and can say
why it gave up.  It also keeps `raydino.data` free of OpenCV.

`transform_image` then crops to the circle's bounding square (plus a margin of 2 % of the radius,
intersected with the image: a clipped disc gives a 2r x height rectangle), caps the longer side
at ``max_side`` (JPEGs are decoded directly at 1/2, 1/4 or 1/8 scale with libjpeg's DCT scaling
when that is still larger than the target, then resampled with Lanczos: antialiased, and much
faster than decoding at full size) and re-encodes: JPEG at ``quality`` for JPEG sources, PNG for
lossless ones.  An image that needs neither (no disc found, or the crop box is the whole image,
and not larger than the cap) keeps its bytes.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

MIN_MAX_SIDE = 64  # smaller caps leave nothing for a 224 px crop to see
DEFAULT_QUALITY = 95
FOV_MARGIN = 0.02  # of the radius, around the disc's bounding square
DETECT_SIDE = 320  # the detection copy's longer side is at least this (when the image is)
_THRESHOLD_FRACTION = 0.3
_MIN_CONTRAST = 6.0  # retina level - background, in 8-bit levels: below it there is no disc to see
_EXIF_ORIENTATION = 0x0112


@dataclass(frozen=True)
class FovCircle:
    """The field of view, in pixels of the original image ((0, 0) = centre of the top-left pixel)."""

    cx: float
    cy: float
    r: float

    def box(self, width: int, height: int, margin: float = FOV_MARGIN) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) of the bounding square plus margin, clipped to the image (PIL's crop box)."""
        half = self.r * (1 + margin) + 1
        # pixel i covers [i, i+1) in continuous coordinates: its centre is i + 0.5
        left = max(0, math.floor(self.cx + 0.5 - half))
        top = max(0, math.floor(self.cy + 0.5 - half))
        right = min(width, math.ceil(self.cx + 0.5 + half))
        bottom = min(height, math.ceil(self.cy + 0.5 + half))
        return left, top, right, bottom


@dataclass(frozen=True)
class ImageTransform:
    """What `raydino.shard --fov-crop --max-side N --quality Q` does to each image's pixels."""

    fov_crop: bool = False
    max_side: int | None = None
    quality: int = DEFAULT_QUALITY

    def __post_init__(self) -> None:
        check_transform(self.max_side, self.quality)

    @property
    def active(self) -> bool:
        return self.fov_crop or self.max_side is not None

    def settings(self) -> dict[str, object]:
        """For the shard fingerprint and the manifest."""
        return {"fov_crop": self.fov_crop, "max_side": self.max_side, "quality": self.quality}


def check_transform(max_side: int | None, quality: int) -> None:
    """ValueError naming the field, its value and what is allowed."""
    if max_side is not None and (isinstance(max_side, bool) or not isinstance(max_side, int) or max_side < MIN_MAX_SIDE):
        raise ValueError(f"max_side={max_side!r}: must be an integer >= {MIN_MAX_SIDE} (pixels), or None for no cap")
    if isinstance(quality, bool) or not isinstance(quality, int) or not 1 <= quality <= 100:
        raise ValueError(f"quality={quality!r}: must be an integer from 1 to 100 (JPEG quality)")


@dataclass(frozen=True)
class TransformResult:
    data: bytes | None  # new encoded bytes, or None: keep the input bytes
    format: str
    width: int
    height: int
    fov: FovCircle | None  # None: not looked for, or not found
    fov_found: bool | None  # None: not looked for
    resized: bool


# ------------------------------------------------------------------ detection


def _brightness(img: Image.Image) -> np.ndarray:
    """Per-pixel largest channel as float32 in 0..255 (16-bit and float images scaled to their maximum)."""
    if img.mode in ("P", "PA", "1", "CMYK", "YCbCr", "LAB", "HSV"):
        img = img.convert("RGB")
    a = np.asarray(img)
    if a.ndim == 3:
        a = a[..., :3].max(axis=2) if a.shape[2] >= 3 else a[..., 0]
    a = a.astype(np.float32)
    if img.mode not in ("L", "LA", "RGB", "RGBA", "RGBX"):
        top = float(a.max())
        a *= 255.0 / top if top > 0 else 1.0
    return a


def detect_fov(img: Image.Image, scale: tuple[float, float] = (1.0, 1.0)) -> FovCircle | None:
    """The circular field of view of ``img`` (any PIL mode), or None when no plausible disc is there.

    ``scale``: original pixels per pixel of ``img`` in x and y (``img`` is usually a downscaled
    copy); the circle is returned in original pixels.
    """
    from scipy import ndimage  # local: only --fov-crop needs it, every shard run imports this module

    v = _brightness(img)
    h, w = v.shape
    if h < 8 or w < 8:
        return None
    bg = float(np.percentile(v, 1))
    above = v[v > bg + _MIN_CONTRAST]
    if above.size < 0.05 * v.size:
        return None  # black, or nearly: nothing that could be a retina
    level = float(np.median(above))
    if level - bg < _MIN_CONTRAST:
        return None
    t = bg + _THRESHOLD_FRACTION * (level - bg)
    mask = ndimage.binary_opening(v > t, iterations=1)
    labels, n = ndimage.label(mask)
    if n == 0:
        return None
    sizes = np.bincount(labels.ravel())[1:]
    disc = labels == (1 + int(np.argmax(sizes)))

    rows = np.flatnonzero(disc.any(axis=1))
    sub = disc[rows]
    xl = np.argmax(sub, axis=1)
    xr = w - 1 - np.argmax(sub[:, ::-1], axis=1)
    pts_x: list[np.ndarray] = []
    pts_y: list[np.ndarray] = []
    ok = xl > 0  # not on the image's left border
    if ok.any():
        y, x = rows[ok], xl[ok]
        a, b = v[y, x - 1], v[y, x]
        f = np.clip((t - a) / np.maximum(b - a, 1e-3), 0, 1)
        pts_x.append(x - 1 + f)
        pts_y.append(y.astype(np.float64))
    ok = xr < w - 1
    if ok.any():
        y, x = rows[ok], xr[ok]
        a, b = v[y, x], v[y, x + 1]
        f = np.clip((a - t) / np.maximum(a - b, 1e-3), 0, 1)
        pts_x.append(x + f)
        pts_y.append(y.astype(np.float64))
    if not pts_x:
        return None
    px, py = np.concatenate(pts_x).astype(np.float64), np.concatenate(pts_y)
    if px.size < 20:
        return None
    keep = np.ones(px.size, dtype=bool)
    fit = None
    for _ in range(3):
        if keep.sum() < 20:
            return None
        fit = _fit_circle(px[keep], py[keep])
        if fit is None:
            return None
        cx, cy, r = fit
        resid = np.abs(np.hypot(px - cx, py - cy) - r)
        keep = resid <= max(1.0, 3.0 * float(np.median(resid[keep])))
    assert fit is not None
    cx, cy, r = fit
    resid = np.abs(np.hypot(px[keep] - cx, py[keep] - cy) - r)
    span = float(py[keep].max() - py[keep].min())
    if not (
        r >= 0.15 * min(h, w)
        and r <= 1.5 * max(h, w)
        and 0 <= cx < w
        and 0 <= cy < h
        and float(np.median(resid)) <= max(0.75, 0.01 * r)
        and keep.mean() >= 0.7
        and span >= min(0.5 * r, 0.5 * h)
    ):
        return None
    # Mostly filled: inside the circle (rows where the disc is), at least 80 % bright after hole filling.
    yy, xx = np.mgrid[0:h, 0:w]
    inside = np.hypot(xx - cx, yy - cy) < r - 1.5
    inside[: rows.min()] = False
    inside[rows.max() + 1 :] = False
    filled = ndimage.binary_fill_holes(disc)
    if inside.sum() == 0 or filled[inside].mean() < 0.8:
        return None
    outside = np.hypot(xx - cx, yy - cy) > r + 2.0
    if filled[outside].sum() > 0.05 * filled.sum():
        return None
    sx, sy = scale
    # pixel-centre coordinates of the copy -> continuous -> original pixel-centre coordinates
    return FovCircle(cx=(cx + 0.5) * sx - 0.5, cy=(cy + 0.5) * sy - 0.5, r=r * (sx + sy) / 2)


def _fit_circle(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float] | None:
    """Kasa's algebraic least-squares circle through the points (centred for conditioning)."""
    mx, my = x.mean(), y.mean()
    u, v = x - mx, y - my
    a = np.stack([u, v, np.ones_like(u)], axis=1)
    b = -(u * u + v * v)
    try:
        (d, e, f), *_ = np.linalg.lstsq(a, b, rcond=None)
    except np.linalg.LinAlgError:
        return None
    cx, cy = -d / 2, -e / 2
    r2 = cx * cx + cy * cy - f
    if not np.isfinite(r2) or r2 <= 0:
        return None
    return float(cx + mx), float(cy + my), float(math.sqrt(r2))


# ------------------------------------------------------------------ crop, cap, re-encode


def _detection_copy(data: bytes, size: tuple[int, int]) -> tuple[Image.Image, tuple[float, float]]:
    """A copy of about DETECT_SIDE px or more on the longer side, and its scale (original px per copy px)."""
    w, h = size
    img = Image.open(io.BytesIO(data))
    k = max(1, max(w, h) // DETECT_SIDE)
    if img.format == "JPEG" and k > 1:
        img.draft(img.mode, (max(1, w // k), max(1, h // k)))  # libjpeg picks a scale leaving >= this size
    img.load()
    if img.mode in ("P", "PA", "1"):
        img = img.convert("RGBA" if "A" in img.mode or "transparency" in img.info else "RGB")
    kk = max(1, max(img.size) // DETECT_SIDE)
    if kk > 1:
        img = img.reduce(kk) if img.mode in ("L", "RGB", "RGBA", "LA", "I", "F") else img
    return img, (w / img.size[0], h / img.size[1])


def output_size(width: int, height: int, max_side: int | None) -> tuple[int, int]:
    """The size after capping the longer side at ``max_side`` (never upscales)."""
    if max_side is None or max(width, height) <= max_side:
        return width, height
    s = max_side / max(width, height)
    return max(1, round(width * s)), max(1, round(height * s))


def transform_image(data: bytes, fmt: str, size: tuple[int, int], transform: ImageTransform) -> TransformResult:
    """Crop ``data`` (an encoded ``fmt`` image of ``size``) to its field of view and/or cap its size.

    ``fmt`` is "jpeg" or "png" (other formats were made PNG before).  Re-encodes only when the
    pixels change; the orientation tag of a JPEG and an ICC profile are carried over.
    """
    w, h = size
    fov: FovCircle | None = None
    found: bool | None = None
    box = (0, 0, w, h)
    if transform.fov_crop:
        copy, scale = _detection_copy(data, size)
        fov = detect_fov(copy, scale)
        found = fov is not None
        if fov is not None:
            box = fov.box(w, h)
    cw, ch = box[2] - box[0], box[3] - box[1]
    out_w, out_h = output_size(cw, ch, transform.max_side)
    resized = (out_w, out_h) != (cw, ch)
    if box == (0, 0, w, h) and not resized:
        return TransformResult(None, fmt, w, h, fov, found, False)

    img = Image.open(io.BytesIO(data))
    info = dict(img.info)
    orientation = img.getexif().get(_EXIF_ORIENTATION, 1) if fmt == "jpeg" else 1
    if fmt == "jpeg" and resized:
        # Decode at the smallest DCT scale (1, 1/2, 1/4, 1/8) that leaves the crop >= the output size.
        s = max(out_w / cw, out_h / ch)
        img.draft(img.mode, (math.ceil(w * s), math.ceil(h * s)))
    img.load()
    if img.mode in ("P", "PA", "1") or (fmt == "jpeg" and img.mode not in ("L", "RGB")):
        img = img.convert("RGBA" if fmt == "png" and ("A" in img.mode or "transparency" in info) else "RGB")
    sx, sy = img.size[0] / w, img.size[1] / h
    if (sx, sy) != (1.0, 1.0):
        box_d = (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)
        img = img.resize((out_w, out_h), Image.LANCZOS, box=box_d)
    else:
        if box != (0, 0, w, h):
            img = img.crop(box)
        if resized:
            img = img.resize((out_w, out_h), Image.LANCZOS, reducing_gap=3.0)
    buf = io.BytesIO()
    icc = info.get("icc_profile")
    if fmt == "jpeg":
        kw: dict[str, object] = {"quality": transform.quality}
        if icc:
            kw["icc_profile"] = icc
        if orientation in range(2, 9):
            exif = Image.Exif()
            exif[_EXIF_ORIENTATION] = int(orientation)
            kw["exif"] = exif.tobytes()
        img.save(buf, format="JPEG", **kw)
    else:
        img.save(buf, format="PNG", compress_level=3, **({"icc_profile": icc} if icc else {}))
    return TransformResult(buf.getvalue(), fmt, img.size[0], img.size[1], fov, found, resized)
