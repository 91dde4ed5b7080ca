"""Synthetic colour fundus photographs with diabetic-retinopathy and glaucoma labels.

Tests, the embedded default run and CPU demos need realistic retinal images without a
download.  Each picture is drawn procedurally from its own random stream
(``default_rng([seed, index, stream])``), so a dataset is identical for a seed whatever the number of
worker processes:

* anatomy: circular field of view on black (sometimes clipped top and bottom, as many
  cameras do), orange-to-brown fundus with choroidal texture, illumination gradient and
  vignetting, macula with foveal reflex, optic disc with a cup (cup-to-disc ratio is the
  glaucoma label), arteries and veins branching out of the disc in the four arcades;
* diabetic retinopathy by the ICDR scale: 1 mild = microaneurysms only; 2 moderate = plus
  haemorrhages, hard exudates, occasional cotton-wool spots; 3 severe = many haemorrhages in
  all quadrants, venous beading, cotton-wool spots; 4 proliferative = new vessels (disc or
  elsewhere), sometimes a preretinal haemorrhage or laser scars.  Lesions are a few pixels
  (a microaneurysm is ~1 px at 256 px), so an aggressive crop can miss them, as in real data;
* camera variation: exposure, gamma, colour cast, focus blur, sensor noise, JPEG quality;
  left eyes are the mirror image of right eyes (disc on the other side).

Grades follow APTOS-2019's imbalance (49/10/27/5/8 %), glaucoma classes PAPILA's (68/14/18 %).
Class folder names are RETFound's, so a synthetic tree is a valid RETFound-layout tree.
"""

from __future__ import annotations

import csv
import json
import math
import multiprocessing
import os
import shutil
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from raydino.data.progress import Progress

SYNTH_VERSION = 1  # bump when the pictures change: cache keys include it

DR_CLASSES = ("anodr", "bmilddr", "cmoderatedr", "dseveredr", "eproliferativedr")
DR_NAMES = ("no DR", "mild NPDR", "moderate NPDR", "severe NPDR", "proliferative DR")
DR_PRIOR = (0.493, 0.101, 0.273, 0.053, 0.080)  # APTOS-2019: 1805/370/999/193/295 of 3662
GLAUCOMA_CLASSES = ("anormal", "bsuspectglaucoma", "cglaucoma")  # PAPILA's RETFound folders
GLAUCOMA_PRIOR = (0.68, 0.14, 0.18)
CDR_RANGES = ((0.15, 0.45), (0.45, 0.6), (0.6, 0.85))  # cup-to-disc ratio per glaucoma class
TASKS = {"dr": DR_CLASSES, "glaucoma": GLAUCOMA_CLASSES}
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class FundusLabel:
    index: int
    dr_grade: int
    glaucoma: int
    cup_disc_ratio: float
    eye: str  # "right" (OD) or "left" (OS)
    split: str


# ------------------------------------------------------------------ labels


def _quota(n: int, prior: tuple[float, ...], minimum: int) -> list[int]:
    """Counts per class summing to n, proportional to prior (largest remainder), each >= minimum."""
    k = len(prior)
    minimum = minimum if n >= minimum * k else 0
    raw = [max(minimum, p * n) for p in prior]
    scale = (n - minimum * k) / max(1e-9, sum(r - minimum for r in raw))
    raw = [minimum + (r - minimum) * scale for r in raw]
    counts = [int(math.floor(r)) for r in raw]
    for i in sorted(range(k), key=lambda i: raw[i] - counts[i], reverse=True)[: n - sum(counts)]:
        counts[i] += 1
    return counts


