"""Synthetic datasets of colour fundus photographs with diabetic-retinopathy and glaucoma labels.

Tests, the embedded default run and CPU demos need realistic retinal images without a
download.  The labels are drawn here (`sample_labels`), each picture by
`raydino.data.fundus.render_fundus` from its own random stream, so a dataset is identical for a
seed whatever the number of worker processes.  JPEG quality varies per image, like the cameras.

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
from PIL import Image, ImageDraw

from raydino.data.fundus import DEFAULT_LESIONS, FundusLabel, LesionScale, render_fundus
from raydino.progress import Progress

SYNTH_VERSION = 1  # bump when the pictures change: cache keys include it

DR_CLASSES = ("anodr", "bmilddr", "cmoderatedr", "dseveredr", "eproliferativedr")
DR_NAMES = ("no DR", "mild NPDR", "moderate NPDR", "severe NPDR", "proliferative DR")
DR_PRIOR = (0.493, 0.101, 0.273, 0.053, 0.080)  # APTOS-2019: 1805/370/999/193/295 of 3662
GLAUCOMA_CLASSES = ("anormal", "bsuspectglaucoma", "cglaucoma")  # PAPILA's RETFound folders
GLAUCOMA_PRIOR = (0.68, 0.14, 0.18)
CDR_RANGES = ((0.15, 0.45), (0.45, 0.6), (0.6, 0.85))  # cup-to-disc ratio per glaucoma class
TASKS = {"dr": DR_CLASSES, "glaucoma": GLAUCOMA_CLASSES}
SPLITS = ("train", "val", "test")


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


# ------------------------------------------------------------------ datasets on disk


def image_relpath(label: FundusLabel, task: str, fmt: str) -> str:
    cls = TASKS[task][label.dr_grade if task == "dr" else label.glaucoma]
    ext = "jpg" if fmt == "jpeg" else "png"
    return f"{label.split}/{cls}/synth-{label.index:06d}.{ext}"


def _write_images(out: str, labels: list[FundusLabel], size: int, seed: int, fmt: str, task: str, lesions: LesionScale) -> int:
    written = 0
    for lab in labels:
        arr = render_fundus(size, lab, seed, lesions)
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
    lesion_size: float = 1.0
    lesion_count: float = 1.0
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
    lesions: LesionScale = DEFAULT_LESIONS,
    workers: int | None = None,
    preview: bool = False,
    progress: bool = True,
) -> SynthSummary:
    """Write n synthetic photographs as ``out/{train,val,test}/<class>/`` plus ``labels.csv``.

    ``task`` picks the folder classes ("dr": ICDR grade, "glaucoma": cup-to-disc class);
    ``labels.csv`` always carries both tasks; ``lesions`` scales the DR lesions' size and count.  Also writes ``synth.json`` (parameters, counts,
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
            total_bytes += _write_images(out, chunk, size, seed, fmt, task, lesions)
            bar.update(len(chunk))
    else:
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
            futures = [(len(ch), pool.submit(_write_images, out, ch, size, seed, fmt, task, lesions)) for ch in chunks]
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
        workers=workers, lesion_size=lesions.size, lesion_count=lesions.count,
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
    n: int,
    size: int,
    seed: int,
    cache_root: str = ".raydino/synthetic",
    workers: int | None = None,
    progress: bool = True,
    task: str = "dr",
    lesions: LesionScale = DEFAULT_LESIONS,
    split_fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
) -> str:
    """Shards of a synthetic dataset, built once and cached; returns their local URI.

    The embedded default (``data.uri: null``) trains on these.  The cache key holds every
    parameter and `SYNTH_VERSION`, so changing any of them builds a fresh set.
    """
    from raydino.data.shards import MANIFEST_NAME  # local: keep synth importable on its own
    from raydino.data.writer import ShardJobOptions, shard_dataset

    key = f"n{n}-s{size}-seed{seed}-v{SYNTH_VERSION}" + ("" if task == "dr" else f"-{task}")  # dr: the key older caches have
    if not lesions.is_default:
        key += f"-lesions{lesions.size:g}x{lesions.count:g}"
    if tuple(split_fractions) != (0.7, 0.15, 0.15):
        key += "-splits" + "-".join(f"{f:g}" for f in split_fractions)
    root = os.path.abspath(os.path.join(cache_root, key))
    shards = os.path.join(root, "shards")
    manifest = os.path.join(shards, MANIFEST_NAME)
    if os.path.exists(manifest):
        try:
            with open(manifest, encoding="utf-8") as f:
                if json.load(f).get("row_order"):
                    return shards
        except ValueError:  # a corrupt manifest in raydino's own cache (an interrupted write): shard again
            pass
        # Sharded by a raydino that kept the source order (class by class): shard the images again.
    images = os.path.join(root, "images")
    if not os.path.exists(os.path.join(images, "synth.json")):  # written last: absent = never made, or interrupted
        shutil.rmtree(images, ignore_errors=True)  # the cache's own folder: a half-made set is started again
        generate_dataset(images, n, size, seed, task=task, split_fractions=split_fractions, lesions=lesions, workers=workers, progress=progress)
    est_mb = sum(f.stat().st_size for f in Path(images).rglob("*.jpg")) / 2**20
    # Several shards even for a small set, so Ray Data can read them in parallel.
    target = max(0.001, est_mb / max(4, 2 * (workers or os.cpu_count() or 1)))
    shard_dataset(images, shards, options=ShardJobOptions(target_shard_mb=target, dataset="synthetic", workers=workers, progress=progress))
    return shards
