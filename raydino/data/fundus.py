"""Drawing one synthetic colour fundus photograph (`render_fundus`); `raydino.data.synth` makes datasets of them.

Each picture is drawn procedurally from its own random streams (``default_rng([seed, index,
stream])``), so a picture depends only on the seed and its label, never on which process drew it:

* anatomy: circular field of view on black (sometimes clipped top and bottom, as many
  cameras do), orange-to-brown fundus with choroidal texture, illumination gradient and
  vignetting, macula with foveal reflex, optic disc with a cup (cup-to-disc ratio is the
  glaucoma label), arteries and veins branching out of the disc in the four arcades;
* diabetic retinopathy by the ICDR scale: 1 mild = microaneurysms only; 2 moderate = plus
  haemorrhages, hard exudates, occasional cotton-wool spots; 3 severe = many haemorrhages in
  all quadrants, venous beading, cotton-wool spots; 4 proliferative = new vessels (disc or
  elsewhere), sometimes a preretinal haemorrhage or laser scars.  Lesions are a few pixels
  (a microaneurysm is ~1 px at 256 px), so an aggressive crop can miss them, as in real data;
* camera variation: exposure, gamma, colour cast, focus blur, sensor noise;
  left eyes are the mirror image of right eyes (disc on the other side).

Changing what is drawn changes every cached synthetic set: bump `raydino.data.synth.SYNTH_VERSION`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter


@dataclass(frozen=True)
class FundusLabel:
    """What one picture shows (grade, cup-to-disc ratio, eye) and which split it belongs to."""

    index: int
    dr_grade: int
    glaucoma: int
    cup_disc_ratio: float
    eye: str  # "right" (OD) or "left" (OS)
    split: str


# Beyond 20x the default a lesion covers the disc (size) or drawing them takes minutes per image (count).
MAX_LESION_SCALE = 20


@dataclass(frozen=True)
class LesionScale:
    """How big and how many the DR lesions are, relative to the default drawing (1, 1).

    `size` multiplies every lesion's radius (and new vessels' width); `count` multiplies how many of
    each kind a grade draws.  The grade still decides which kinds appear.  At 128 px a default
    haemorrhage is ~1-3 px across; `size=3` makes it visible at the resolution a CPU run trains on,
    and sweeping `size` tests the paper's claim that the best crop scale depends on lesion size.
    """

    size: float = 1.0
    count: float = 1.0

    def __post_init__(self) -> None:
        for name in ("size", "count"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and 0 < value <= MAX_LESION_SCALE):
                raise ValueError(f"lesion {name}={value!r}: must be a number > 0 and <= {MAX_LESION_SCALE} (1 = the default drawing)")

    @property
    def is_default(self) -> bool:
        return self.size == 1.0 and self.count == 1.0


DEFAULT_LESIONS = LesionScale()


# ------------------------------------------------------------------ drawing helpers


class _Canvas:
    """A supersampled greyscale mask; PIL draws the shapes, numpy composites the result."""

    def __init__(self, size: int, c: float, radius: float, ss: int = 2):
        self.ss, self.c, self.r, self.size = ss, c, radius, size
        self.img = Image.new("L", (size * ss, size * ss), 0)
        self.draw = ImageDraw.Draw(self.img)
        self.used = False

    def px(self, u: float, v: float) -> tuple[float, float]:
        return ((self.c + u * self.r) * self.ss, (self.c + v * self.r) * self.ss)

    def width(self, w: float) -> float:
        return w * self.r * self.ss  # normalised width -> canvas pixels

    def line(self, p0: np.ndarray, p1: np.ndarray, w: float, value: int = 255) -> None:
        wpx = max(1.0, self.width(w))
        a, b = self.px(*p0), self.px(*p1)
        self.draw.line([a, b], fill=value, width=int(round(wpx)))
        rr = wpx / 2
        self.draw.ellipse([b[0] - rr, b[1] - rr, b[0] + rr, b[1] + rr], fill=value)  # round joint
        self.used = True

    def polyline(self, pts: list[tuple[float, float]], widths: list[float], value: int = 255) -> None:
        """Segments i -> i+1 with widths[i]; runs of equal pixel width are drawn in one call."""
        if len(pts) < 2:
            return
        px = [self.px(u, v) for u, v in pts]
        wpx = [max(1, int(round(self.width(w)))) for w in widths]
        start = 0
        for i in range(1, len(wpx) + 1):
            if i == len(wpx) or wpx[i] != wpx[start]:
                self.draw.line(px[start : i + 1], fill=value, width=wpx[start], joint="curve")
                start = i
        self.used = True

    def blob(self, u: float, v: float, a: float, b: float, theta: float, value: int = 255) -> None:
        """Filled rotated ellipse with semi-axes a, b (normalised units)."""
        t = np.linspace(0, 2 * np.pi, 14, endpoint=False)
        x, y = a * np.cos(t), b * np.sin(t)
        ct, st = math.cos(theta), math.sin(theta)
        pts = [self.px(u + xi * ct - yi * st, v + xi * st + yi * ct) for xi, yi in zip(x, y)]
        self.draw.polygon(pts, fill=value)
        self.used = True

    def mask(self, blur_px: float = 0.0) -> np.ndarray:
        img = self.img.resize((self.size, self.size), Image.Resampling.BOX)
        if blur_px > 0:
            img = img.filter(ImageFilter.GaussianBlur(blur_px))
        return np.asarray(img, dtype=np.float32) * (1.0 / 255.0)


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Zero-mean smooth noise: a coarse random grid upsampled bicubically."""
    grid = rng.standard_normal((cells, cells)).astype(np.float32)
    return np.asarray(Image.fromarray(grid).resize((size, size), Image.Resampling.BICUBIC))


