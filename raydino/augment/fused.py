"""The fastest CPU backend of the multi-crop augmentation: every photometric op of every crop of
one image in a single compiled call (Numba), on planar float32 crops that stay in the L2 cache.

Why hand-written (the brief prefers libraries): the OpenCV backend (`raydino.augment.opencv`)
runs each op as one SIMD library call, but a crop has up to ten ops and an image ten crops, so
at 512 px a fifth of its time was Python between the calls (cProfile), and its float ops work
on interleaved HWC crops.  Here the whole chain (flip, the four jitter ops in the crop's own
order, grayscale, blur, solarize, medical blur, noise, bias field, the rounding to uint8 CHW
planes) is one Numba function per crop kind and image; each op is a branch-free loop over a
plane that LLVM vectorises (`fastmath`), and nothing returns to Python between them.  The
gain, and where the remaining time goes (mostly JPEG decode and torch's antialiased resize), is
measured by `python -m raydino.bench aug` and written in docs/performance.md.

The maths are those of `raydino.augment.opencv` and `raydino.augment.ops` (tests/test_augment.py
checks the three backends agree to +-1 grey level on the same draws):

    brightness  x * f                       contrast    f * x + (1 - f) * mean(luma(x))
    saturation  f * x + (1 - f) * luma(x)   hue         `ops.adjust_hue_`'s HSV rotation, without its division
    grayscale   luma(x) = 0.299 R + 0.587 G + 0.114 B   (ITU-R 601-2, PIL's convert("L"))
    blur        Gaussian, radius ceil(3 sigma) (>= 1, < crop side), reflect-101 border, separable
    solarize    v >= threshold -> 255 - v   (global crop 2 only; the caller passes the mask)

Values are float32 on [0, 255] between ops; every blend clamps to [0, 255] in its own pass (the
same as torchvision's clamp after a factor > 1, see `_blend_`).  The first call compiles (a few seconds); `cache=True` keeps the machine code
beside this file (or in Numba's per-user cache when that folder is read-only).
"""

from __future__ import annotations

import math

import numba
import numpy as np

_JIT = {"nogil": True, "cache": True, "fastmath": True}
_WR, _WG, _WB = np.float32(0.299), np.float32(0.587), np.float32(0.114)


@numba.njit(**_JIT)
def _clamp_(x: np.ndarray) -> None:
    for c in range(3):
        p = x[c]
        for i in range(p.shape[0]):
            p[i] = min(max(p[i], np.float32(0.0)), np.float32(255.0))


@numba.njit(**_JIT)
def _blend_(x: np.ndarray, f: float, op: int) -> None:
    """Brightness (op 0), contrast (1) or saturation (2) with factor f on planar x [3, n].

    The result is clamped to [0, 255] in the same pass.  torchvision clamps a blend whose factor
    is > 1 (it extrapolates); a factor <= 1 is a convex blend that stays in range, where the
    clamp only trims float rounding -- so clamping always costs nothing and saves a pass.
    """
    r, g, b = x[0], x[1], x[2]
    n = r.shape[0]
    fw = np.float32(f)
    keep = np.float32(1.0 - f)
    lo, hi = np.float32(0.0), np.float32(255.0)
    if op == 0:
        for c in range(3):
            p = x[c]
            for i in range(n):
                p[i] = min(max(p[i] * fw, lo), hi)
    elif op == 1:
        total = 0.0  # float64 accumulator: the mean of 50k pixels in float32 would drift
        for i in range(n):
            total += _WR * r[i] + _WG * g[i] + _WB * b[i]
        shift = np.float32(keep * (total / n))
        for c in range(3):
            p = x[c]
            for i in range(n):
                p[i] = min(max(p[i] * fw + shift, lo), hi)
    else:
        for i in range(n):
            lk = keep * (_WR * r[i] + _WG * g[i] + _WB * b[i])
            r[i] = min(max(r[i] * fw + lk, lo), hi)
            g[i] = min(max(g[i] * fw + lk, lo), hi)
            b[i] = min(max(b[i] * fw + lk, lo), hi)


@numba.njit(**_JIT, inline="always")
def _rotate_hue(ri: float, gi: float, bi: float, s6: float) -> tuple:
    """One pixel's HSV hue turned by s6 / 6 turns, |s6| <= 1: the branch-free formula of
    `raydino.augment.ops.adjust_hue_` multiplied through by the chroma, so it has no division (a
    vector division is a quarter of the op's time); the sextant folding is exact for |s6| <= 1."""
    vmax = max(ri, max(gi, bi))
    vmin = min(ri, min(gi, bi))
    c = max(vmax - vmin, np.float32(1e-6))  # chroma
    sgn = np.float32(1.0) if gi >= bi else np.float32(-1.0)
    psi = sgn * (gi + bi - ri + vmin - vmax - vmax) + s6 * c  # the hue in sextants, times the chroma
    c2 = c + c
    c3 = c2 + c
    top = vmin + c2
    tr = min(max(abs(abs(psi) - c3), c), c2)
    tg = min(max(abs(abs(psi - c2) - c3), c), c2)
    tb = min(max(abs(abs(psi + c2) - c3), c), c2)
    return top - tr, top - tg, top - tb