def sample_labels(n: int, seed: int, split_fractions: tuple[float, float, float] = (0.7, 0.15, 0.15)) -> list[FundusLabel]:
    """Labels for n images: grades with a realistic imbalance, splits stratified by grade.

    Counts are quotas rather than independent draws so that even a small set (the smoke
    config's 96 images) has every grade in every split.
    """
    if n < 1:
        raise ValueError(f"n={n}: need at least one image")
    if len(split_fractions) != 3 or min(split_fractions) < 0 or abs(sum(split_fractions) - 1) > 1e-6:
        raise ValueError(f"split fractions {split_fractions}: need three non-negative numbers summing to 1 (train, val, test)")
    rng = np.random.default_rng([seed, 2**31 - 1])
    grades = np.repeat(np.arange(5), _quota(n, DR_PRIOR, minimum=3))
    rng.shuffle(grades)
    glaucoma = np.repeat(np.arange(3), _quota(n, GLAUCOMA_PRIOR, minimum=3))
    rng.shuffle(glaucoma)
    split_of = np.empty(n, dtype=object)
    for g in range(5):
        idx = np.flatnonzero(grades == g)
        rng.shuffle(idx)
        n_train, n_val, _ = _quota(len(idx), split_fractions, minimum=1 if len(idx) >= 3 else 0)
        split_of[idx[:n_train]] = "train"
        split_of[idx[n_train : n_train + n_val]] = "val"
        split_of[idx[n_train + n_val :]] = "test"
    labels = []
    for i in range(n):
        lo, hi = CDR_RANGES[int(glaucoma[i])]
        cdr = round(float(rng.uniform(lo, hi)), 3)
        eye = "right" if rng.random() < 0.5 else "left"
        labels.append(FundusLabel(i, int(grades[i]), int(glaucoma[i]), cdr, eye, str(split_of[i])))
    return labels


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
             nv: _Canvas, disc: np.ndarray, fovea: np.ndarray, disc_r: float) -> None:  # fmt: skip
    """Draw the lesions that define ICDR grade ``grade``."""
    if grade == 0:
        return
    pole = (disc + fovea) / 2
    counts = {  # (microaneurysms, haemorrhages, exudate clusters, cotton-wool spots)
        1: (rng.integers(1, 5), 0, 0, 0),
        2: (rng.integers(2, 11), rng.integers(1, 7), rng.integers(0, 3), rng.integers(0, 3)),
        3: (rng.integers(5, 16), rng.integers(12, 31), rng.integers(0, 4), rng.integers(1, 5)),
        4: (rng.integers(3, 13), rng.integers(4, 21), rng.integers(0, 4), rng.integers(0, 4)),
    }[grade]
    n_ma, n_hem, n_he, n_cws = (int(x) for x in counts)
    for p in _random_points(rng, n_ma, pole, 0.75, disc, disc_r * 1.2):
        r = rng.uniform(0.004, 0.008)
        red.blob(p[0], p[1], r, r, 0.0)
    for p in _random_points(rng, n_hem, pole if grade < 3 else np.zeros(2), 0.85, disc, disc_r * 1.3):
        if rng.random() < 0.6:  # dot / blot: a few overlapping blobs
            for _ in range(rng.integers(1, 4)):
                q = p + rng.normal(0, 0.008, 2)
                red.blob(q[0], q[1], rng.uniform(0.01, 0.025), rng.uniform(0.01, 0.025), rng.uniform(0, math.pi))
        else:  # flame: elongated, radial to the disc
            d = p - disc
            red.blob(p[0], p[1], rng.uniform(0.025, 0.045), rng.uniform(0.008, 0.014), math.atan2(d[1], d[0]))
    for centre in _random_points(rng, n_he, fovea, 0.35, disc, disc_r * 1.5):
        for q in _random_points(rng, int(rng.integers(4, 16)), centre, 0.06, fovea, 0.02):
            r = rng.uniform(0.004, 0.011)
            exudate.blob(q[0], q[1], r, r * rng.uniform(0.6, 1.0), rng.uniform(0, math.pi))
    for p in _random_points(rng, n_cws, pole, 0.55, disc, disc_r * 1.4):
        cotton.blob(p[0], p[1], rng.uniform(0.02, 0.04), rng.uniform(0.015, 0.03), rng.uniform(0, math.pi))
    if grade == 4:
        sites = [disc] if rng.random() < 0.55 else []
        sites += _random_points(rng, int(rng.integers(0 if sites else 1, 3)), pole, 0.7, fovea, 0.15)
        for site in sites:  # new vessels: a tuft of fine, tortuous loops
            for _ in range(rng.integers(6, 14)):
                p = site + rng.normal(0, 0.03, 2)
                h = rng.uniform(0, 2 * math.pi)
                for _ in range(rng.integers(4, 9)):
                    h += rng.normal(0, 0.9)
                    q = p + 0.015 * np.array([math.cos(h), math.sin(h)])
                    nv.line(p, q, rng.uniform(0.003, 0.005))
                    p = q
        if rng.random() < 0.3:  # preretinal (boat-shaped) haemorrhage below an arcade
            p = _random_points(rng, 1, pole, 0.5, disc, disc_r * 1.5)
            if p:
                red.blob(p[0][0], p[0][1], rng.uniform(0.05, 0.09), rng.uniform(0.03, 0.05), rng.normal(0, 0.2))
        if rng.random() < 0.25:  # panretinal laser scars in the periphery
            for p in _random_points(rng, int(rng.integers(30, 80)), np.zeros(2), 0.93, fovea, 0.6):
                exudate.blob(p[0], p[1], 0.012, 0.012, 0.0, value=150)
                red.blob(p[0], p[1], 0.006, 0.006, 0.0, value=200)


