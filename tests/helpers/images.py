"""Images for tests: RETFound-layout trees (ROOT/{train,val,test}/<class>/<image>) and encoded bytes."""

from __future__ import annotations

import io
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from raydino.data.labelled import SPLITS

# Class c of make_tree is a disc of COLOURS[c]: a probe can learn it from a few images.
COLOURS = [(200, 40, 40), (40, 200, 40), (40, 40, 200), (200, 200, 40)]


def write_tree(root: Path, counts: Mapping[str, Mapping[str, int]], image: Callable[[str, str, int], Image.Image | bytes], ext: str = "png") -> Path:
    """ROOT/<split>/<class>/<i>.<ext> for i < counts[split][class], each `image(split, class, i)`: a PIL
    image (saved in the format `ext` names) or encoded bytes (written as they are).  Every class named
    gets its folder, an empty one too."""
    for split, classes in counts.items():
        for cls, n in classes.items():
            d = root / split / cls
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                made = image(split, cls, i)
                if isinstance(made, bytes):
                    (d / f"{i}.{ext}").write_bytes(made)
                else:
                    made.save(d / f"{i}.{ext}")
    return root


def make_tree(root: Path, per_split=(8, 4, 4), n_classes: int = 3, size: int = 40, seed: int = 0, skip=(), jitter: float = 3.0) -> Path:
    """A tiny labelled tree: a coloured disc on a dark background, the colour is the class (grade<c>).

    `per_split` images per class in train, val, test; none for the (split, class) pairs in `skip`; the
    disc's centre moves up to `jitter` pixels (0: always centred)."""
    rng = np.random.default_rng(seed)
    colour = {f"grade{c}": COLOURS[c] for c in range(n_classes)}

    def disc(split: str, cls: str, i: int) -> Image.Image:
        im = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(0, 40, 3)))
        r = size * rng.uniform(0.25, 0.4)
        cx, cy = size / 2 + (rng.uniform(-jitter, jitter, 2) if jitter else np.zeros(2))
        ImageDraw.Draw(im).ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour[cls])
        return im

    counts = {split: {cls: 0 if (split, c) in skip else n for c, cls in enumerate(colour)} for split, n in zip(SPLITS, per_split)}
    return write_tree(root, counts, disc)


def jpeg_bytes(arr: np.ndarray, quality: int = 90, **save_kw) -> bytes:
    """`arr` (HWC uint8) as a JPEG file's bytes; `save_kw` go to PIL (exif=, comment=, progressive=, ...)."""
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=quality, **save_kw)
    return buf.getvalue()


def png_bytes(arr: np.ndarray, **save_kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG", **save_kw)
    return buf.getvalue()