@numba.njit(**_JIT)
def _hue_(x: np.ndarray, shift: float) -> None:
    """Rotate the HSV hue of planar x [3, n] by `shift` turns (|shift| <= 0.5).

    A third of a turn is a cyclic permutation of R, G, B, so the shift is split into whole thirds
    (which channel each output reads) and a rest of at most a sixth (`_rotate_hue`): no wrap-around
    in the per-pixel maths, and one vectorised loop per permutation.
    """
    m = int(np.floor(shift * 3.0 + 0.5))
    s6 = np.float32(6.0 * (shift - m / 3.0))
    r, g, b = x[0], x[1], x[2]
    if m % 3 == 0:
        for i in range(r.shape[0]):
            r[i], g[i], b[i] = _rotate_hue(r[i], g[i], b[i], s6)
    elif m % 3 == 1:  # + 1/3 turn: red takes blue's place, green red's, blue green's
        for i in range(r.shape[0]):
            r[i], g[i], b[i] = _rotate_hue(b[i], r[i], g[i], s6)
    else:
        for i in range(r.shape[0]):
            r[i], g[i], b[i] = _rotate_hue(g[i], b[i], r[i], s6)


@numba.njit(**_JIT)
def _gray_(x: np.ndarray) -> None:
    r, g, b = x[0], x[1], x[2]
    for i in range(r.shape[0]):
        y = _WR * r[i] + _WG * g[i] + _WB * b[i]
        r[i] = y
        g[i] = y
        b[i] = y


@numba.njit(**_JIT)
def _taps(sigma: float, r: int) -> np.ndarray:
    """Normalised Gaussian weights at -r..r (what OpenCV's getGaussianKernel computes for sigma > 0)."""
    w = np.empty(2 * r + 1, dtype=np.float64)
    for k in range(2 * r + 1):
        w[k] = math.exp(-0.5 * ((k - r) / sigma) ** 2)
    return (w / w.sum()).astype(np.float32)


@numba.njit(**_JIT)
def _blur_(x: np.ndarray, side: int, sigma: float, row: np.ndarray, tmp: np.ndarray) -> None:
    """Separable Gaussian blur of planar x [3, side * side] in place, reflect-101 border.

    Each pass is written as whole-row multiply-adds (`dst[:] += w[k] * src[k:]`), so that the
    inner loop is contiguous and vectorises; a row of 224 floats stays in L1 across the taps.
    row: scratch of >= 3 * side floats, tmp: [side, side].
    """
    r = min(max(1, int(math.ceil(3.0 * sigma))), side - 1)
    if r < 1:  # a 1-pixel crop: nothing to blur
        return
    w = _taps(sigma, r)
    for c in range(3):
        # 2-D indexing, not a view per row: a Numba array view costs reference counting, and a
        # flat index (row * side + j) gets a per-element negative-index check that blocks SIMD
        img = x[c].reshape((side, side))
        for yy in range(side):  # along W: a reflect-padded copy of the row, then one pass per tap
            for j in range(side):
                row[r + j] = img[yy, j]
            for e in range(1, r + 1):
                row[r - e] = img[yy, e]
                row[r + side - 1 + e] = img[yy, side - 1 - e]
            w0 = w[0]
            for j in range(side):
                tmp[yy, j] = w0 * row[j]
            for k in range(1, 2 * r + 1):
                wk = w[k]
                for j in range(side):
                    tmp[yy, j] += wk * row[j + k]
        for yy in range(side):  # along H: whole rows of tmp; the kernel is symmetric, so rows
            # yy - d and yy + d are added before one multiply (half the multiplies, fewer passes)
            wc, w1 = w[r], w[r + 1]
            a, z = _reflect(yy - 1, side), _reflect(yy + 1, side)
            for j in range(side):
                img[yy, j] = wc * tmp[yy, j] + w1 * (tmp[a, j] + tmp[z, j])
            d = 2
            while d + 1 <= r:  # two pairs per pass over the row
                a, z = _reflect(yy - d, side), _reflect(yy + d, side)
                a2, z2 = _reflect(yy - d - 1, side), _reflect(yy + d + 1, side)
                wa, wb = w[r + d], w[r + d + 1]
                for j in range(side):
                    img[yy, j] += wa * (tmp[a, j] + tmp[z, j]) + wb * (tmp[a2, j] + tmp[z2, j])
                d += 2
            if d <= r:
                a, z = _reflect(yy - d, side), _reflect(yy + d, side)
                wa = w[r + d]
                for j in range(side):
                    img[yy, j] += wa * (tmp[a, j] + tmp[z, j])