def render_fundus(size: int, label: FundusLabel, seed: int) -> np.ndarray:
    """One synthetic colour fundus photograph, uint8 (size, size, 3)."""
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
    _lesions(lesion_rng, label.dr_grade, red, exu, cws, nv, disc, fovea, disc_r)
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


# ------------------------------------------------------------------ datasets on disk


def image_relpath(label: FundusLabel, task: str, fmt: str) -> str:
    cls = TASKS[task][label.dr_grade if task == "dr" else label.glaucoma]
    ext = "jpg" if fmt == "jpeg" else "png"
    return f"{label.split}/{cls}/synth-{label.index:06d}.{ext}"


def _write_images(out: str, labels: list[FundusLabel], size: int, seed: int, fmt: str, task: str) -> int:
    written = 0
    for lab in labels:
        arr = render_fundus(size, lab, seed)
        path = os.path.join(out, image_relpath(lab, task, fmt))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        img = Image.fromarray(arr)
        if fmt == "jpeg":
            quality = int(np.random.default_rng([seed, lab.index, 7]).integers(85, 97))
            img.save(path, format="JPEG", quality=quality)
        else:
            img.save(path, format="PNG", compress_level=1)
        written += os.path.getsize(path)
    return written


@dataclass
class SynthSummary:
    out: str
    n: int
    size: int
    seed: int
    format: str
    task: str
    elapsed_s: float
    images_per_s: float
    bytes: int
    by_split: dict[str, int]
    by_class: dict[str, int]
    by_dr_grade: dict[str, int]
    by_glaucoma: dict[str, int]
    workers: int
    version: int = SYNTH_VERSION


def generate_dataset(
    out: str,
    n: int,
    size: int = 256,
    seed: int = 0,
    *,
    fmt: str = "jpeg",
    task: str = "dr",
    split_fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
    workers: int | None = None,
    preview: bool = False,
    progress: bool = True,
) -> SynthSummary:
    """Write n synthetic photographs as ``out/{train,val,test}/<class>/`` plus ``labels.csv``.

    ``task`` picks the folder classes ("dr": ICDR grade, "glaucoma": cup-to-disc class);
    ``labels.csv`` always carries both tasks.  Also writes ``synth.json`` (parameters, counts,
    speed) and, with ``preview``, ``preview.png`` (a contact sheet per grade).
    """
    if fmt not in ("jpeg", "png"):
        raise ValueError(f"format {fmt!r}: allowed jpeg, png")
    if task not in TASKS:
        raise ValueError(f"task {task!r}: allowed {', '.join(TASKS)}")
    if size < 16:
        raise ValueError(f"size={size}: need at least 16 px")
    labels = sample_labels(n, seed, split_fractions)
    _prepare_out(out)
    if workers is None:  # processes cost ~1 s to start: worth it from ~200 images at 256 px
        workers = (os.cpu_count() or 1) if n * (size / 256) ** 2 >= 200 else 1
    workers = max(1, min(workers, len(range(0, n, 16))))
    t0 = time.monotonic()
    bar = Progress(n, "synth", unit="images", enabled=progress)
    total_bytes = 0
    chunks = [labels[i : i + 16] for i in range(0, n, 16)]
    if workers == 1:
        for chunk in chunks:
            total_bytes += _write_images(out, chunk, size, seed, fmt, task)
            bar.update(len(chunk))
    else:
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
            futures = [(len(ch), pool.submit(_write_images, out, ch, size, seed, fmt, task)) for ch in chunks]
            for k, fut in futures:
                total_bytes += fut.result()
                bar.update(k)
    bar.close()
    elapsed = time.monotonic() - t0
    _write_labels_csv(out, labels, task, fmt)
    summary = SynthSummary(
        out=os.path.abspath(out), n=n, size=size, seed=seed, format=fmt, task=task,
        elapsed_s=round(elapsed, 3), images_per_s=round(n / elapsed, 1) if elapsed > 0 else 0.0,
        bytes=total_bytes,
        by_split={s: c for s in SPLITS if (c := sum(1 for lab in labels if lab.split == s))},
        by_class=dict(sorted(Counter(image_relpath(lab, task, fmt).split("/")[1] for lab in labels).items())),
        by_dr_grade={DR_CLASSES[g]: c for g, c in sorted(Counter(lab.dr_grade for lab in labels).items())},
        by_glaucoma={GLAUCOMA_CLASSES[g]: c for g, c in sorted(Counter(lab.glaucoma for lab in labels).items())},
        workers=workers,
    )  # fmt: skip
    Path(out, "synth.json").write_text(json.dumps(asdict(summary), indent=2) + "\n")
    if preview:
        write_preview(out, labels, task, fmt)
    return summary