def _composite(img: np.ndarray, mask: np.ndarray, colour: tuple[float, float, float], alpha: float) -> None:
    a = (mask * alpha)[..., None]
    img *= 1.0 - a
    img += a * np.asarray(colour, dtype=np.float32)


# ------------------------------------------------------------------ anatomy


def _grow_vessel(
    rng: np.random.Generator,
    canvas: _Canvas,
    start: tuple[float, float],
    heading: float,
    width: float,
    length: float,
    curvature: float,
    depth: int,
    fovea: np.ndarray,
    beading: float,
) -> None:
    """Random-walk a vessel from ``start``, tapering and branching (depth-limited).

    Plain floats and pre-drawn noise keep this loop cheap: it runs ~2,000 steps per image.
    """
    step = 0.018
    n = max(2, int(length / step))
    noise = rng.normal(0.0, 0.07, n)
    branch = rng.random(n)
    x, y = float(start[0]), float(start[1])
    fx, fy = float(fovea[0]), float(fovea[1])
    pts, widths = [(x, y)], []
    for i in range(n):
        heading += curvature * step + noise[i]
        nx, ny = x + step * math.cos(heading), y + step * math.sin(heading)
        if nx * nx + ny * ny > 1.1 or (nx - fx) ** 2 + (ny - fy) ** 2 < 0.07**2:
            break  # left the field of view / reached the foveal avascular zone
        w = width * (1.0 - 0.45 * i / n)
        if beading:  # venous beading: periodic calibre change (no random draw: same tree as grade 0)
            w *= 1.0 + beading * (0.5 + 0.5 * math.sin(i * 1.7))
        pts.append((nx, ny))
        widths.append(w)
        x, y = nx, ny
        if depth < 3 and i > 3 and branch[i] < 0.07:
            side = 1.0 if rng.random() < 0.5 else -1.0
            _grow_vessel(rng, canvas, (x, y), heading + side * rng.uniform(0.45, 1.0), width * 0.62,
                         length * rng.uniform(0.3, 0.6), rng.normal(0, 1.2), depth + 1, fovea, beading)  # fmt: skip
            width *= 0.88
    canvas.polyline(pts, widths)