@numba.njit(**_JIT)
def _reflect(i: int, n: int) -> int:
    """Reflect-101 border: -1 -> 1, n -> n - 2."""
    return -i if i < 0 else (2 * n - 2 - i if i >= n else i)


@numba.njit(**_JIT)
def _load(src: np.ndarray, x: np.ndarray, side: int, flip: bool) -> None:
    """uint8 HWC crop -> planar float32 x [3, side * side], mirrored left-right when flip.

    Written row by row with 2-D indexing: LLVM then vectorises the de-interleave, reversed or
    not (a flat reversed index, or swapping in place, ran 3-4x slower)."""
    s = src.reshape((side, side * 3))
    r, g, b = x[0].reshape((side, side)), x[1].reshape((side, side)), x[2].reshape((side, side))
    for yy in range(side):
        row = s[yy]
        if flip:
            for j in range(side):
                q = 3 * (side - 1 - j)
                r[yy, j] = row[q]
                g[yy, j] = row[q + 1]
                b[yy, j] = row[q + 2]
        else:
            for j in range(side):
                r[yy, j] = row[3 * j]
                g[yy, j] = row[3 * j + 1]
                b[yy, j] = row[3 * j + 2]


@numba.njit(**_JIT)
def photometric_kind(
    crops: np.ndarray,  # uint8 [N, S, S, 3]: the resized crops of one kind of image b, HWC
    out: np.ndarray,  # uint8 [N, B, 3, S, S]: the batch's output of this kind; writes [:, b]
    b: int,
    k0: int,  # crop index of crops[0] among the image's K crops (0 globals, 2 locals)
    flip: np.ndarray,  # the [B, K] draws of `raydino.augment.params.CropParams`
    jitter: np.ndarray,
    order: np.ndarray,  # [B, K, 4]: each crop's jitter op order (JITTER_ORDERS[jitter_order])
    factors: np.ndarray,  # [B, K, 4]: brightness, contrast, saturation, hue
    gray: np.ndarray,
    blur: np.ndarray,
    sigma: np.ndarray,
    solarize: np.ndarray,  # already masked to global crop 2
    med_blur: np.ndarray,
    noise: np.ndarray,  # [B, K] bool: add `noise_maps[i]` * noise_scale
    bias: np.ndarray,  # [B, K] bool: multiply by `bias_maps[i]`
    noise_maps: np.ndarray,  # float32 [N, S, S, 3] (unused, may be [N, 1, 1, 3], when no crop has noise)
    bias_maps: np.ndarray,  # float32 [N, S, S] (likewise)
    threshold: float,
    med_sigma: float,
    noise_scale: float,
    skip_hue: bool,
) -> None:
    """Flip and every photometric op, in DINO's order, on the N crops of one kind of image b."""
    n_crops, side = crops.shape[0], crops.shape[1]
    npx = side * side
    x = np.empty((3, npx), dtype=np.float32)
    row = np.empty(side + 2 * side, dtype=np.float32)
    tmp = np.empty((side, side), dtype=np.float32)
    xs = x.reshape((3, side, side))
    for i in range(n_crops):
        k = k0 + i
        _load(crops[i], x, side, flip[b, k])
        if jitter[b, k]:
            for step in range(4):
                op = order[b, k, step]
                f = factors[b, k, op]
                if op == 3:
                    if f != 0.0 and not skip_hue:
                        _hue_(x, f)
                elif f != 1.0:
                    _blend_(x, f, op)
        if gray[b, k]:
            _gray_(x)
        if blur[b, k]:
            _blur_(x, side, sigma[b, k], row, tmp)
        if solarize[b, k]:
            thr = np.float32(threshold)
            for c in range(3):
                p = x[c]
                for j in range(npx):
                    v = p[j]
                    p[j] = np.float32(255.0) - v if v >= thr else v
        if med_blur[b, k]:
            _blur_(x, side, max(med_sigma, 1e-3), row, tmp)
        if noise[b, k]:
            scale = np.float32(noise_scale)
            for yy in range(side):
                for j in range(side):
                    for c in range(3):
                        xs[c, yy, j] += noise_maps[i, yy, j, c] * scale
            _clamp_(x)
        if bias[b, k]:
            for c in range(3):
                for yy in range(side):
                    for j in range(side):
                        xs[c, yy, j] *= bias_maps[i, yy, j]
            _clamp_(x)
        dst = out[i, b]
        for c in range(3):  # round half up: values lie in [0, 255]
            p = x[c]
            d = dst[c].reshape(-1)
            for j in range(npx):
                d[j] = np.uint8(p[j] + np.float32(0.5))
