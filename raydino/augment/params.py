"""Every random draw of the multi-crop augmentation, made up front for a whole batch, vectorised in numpy.

Drawing the parameters apart from applying them lets the CPU and device pipelines share one set
of draws (same crops, same colours), and lets tests check the distributions against DINO's
(torchvision's RandomResizedCrop and ColorJitter, PIL's blur and solarize) without decoding an image.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, fields

import numpy as np

from raydino.config import AugmentConfig

JITTER_OPS = ("brightness", "contrast", "saturation", "hue")
# All 24 orders of the four jitter ops; a crop's order is an index into this table.
JITTER_ORDERS = np.array(list(itertools.permutations(range(4))), dtype=np.int64)
N_BIAS_COEFFS = 10  # 2-D polynomial of order 3: x^i y^j with i + j <= 3


@dataclass
class CropParams:
    """Every random draw for a batch: arrays shaped [B, K] (K = 2 + n_local, globals first).

    Exposed so tests (and curious users) can check the distributions directly; `area_fraction`
    and `aspect_ratio` are recovered from the sampled crop boxes.
    """

    image_height: np.ndarray  # [B]
    image_width: np.ndarray  # [B]
    top: np.ndarray
    left: np.ndarray
    height: np.ndarray
    width: np.ndarray
    fallback: np.ndarray  # RandomResizedCrop found no valid box in 10 tries -> centre crop
    flip: np.ndarray
    jitter: np.ndarray
    jitter_order: np.ndarray  # index into JITTER_ORDERS
    brightness: np.ndarray
    contrast: np.ndarray
    saturation: np.ndarray
    hue: np.ndarray
    grayscale: np.ndarray
    blur: np.ndarray
    blur_sigma: np.ndarray
    solarize: np.ndarray
    med_blur: np.ndarray
    noise: np.ndarray
    bias_field: np.ndarray
    bias_coeffs: np.ndarray  # [B, K, 10]
    noise_seed: np.ndarray  # [B]: seeds the torch Generator of the Gaussian noise

    @property
    def area_fraction(self) -> np.ndarray:
        image_area = self.image_height * self.image_width
        return self.height * self.width / (image_area[:, None] if self.height.ndim == 2 else image_area)

    @property
    def aspect_ratio(self) -> np.ndarray:
        return self.width / self.height

    def select(self, b: np.ndarray, k: np.ndarray) -> CropParams:
        """The draws of crops (b[i], k[i]) as a flat [N] view (used to lay crops out in slot order)."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            out[f.name] = v[b] if v.ndim == 1 else v[b, k]
        return CropParams(**out)