def _vessel_tree(rng: np.random.Generator, arteries: _Canvas, veins: _Canvas, disc: np.ndarray,
                 fovea: np.ndarray, scale: float, beading: float) -> None:  # fmt: skip
    """The four arcades of a right eye (disc on the right, macula to its left)."""
    arcades = (  # (heading, curvature, length): temporal arcades curve around the macula
        (-1.8, -1.9, 1.4), (1.8, 1.9, 1.4), (-1.2, 0.4, 0.75), (1.2, -0.4, 0.75),
    )  # fmt: skip
    for heading, curv, length in arcades:
        for canvas, width, dh in ((veins, 0.021, 0.12), (arteries, 0.015, -0.12)):
            _grow_vessel(rng, canvas, (float(disc[0]), float(disc[1])), heading + dh + rng.normal(0, 0.08), width * scale,
                         length * rng.uniform(0.9, 1.1), curv * rng.uniform(0.8, 1.2), 0, fovea,
                         beading if canvas is veins else 0.0)  # fmt: skip


def _random_points(rng: np.random.Generator, k: int, centre: np.ndarray, r_max: float, avoid: np.ndarray, avoid_r: float) -> list[np.ndarray]:
    pts: list[np.ndarray] = []
    tries = 0
    while len(pts) < k and tries < 20 * k + 20:
        tries += 1
        r = r_max * math.sqrt(rng.random())
        t = rng.uniform(0, 2 * math.pi)
        p = centre + r * np.array([math.cos(t), math.sin(t)])
        if p @ p < 0.88 and np.linalg.norm(p - avoid) > avoid_r:
            pts.append(p)
    return pts


def _lesions(rng: np.random.Generator, grade: int, red: _Canvas, exudate: _Canvas, cotton: _Canvas,
             nv: _Canvas, disc: np.ndarray, fovea: np.ndarray, disc_r: float, scale: LesionScale = DEFAULT_LESIONS) -> None:  # fmt: skip
    """Draw the lesions that define ICDR grade ``grade``, `scale` times the default size and count.

    Sizes are scaled after drawing, so a sweep over `scale.size` changes the lesions of one eye and
    keeps where they are; the anatomy never depends on `scale`."""
    if grade == 0:
        return
    pole = (disc + fovea) / 2
    k = scale.size

    def n(x: int) -> int:  # at least one of a kind the grade draws: the grade stays what it says
        return max(1, round(x * scale.count)) if x else 0

    counts = {  # (microaneurysms, haemorrhages, exudate clusters, cotton-wool spots)
        1: (rng.integers(1, 5), 0, 0, 0),
        2: (rng.integers(2, 11), rng.integers(1, 7), rng.integers(0, 3), rng.integers(0, 3)),
        3: (rng.integers(5, 16), rng.integers(12, 31), rng.integers(0, 4), rng.integers(1, 5)),
        4: (rng.integers(3, 13), rng.integers(4, 21), rng.integers(0, 4), rng.integers(0, 4)),
    }[grade]
    n_ma, n_hem, n_he, n_cws = (n(int(x)) for x in counts)
    for p in _random_points(rng, n_ma, pole, 0.75, disc, disc_r * 1.2):
        r = rng.uniform(0.004, 0.008) * k
        red.blob(p[0], p[1], r, r, 0.0)
    for p in _random_points(rng, n_hem, pole if grade < 3 else np.zeros(2), 0.85, disc, disc_r * 1.3):
        if rng.random() < 0.6:  # dot / blot: a few overlapping blobs
            for _ in range(rng.integers(1, 4)):
                q = p + rng.normal(0, 0.008 * k, 2)
                red.blob(q[0], q[1], rng.uniform(0.01, 0.025) * k, rng.uniform(0.01, 0.025) * k, rng.uniform(0, math.pi))
        else:  # flame: elongated, radial to the disc
            d = p - disc
            red.blob(p[0], p[1], rng.uniform(0.025, 0.045) * k, rng.uniform(0.008, 0.014) * k, math.atan2(d[1], d[0]))
    for centre in _random_points(rng, n_he, fovea, 0.35, disc, disc_r * 1.5):
        for q in _random_points(rng, int(rng.integers(4, 16)), centre, 0.06 * k, fovea, 0.02):
            r = rng.uniform(0.004, 0.011) * k
            exudate.blob(q[0], q[1], r, r * rng.uniform(0.6, 1.0), rng.uniform(0, math.pi))
    for p in _random_points(rng, n_cws, pole, 0.55, disc, disc_r * 1.4):
        cotton.blob(p[0], p[1], rng.uniform(0.02, 0.04) * k, rng.uniform(0.015, 0.03) * k, rng.uniform(0, math.pi))
    if grade == 4:
        sites = [disc] if rng.random() < 0.55 else []
        sites += _random_points(rng, int(rng.integers(0 if sites else 1, 3)), pole, 0.7, fovea, 0.15)
        for site in sites:  # new vessels: a tuft of fine, tortuous loops
            for _ in range(rng.integers(6, 14)):
                p = site + rng.normal(0, 0.03, 2)
                h = rng.uniform(0, 2 * math.pi)
                for _ in range(rng.integers(4, 9)):
                    h += rng.normal(0, 0.9)
                    q = p + 0.015 * k * np.array([math.cos(h), math.sin(h)])
                    nv.line(p, q, rng.uniform(0.003, 0.005) * k)
                    p = q
        if rng.random() < 0.3:  # preretinal (boat-shaped) haemorrhage below an arcade
            p = _random_points(rng, 1, pole, 0.5, disc, disc_r * 1.5)
            if p:
                red.blob(p[0][0], p[0][1], rng.uniform(0.05, 0.09) * k, rng.uniform(0.03, 0.05) * k, rng.normal(0, 0.2))
        if rng.random() < 0.25:  # panretinal laser scars in the periphery
            for p in _random_points(rng, int(rng.integers(30, 80)), np.zeros(2), 0.93, fovea, 0.6):
                exudate.blob(p[0], p[1], 0.012, 0.012, 0.0, value=150)
                red.blob(p[0], p[1], 0.006, 0.006, 0.0, value=200)