def _prepare_out(out: str) -> None:
    """Create ``out``; replace an earlier synthetic set there, refuse to mix with other files."""
    if os.path.isdir(out) and os.listdir(out):
        if not os.path.exists(os.path.join(out, "synth.json")):
            raise FileExistsError(f"output folder {out} is not empty and holds no earlier synthetic set; choose an empty folder")
        for name in (*SPLITS, "labels.csv", "synth.json", "preview.png"):
            path = os.path.join(out, name)
            if os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.exists(path):
                os.remove(path)
    os.makedirs(out, exist_ok=True)


def _write_labels_csv(out: str, labels: list[FundusLabel], task: str, fmt: str) -> None:
    with open(os.path.join(out, "labels.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "split", "dr_grade", "dr_class", "glaucoma", "glaucoma_class", "cup_disc_ratio", "eye"])
        for lab in labels:
            rel = image_relpath(lab, task, fmt)
            w.writerow([rel, rel.split("/")[1], lab.split, lab.dr_grade, DR_CLASSES[lab.dr_grade], lab.glaucoma,
                        GLAUCOMA_CLASSES[lab.glaucoma], lab.cup_disc_ratio, lab.eye])  # fmt: skip


def write_preview(out: str, labels: list[FundusLabel], task: str, fmt: str, per_row: int = 6, tile: int = 128) -> str:
    """Contact sheet ``out/preview.png``: one row per DR grade, a few images each."""
    rows = [[lab for lab in labels if lab.dr_grade == g][:per_row] for g in range(5)]
    label_w = 150
    sheet = Image.new("RGB", (label_w + per_row * tile, 5 * tile), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for g, row in enumerate(rows):
        draw.text((6, g * tile + tile // 2 - 14), f"grade {g}\n{DR_NAMES[g]}\n({len([x for x in labels if x.dr_grade == g])} images)", fill=(0, 0, 0))
        for j, lab in enumerate(row):
            with Image.open(os.path.join(out, image_relpath(lab, task, fmt))) as im:
                sheet.paste(im.convert("RGB").resize((tile, tile), Image.Resampling.BILINEAR), (label_w + j * tile, g * tile))
    path = os.path.join(out, "preview.png")
    sheet.save(path)
    return path


def synthetic_shards(
    n: int, size: int, seed: int, cache_root: str = ".raydino/synthetic", workers: int | None = None, progress: bool = True
) -> str:
    """Shards of a synthetic dataset, built once and cached; returns their local URI.

    The embedded default (``data.uri: null``) trains on these.  The cache key holds every
    parameter and `SYNTH_VERSION`, so changing any of them builds a fresh set.
    """
    from raydino.data.shards import MANIFEST_NAME  # local: keep synth importable on its own
    from raydino.data.writer import ShardJobOptions, shard_dataset

    root = os.path.abspath(os.path.join(cache_root, f"n{n}-s{size}-seed{seed}-v{SYNTH_VERSION}"))
    shards = os.path.join(root, "shards")
    manifest = os.path.join(shards, MANIFEST_NAME)
    if os.path.exists(manifest):
        with open(manifest) as f:
            if json.load(f).get("row_order"):
                return shards
        # Sharded by a raydino that kept the source order (class by class): shard the images again.
    images = os.path.join(root, "images")
    if not os.path.exists(os.path.join(images, "synth.json")):  # written last: absent = never made, or interrupted
        shutil.rmtree(images, ignore_errors=True)  # the cache's own folder: a half-made set is started again
        generate_dataset(images, n, size, seed, workers=workers, progress=progress)
    est_mb = sum(f.stat().st_size for f in Path(images).rglob("*.jpg")) / 2**20
    # Several shards even for a small set, so Ray Data can read them in parallel.
    target = max(0.001, est_mb / max(4, 2 * (workers or os.cpu_count() or 1)))
    shard_dataset(images, shards, options=ShardJobOptions(target_shard_mb=target, dataset="synthetic", workers=workers, progress=progress))
    return shards