def _random_resized_boxes(
    rng: np.random.Generator, H: np.ndarray, W: np.ndarray, scale: np.ndarray, ratio: tuple[float, float]
) -> tuple[np.ndarray, ...]:
    """torchvision's RandomResizedCrop.get_params, vectorised over [B, K] crops.

    Ten tries of (area ~ U(scale) * H*W, log-ratio ~ U(log ratio)); the first box that fits wins;
    if none fits, a centre crop of the whole image clamped to the ratio range.  scale: [K, 2].
    """
    B, K, tries = H.shape[0], scale.shape[0], 10
    area = (H * W).astype(np.float64)[:, None, None]
    lo, hi = scale[:, 0][None, :, None], scale[:, 1][None, :, None]
    target = area * (lo + (hi - lo) * rng.random((B, K, tries)))
    log_r = np.log(ratio)
    aspect = np.exp(log_r[0] + (log_r[1] - log_r[0]) * rng.random((B, K, tries)))
    w = np.round(np.sqrt(target * aspect)).astype(np.int64)  # round-half-even, like Python's round
    h = np.round(np.sqrt(target / aspect)).astype(np.int64)
    Hc, Wc = H[:, None, None], W[:, None, None]
    ok = (w > 0) & (w <= Wc) & (h > 0) & (h <= Hc)
    first = ok.argmax(axis=2)
    found = ok.any(axis=2)
    h = np.take_along_axis(h, first[..., None], 2)[..., 0]
    w = np.take_along_axis(w, first[..., None], 2)[..., 0]
    Hb, Wb = np.broadcast_to(H[:, None], (B, K)), np.broadcast_to(W[:, None], (B, K))
    # fallback: whole image, clamped to the ratio range, centred
    in_ratio = Wb / Hb
    fw = np.where(in_ratio < ratio[0], Wb, np.where(in_ratio > ratio[1], np.round(Hb * ratio[1]), Wb)).astype(np.int64)
    fh = np.where(in_ratio < ratio[0], np.round(Wb / ratio[0]), Hb).astype(np.int64)
    h, w = np.where(found, h, fh), np.where(found, w, fw)
    top = np.floor(rng.random((B, K)) * (Hb - h + 1)).astype(np.int64)
    left = np.floor(rng.random((B, K)) * (Wb - w + 1)).astype(np.int64)
    top, left = np.where(found, top, (Hb - h) // 2), np.where(found, left, (Wb - w) // 2)
    return top, left, h, w, ~found


def sample_params(cfg: AugmentConfig, sizes: Sequence[tuple[int, int]], rng: np.random.Generator) -> CropParams:
    """Draw every random parameter for B images of the given (height, width)."""
    H = np.array([s[0] for s in sizes], dtype=np.int64)
    W = np.array([s[1] for s in sizes], dtype=np.int64)
    B, K = len(sizes), 2 + cfg.n_local_crops
    scale = np.array([cfg.global_crop_scale] * 2 + [cfg.local_crop_scale] * cfg.n_local_crops, dtype=np.float64)
    top, left, h, w, fallback = _random_resized_boxes(rng, H, W, scale, cfg.crop_ratio)

    def bern(p: float | np.ndarray) -> np.ndarray:
        return rng.random((B, K)) < p

    def unif(lo: float, hi: float) -> np.ndarray:
        return lo + (hi - lo) * rng.random((B, K))

    blur_p = np.array([cfg.blur_p_global1, cfg.blur_p_global2] + [cfg.blur_p_local] * cfg.n_local_crops)
    solarize_p = np.array([0.0, cfg.solarize_p_global2] + [0.0] * cfg.n_local_crops)
    b, c, s = cfg.jitter_brightness, cfg.jitter_contrast, cfg.jitter_saturation
    return CropParams(
        image_height=H,
        image_width=W,
        top=top,
        left=left,
        height=h,
        width=w,
        fallback=fallback,
        flip=bern(cfg.flip_p),
        jitter=bern(cfg.jitter_p),
        jitter_order=rng.integers(0, len(JITTER_ORDERS), (B, K)),
        # torchvision ColorJitter: factor ~ U(max(0, 1 - x), 1 + x); hue ~ U(-h, h)
        brightness=unif(max(0.0, 1 - b), 1 + b),
        contrast=unif(max(0.0, 1 - c), 1 + c),
        saturation=unif(max(0.0, 1 - s), 1 + s),
        hue=unif(-cfg.jitter_hue, cfg.jitter_hue),
        grayscale=bern(cfg.grayscale_p),
        blur=bern(blur_p),
        blur_sigma=unif(*cfg.blur_sigma),
        solarize=bern(solarize_p),
        med_blur=bern(cfg.med_blur_p) if cfg.med_blur_sigma > 0 else np.zeros((B, K), bool),
        noise=bern(cfg.noise_p) if cfg.noise_std > 0 else np.zeros((B, K), bool),
        bias_field=bern(cfg.bias_field_p) if cfg.bias_field > 0 else np.zeros((B, K), bool),
        bias_coeffs=cfg.bias_field * (2 * rng.random((B, K, N_BIAS_COEFFS)) - 1),
        noise_seed=rng.integers(0, 2**62, B),
    )