def render_fundus(size: int, label: FundusLabel, seed: int, lesions: LesionScale = DEFAULT_LESIONS) -> np.ndarray:
    """One synthetic colour fundus photograph, uint8 (size, size, 3); `lesions` scales the DR lesions."""
    if size < 16:
        raise ValueError(f"size={size}: synthetic fundus images need at least 16 px")
    # Three independent streams: the same eye (anatomy) and camera with or without disease.
    rng = np.random.default_rng([seed, label.index, 0])  # anatomy
    lesion_rng = np.random.default_rng([seed, label.index, 1])
    cam = np.random.default_rng([seed, label.index, 2])
    s = size
    c = (s - 1) / 2.0
    radius = s * rng.uniform(0.455, 0.49)
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
    u, v = (xx - c) / radius, (yy - c) / radius
    r2 = u * u + v * v

    # Fundus background: pigmentation, choroidal texture, illumination, vignetting.
    pigment = rng.uniform(0, 1)
    base = np.array([0.82, 0.40, 0.17]) * (1 - pigment) + np.array([0.58, 0.26, 0.11]) * pigment
    texture = 0.07 * _smooth_noise(rng, s, 6) + 0.035 * _smooth_noise(rng, s, 20)
    theta = rng.uniform(0, 2 * np.pi)
    light = (1 + rng.uniform(0, 0.25) * (u * math.cos(theta) + v * math.sin(theta))) * (1 - rng.uniform(0.25, 0.5) * r2**1.3)
    img = (base.astype(np.float32) * ((1 + texture) * light)[..., None]).astype(np.float32)

    # Macula and fovea (right-eye geometry; left eyes are mirrored at the end).
    fovea = np.array([rng.uniform(-0.12, 0.08), rng.uniform(-0.06, 0.06)])
    d2 = (u - fovea[0]) ** 2 + (v - fovea[1]) ** 2
    mac = np.exp(-d2 / (2 * 0.11**2))
    img *= 1 - mac[..., None] * np.array([0.30, 0.42, 0.35], dtype=np.float32) * rng.uniform(0.7, 1.1)
    if rng.random() < 0.6:
        img += (0.12 * np.exp(-d2 / (2 * 0.012**2)))[..., None].astype(np.float32)

    # Optic disc with cup; vertical elongation of the cup is what glaucoma does.
    disc = fovea + np.array([rng.uniform(0.64, 0.72), rng.uniform(-0.09, -0.03)])
    disc_r = rng.uniform(0.12, 0.15)
    ecc = rng.uniform(1.04, 1.12)
    dd = np.sqrt(((u - disc[0]) / disc_r) ** 2 + ((v - disc[1]) / (disc_r * ecc)) ** 2)
    disc_mask = np.clip((1 - dd) / 0.12, 0, 1)
    _composite(img, disc_mask, (0.96, 0.66, 0.42), 0.75)
    cup_r = label.cup_disc_ratio * disc_r
    cup_off = disc + np.array([-0.15 * (disc_r - cup_r), 0.0])
    dc = np.sqrt(((u - cup_off[0]) / cup_r) ** 2 + ((v - cup_off[1]) / (cup_r * ecc * (1 + 0.15 * label.glaucoma))) ** 2)
    _composite(img, np.clip((1 - dc) / 0.3, 0, 1), (1.0, 0.88, 0.68), 0.75)

    # Vessels, then lesions on top (haemorrhages can cover vessels; exudates sit deep).
    scale = 1.0
    arteries, veins = _Canvas(s, c, radius), _Canvas(s, c, radius)
    beading = lesion_rng.uniform(0.3, 0.6) if label.dr_grade == 3 else 0.0
    _vessel_tree(rng, arteries, veins, disc, fovea, scale, beading)
    _composite(img, veins.mask(), (0.36, 0.06, 0.05), 0.88)
    _composite(img, arteries.mask(), (0.62, 0.13, 0.08), 0.80)
    red, exu, cws, nv = (_Canvas(s, c, radius) for _ in range(4))
    _lesions(lesion_rng, label.dr_grade, red, exu, cws, nv, disc, fovea, disc_r, lesions)
    if exu.used:
        _composite(img, exu.mask(), (0.96, 0.86, 0.38), 0.9)
    if cws.used:
        _composite(img, cws.mask(blur_px=max(0.5, s / 256)), (0.93, 0.88, 0.76), 0.75)
    if nv.used:
        _composite(img, nv.mask(), (0.70, 0.14, 0.09), 0.85)
    if red.used:
        _composite(img, red.mask(), (0.42, 0.04, 0.03), 0.9)

    # Camera: exposure, gamma, colour cast, sensor noise; field of view on black.
    img *= cam.uniform(0.8, 1.2) * cam.normal(1.0, 0.05, 3).astype(np.float32)
    img = np.clip(img, 0, 1) ** np.float32(cam.uniform(0.85, 1.15))
    img += cam.normal(0, cam.uniform(0.004, 0.02), img.shape).astype(np.float32)
    fov = np.clip((1 - np.sqrt(r2)) * radius / 1.5, 0, 1)
    if cam.random() < 0.3:  # many cameras clip the circle at top and bottom
        fov *= np.clip((cam.uniform(0.86, 0.95) - np.abs(v)) * radius / 1.5, 0, 1)
    img *= fov[..., None]
    out = (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)
    if cam.random() < 0.35:  # focus blur
        out = np.asarray(Image.fromarray(out).filter(ImageFilter.GaussianBlur(cam.uniform(0.4, 1.3) * s / 256)))
    if label.eye == "left":
        out = out[:, ::-1]
    return np.ascontiguousarray(out)
