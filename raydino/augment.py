"""DINO multi-crop augmentation on uint8 tensors, fast on one CPU core.

Semantics are DINO's `DataAugmentationDINO` (and the paper's medical artefacts), parameter for
parameter; every knob is a field of `raydino.config.AugmentConfig`:

    2 global crops   RandomResizedCrop(global_crop_size, global_crop_scale, ratio), bicubic
    n local crops    RandomResizedCrop(local_crop_size, local_crop_scale, ratio), bicubic
    every crop       flip (flip_p) -> ColorJitter(b, c, s, h) in a random order (jitter_p)
                     -> grayscale (grayscale_p) -> Gaussian blur, sigma ~ U(blur_sigma), with
                     p = blur_p_global1 / blur_p_global2 / blur_p_local -> solarize (global 2 only)
                     -> medical artefacts (med blur, Gaussian noise, bias field; see below)

Output: uint8 CHW crops, globals first.  Normalisation happens later on the training device
(`normalize_on_device`).

Why it is faster (DINO's PIL pipeline manages ~65 images/s per core; see docs/augment.md):
  * every random number of a batch is drawn up front, vectorised, in numpy (`sample_params`);
  * the image is decoded once (JPEG draft mode when every crop allows it, see `_draft_scale`);
  * each crop is cut as a view and resized on uint8 with torch's native antialiased bicubic kernel
    (a channels-last view for the OpenCV backend: the kernel's own layout, ~25 % faster);
  * photometric ops, two interchangeable backends (same draws, outputs within +-1 grey level):
    - "opencv" (the CPU default when OpenCV is installed, `raydino.augment_cv`): crop by crop, all
      ops of a crop back to back on a float32 HWC crop that stays in L2, each op one SIMD pass;
    - "torch" (the fallback, and the device pipeline's ops): crops of one kind stacked and every
      op batched in float32 on [0, 255]; crops laid out by the step at which their hue op runs
      (`jitter_blocks`), so each of the 4 jitter steps is at most 3 calls whatever the mix of
      random orders; the blur a separable, radius-grouped Gaussian (shift-and-add).
Photometric ops keep float precision between steps (torchvision/PIL round to uint8 after every
op); the parameter distributions are identical to DINO's, which tests/test_augment_distribution.py
checks against a PIL/torchvision reference.
"""

from __future__ import annotations

import io
import itertools
import math
import warnings
from dataclasses import dataclass, fields
from types import SimpleNamespace
from typing import Sequence, Union

import numpy as np
import torch
import torch.nn.functional as TF
from PIL import Image

from .config import AugmentConfig

try:  # the fast CPU backend; without OpenCV the batched torch backend does the same ops
    from . import augment_cv as _cv

    _CV_ERROR = ""
except ImportError as _e:  # pragma: no cover - depends on the environment
    _cv, _CV_ERROR = None, f"{type(_e).__name__}: {_e}"

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
GRAY_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R 601-2, as PIL's convert("L")
JITTER_OPS = ("brightness", "contrast", "saturation", "hue")
# All 24 orders of the four jitter ops; a crop's order is an index into this table.
JITTER_ORDERS = np.array(list(itertools.permutations(range(4))), dtype=np.int64)
N_BIAS_COEFFS = 10  # 2-D polynomial of order 3: x^i y^j with i + j <= 3
TILE_ELEMS = 1 << 20  # floats (4 MB) per group of crops in jitter and blur: cache-sized, few calls

BACKENDS = ("auto", "opencv", "torch")
ImageInput = Union[torch.Tensor, np.ndarray, bytes, bytearray, memoryview]


def crop_shapes(cfg: AugmentConfig) -> dict[str, tuple[int, int, int]]:
    """Crop name -> (C, H, W) of what `augment_batch` emits per image (globals first)."""
    shapes = {f"global_{i}": (3, cfg.global_crop_size, cfg.global_crop_size) for i in range(2)}
    shapes.update({f"local_{i}": (3, cfg.local_crop_size, cfg.local_crop_size) for i in range(cfg.n_local_crops)})
    return shapes


def normalize_on_device(crops: torch.Tensor, mean: Sequence[float] = IMAGENET_MEAN,
                        std: Sequence[float] = IMAGENET_STD) -> torch.Tensor:
    """uint8 [..., 3, H, W] (any device) -> float32 (x/255 - mean) / std, computed where it lives."""
    if crops.dtype != torch.uint8:
        raise ValueError(f"normalize_on_device expects uint8 crops, got dtype {crops.dtype}")
    if crops.dim() < 3 or crops.shape[-3] != 3:
        raise ValueError(f"normalize_on_device expects [..., 3, H, W], got shape {tuple(crops.shape)}")
    scale = torch.tensor([1.0 / (255.0 * s) for s in std], device=crops.device).view(3, 1, 1)
    shift = torch.tensor([m / s for m, s in zip(mean, std)], device=crops.device).view(3, 1, 1)
    return crops.float().mul_(scale).sub_(shift)


# ------------------------------------------------------------------ random parameters


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

    def select(self, b: np.ndarray, k: np.ndarray) -> "CropParams":
        """The draws of crops (b[i], k[i]) as a flat [N] view (used to lay crops out in slot order)."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            out[f.name] = v[b] if v.ndim == 1 else v[b, k]
        return CropParams(**out)


def _random_resized_boxes(rng: np.random.Generator, H: np.ndarray, W: np.ndarray, scale: np.ndarray,
                          ratio: tuple[float, float]) -> tuple[np.ndarray, ...]:
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
        image_height=H, image_width=W, top=top, left=left, height=h, width=w, fallback=fallback,
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


# ------------------------------------------------------------------ photometric ops (batched, any device)
# x: float32 [N, 3, H, W] on [0, 255], contiguous, modified in place.  Per-crop factors are numpy
# arrays of length N.  Every op below is written as a few whole-tensor passes (in place where it
# can): on one CPU core the cost is memory passes and per-call overhead, not arithmetic.


def _col(v: np.ndarray, x: torch.Tensor) -> torch.Tensor:
    """Per-crop scalars as an [N, 1, 1, 1] tensor on x's device."""
    return torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)).to(x.device).view(-1, 1, 1, 1)


def luma(x: torch.Tensor) -> torch.Tensor:
    """[N, 1, H, W] luma, ITU-R 601-2 (PIL's convert("L"), torchvision's rgb_to_grayscale)."""
    y = torch.mul(x[:, 0:1], GRAY_WEIGHTS[0])  # three plane passes: cheaper than a K=3 matmul
    return y.add_(x[:, 1:2], alpha=GRAY_WEIGHTS[1]).add_(x[:, 2:3], alpha=GRAY_WEIGHTS[2])


def blend_(x: torch.Tensor, weight: np.ndarray, is_saturation: np.ndarray, is_contrast: np.ndarray) -> None:
    """x <- clamp(lerp(x, target, weight), 0, 255) with a per-crop target.

    Brightness, contrast and saturation are all blends (torchvision's and PIL's definitions):
    towards black (weight 1 - b), towards the crop's mean luma (1 - c) and towards the per-pixel
    luma (1 - s).  One form, so crops doing different ops at the same step share one call.
    """
    if is_saturation.any() or is_contrast.any():
        y = luma(x)
        mean = y.mean(dim=(2, 3), keepdim=True)
        target = y.mul_(_col(is_saturation, x)).add_(mean.mul_(_col(is_contrast, x)))
        x.lerp_(target, _col(weight, x))
    else:
        x.mul_(_col(1.0 - weight, x))
    if (weight < 0).any():  # a factor > 1 extrapolates and can leave [0, 255]; a blend cannot
        x.clamp_(0, 255)


_HUE_OFFSETS = torch.tensor([0.0, -2.0, 2.0]).view(1, 3, 1)  # R, G, B sit 0, -2, +2 sextants from red


def adjust_hue_(x: torch.Tensor, shift: np.ndarray) -> None:
    """Rotate the HSV hue by `shift` turns (|shift| <= 0.5), keeping value and saturation.

    Same function as torchvision's adjust_hue (rgb -> hsv -> rgb), rewritten branch-free because
    comparisons, `where` and integer ops are slow on CPU tensors while arithmetic is fast:
      max, min, C = max - min; sign s = +1 if g >= b else -1;
      hue position phi = s * (g + b - r + min - 2 max) / C + 6 * shift   (sextants, red = 0)
      channel = min + C * (2 - clamp(| |phi + o| - 3 |, 1, 2)),  o = 0, -2, +2 for R, G, B
    (the "alternative" HSV->RGB formula; | |t| - 3 | is the 6-periodic wrap, exact for |t| <= 7).
    """
    n, _, h, w = x.shape
    flat = x.view(n, 3, h * w)
    r, g, b = flat.unbind(1)
    vmax, vmin = flat.amax(dim=1), flat.amin(dim=1)
    phi = torch.add(g, b).sub_(r).add_(vmin).sub_(vmax).sub_(vmax)
    chroma = vmax.sub_(vmin).clamp_min_(1e-6)  # grey pixels: phi = 0 and the output is min + ~1e-6
    # sign(g - b) with ties counted as g >= b, from fast ops only (sign_ is ~5x slower than these)
    phi.div_(chroma).mul_(torch.sub(g, b).mul_(1e30).add_(1.0).clamp_(-1.0, 1.0))
    phi.add_(torch.from_numpy(np.asarray(shift, dtype=np.float32) * 6.0).to(x.device).view(n, 1))
    if np.abs(shift).max() > 1 / 6:  # keep |phi + o| <= 7, where the folded wrap below is exact
        phi.sub_(torch.round(phi / 6.0).mul_(6.0))
    t = torch.add(phi.unsqueeze(1), _HUE_OFFSETS.to(x.device))
    t.abs_().sub_(3.0).abs_().clamp_(1.0, 2.0)
    top = vmin.add_(chroma).add_(chroma).unsqueeze(1)  # min + 2C
    torch.addcmul(top, chroma.unsqueeze(1), t, value=-1.0, out=flat)


def jitter_blocks(p: CropParams) -> np.ndarray:
    """Sort key that makes `color_jitter_` cheap: the step (0-3) at which a crop's hue op runs;
    4 for crops without jitter.  Crops must be laid out in ascending key order."""
    hue_step = np.argmax(JITTER_ORDERS[p.jitter_order] == 3, axis=-1)
    return np.where(p.jitter, hue_step, 4)


def color_jitter_(x: torch.Tensor, p: CropParams, skip_hue: bool = False, tile_elems: int = TILE_ELEMS) -> None:
    """torchvision's ColorJitter on every crop with p.jitter, each in its own random op order.

    Step j applies op JITTER_ORDERS[order][j] to every crop.  With crops sorted by
    `jitter_blocks`, the crops whose hue op falls at step j are one contiguous slice, and the
    others (brightness / contrast / saturation) one `blend_` call on each side of it: 4 steps of
    at most 3 calls per tile.  Tiles of ~`tile_elems` floats (4 MB) keep each tile's four steps
    in cache: on one core the jitter is memory-bound, and whole-batch passes would stream from RAM.
    """
    key = jitter_blocks(p)
    if np.any(np.diff(key) < 0):
        raise ValueError("color_jitter_: crops are not laid out in jitter_blocks order")
    n_jit = int(np.sum(key < 4))
    ops = JITTER_ORDERS[p.jitter_order[:n_jit]]  # [n_jit, 4]
    factor = np.stack([p.brightness, p.contrast, p.saturation], axis=1)[:n_jit]
    tile = max(1, tile_elems // max(1, x[0].numel()))
    for t0 in range(0, n_jit, tile):
        t1 = min(n_jit, t0 + tile)
        for step in range(4):
            lo, hi = t0 + np.searchsorted(key[t0:t1], [step, step + 1])
            if hi > lo and not skip_hue:
                adjust_hue_(x[lo:hi], p.hue[lo:hi])
            for a, b in ((t0, lo), (hi, t1)):
                if b > a:
                    o = ops[a:b, step]
                    f = factor[np.arange(a, b), np.minimum(o, 2)]
                    blend_(x[a:b], 1.0 - f, o == 2, o == 1)


def _gaussian_kernels(sigma: np.ndarray, radius: int) -> np.ndarray:
    t = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-0.5 * (t[None, :] / sigma[:, None]) ** 2)
    return (k / k.sum(1, keepdims=True)).astype(np.float32)


def gaussian_blur_(x: torch.Tensor, mask: np.ndarray, sigma: np.ndarray, tile_elems: int = TILE_ELEMS) -> None:
    """Gaussian blur of the crops in `mask` with their own sigma: kernel truncated at ceil(3 sigma),
    reflect padding, separable.

    DINO's PIL GaussianBlur(radius=r) approximates a Gaussian of standard deviation r by box
    filters; this is the Gaussian itself.  Crops are grouped by kernel radius (sigma 0.3 costs 3
    taps, not sigma 2's 13); each group is blurred by shift-and-add, one `addcmul` per tap with
    per-crop weights.  Measured in the pipeline, this beats a depthwise convolution (oneDNN wants
    channels-last, and the two layout transposes cost more than the taps).
    """
    n, c, h, w = x.shape
    radius = np.minimum(np.maximum(1, np.ceil(3.0 * sigma)).astype(np.int64), min(h, w) - 1)
    tile = max(1, tile_elems // (c * h * w))  # cache-sized groups, as in color_jitter_
    groups = [(int(r), idx[i:i + tile]) for r in np.unique(radius[mask])
              for idx in [np.flatnonzero(mask & (radius == r))] for i in range(0, len(idx), tile)]
    for r, idx in groups:
        tidx = torch.from_numpy(idx).to(x.device)
        k = torch.from_numpy(_gaussian_kernels(sigma[idx], r)).to(x.device).view(len(idx), 1, 1, 1, 2 * r + 1)
        sel = x.index_select(0, tidx)
        padded = TF.pad(sel, (r, r, 0, 0), mode="reflect")  # along W
        rows = torch.mul(padded[..., 0:w], k[..., 0])
        for i in range(1, 2 * r + 1):
            rows.addcmul_(padded[..., i:i + w], k[..., i])
        padded = TF.pad(rows, (0, 0, r, r), mode="reflect")  # along H
        out = torch.mul(padded[..., 0:h, :], k[..., 0], out=sel)
        for i in range(1, 2 * r + 1):
            out.addcmul_(padded[..., i:i + h, :], k[..., i])
        x.index_copy_(0, tidx, out)


def bias_field_maps(coeffs: np.ndarray, h: int, w: int, device: torch.device) -> torch.Tensor:
    """exp(sum_{i+j<=3} c_ij x^i y^j) over the crop, x and y in [-1, 1]: [N, 1, h, w].

    TorchIO's RandomBiasField (order 3) in 2-D, coefficients ~ U(-s, s) with s = `bias_field`:
    a smooth multiplicative illumination change (for s = 0.1, typically within +-20 %).
    """
    ys, xs = torch.linspace(-1, 1, h, device=device), torch.linspace(-1, 1, w, device=device)
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    basis = torch.stack([xx**i * yy**j for i in range(4) for j in range(4 - i)]).view(N_BIAS_COEFFS, h * w)
    return torch.exp(torch.as_tensor(coeffs, dtype=torch.float32, device=device) @ basis).view(-1, 1, h, w)


def _subset_(x: torch.Tensor, mask: np.ndarray, fn) -> None:
    """x[mask] = fn(x[mask], idx), without a gather when every crop is selected."""
    idx = np.flatnonzero(mask)
    if len(idx) == len(mask):
        out = fn(x, idx)
        if out is not x:
            x.copy_(out)
    elif len(idx):
        t = torch.from_numpy(idx).to(x.device)
        x.index_copy_(0, t, fn(x.index_select(0, t), idx))


def photometric_(x: torch.Tensor, p: CropParams, cfg: AugmentConfig, is_global2: np.ndarray) -> torch.Tensor:
    """Everything after crop + flip, in DINO's order, on float [N, 3, H, W] in [0, 255], in place.

    Crops must be laid out in `jitter_blocks` order.  The medical artefacts come last, each
    independently per crop: med blur (fixed sigma `med_blur_sigma`, in output pixels), additive
    Gaussian noise (std `noise_std` on [0, 1] intensities, i.e. 255 * std here, then clipped),
    bias field (`bias_field_maps`).
    """
    color_jitter_(x, p, skip_hue=cfg.jitter_hue == 0)
    _subset_(x, p.grayscale, lambda t, i: luma(t).expand_as(t))
    gaussian_blur_(x, p.blur, p.blur_sigma)
    thr = float(cfg.solarize_threshold)  # PIL / torchvision: v >= threshold -> 255 - v
    _subset_(x, p.solarize & is_global2, lambda t, i: torch.where(t >= thr, 255.0 - t, t))
    gaussian_blur_(x, p.med_blur, np.full(len(p.med_blur), max(cfg.med_blur_sigma, 1e-3)))
    if p.noise.any():
        # one stream per (chunk, crop kind): seeded by the chunk's first image and the crop size
        gen = torch.Generator(device=x.device).manual_seed(int(p.noise_seed[0]) ^ (x.shape[-1] * 0x9E3779B1))
        std = 255.0 * cfg.noise_std
        _subset_(x, p.noise, lambda t, i: t.add_(torch.randn(t.shape, generator=gen, device=t.device), alpha=std).clamp_(0, 255))
    _subset_(x, p.bias_field,
             lambda t, i: t.mul_(bias_field_maps(p.bias_coeffs[i], t.shape[2], t.shape[3], t.device)).clamp_(0, 255))
    return x


# ------------------------------------------------------------------ decoding


def _as_bytes(item: object) -> bytes | None:
    if isinstance(item, (bytes, bytearray, memoryview)):
        return bytes(item)
    if isinstance(item, np.ndarray) and item.dtype == np.uint8 and item.ndim == 1:
        return item.tobytes()
    return None


def _image_size(item: ImageInput) -> tuple[int, int]:
    """(height, width) without decoding pixels (image header only for encoded input)."""
    data = _as_bytes(item)
    if data is not None:
        with Image.open(io.BytesIO(data)) as im:
            return im.height, im.width
    if isinstance(item, torch.Tensor):
        return int(item.shape[-2]), int(item.shape[-1])
    if isinstance(item, np.ndarray):
        return int(item.shape[0]), int(item.shape[1])
    raise TypeError(f"image must be encoded bytes, a uint8 CHW tensor or a uint8 HWC array, got {type(item).__name__}")


def _to_chw_uint8(item: torch.Tensor | np.ndarray) -> torch.Tensor:
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


try:
    from torchvision.io import ImageReadMode, decode_jpeg as _decode_jpeg

    _RGB = ImageReadMode.RGB
except ImportError:  # a future torchvision without image decoding: PIL does it
    _decode_jpeg = None


def _decode(data: bytes, draft: int) -> torch.Tensor:
    """Encoded bytes -> uint8 [3, H', W'], JPEG DCT-downscaled by `draft` (1, 2, 4 or 8)."""
    if draft == 1 and data[:2] == b"\xff\xd8" and _decode_jpeg is not None:  # libjpeg-turbo, ~20% faster than PIL
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torchvision 0.29 points to TorchCodec
            return _to_chw_uint8(_decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=_RGB))
    with Image.open(io.BytesIO(data)) as im:
        if draft > 1:
            im.draft("RGB", (im.width // draft, im.height // draft))
        return _to_chw_uint8(np.asarray(im.convert("RGB")))


def _draft_scale(p: CropParams, b: int, sizes: np.ndarray) -> int:
    """Largest JPEG draft factor (8, 4, 2, 1) at which every crop of image b is still downscaled.

    Decoding at 1/s keeps the output distribution when each crop box, s times smaller, still has
    at least as many pixels per side as its output: the crop is then a downsample either way.
    """
    short = np.minimum(p.height[b], p.width[b]) / sizes
    for s in (8, 4, 2):
        if (short >= s).all():
            return s
    return 1


# ------------------------------------------------------------------ the pipeline


class MultiCropAugment:
    """DINO multi-crop augmentation built from an `AugmentConfig`; never imports Ray.

    >>> aug = MultiCropAugment(AugmentConfig(preset="weak"), seed=0)
    >>> crops = aug(image)            # list of uint8 [3, S, S]: global_0, global_1, local_0, ...
    >>> batch = aug.augment_batch(list_of_jpeg_bytes)   # {"global_0": uint8 [B, 3, S, S], ...}

    Randomness comes from a numpy Generator seeded by `seed` (None: fresh entropy); every call may
    pass its own `generator` (an int seed or a torch.Generator) for reproducible draws.
    """

    def __init__(self, cfg: AugmentConfig | None = None, seed: int | None = None, chunk_images: int = 32,
                 backend: str = "auto") -> None:
        self.cfg = cfg if cfg is not None else AugmentConfig()
        if chunk_images < 1:
            raise ValueError(f"chunk_images={chunk_images}: must be >= 1")
        if backend not in BACKENDS:
            raise ValueError(f"backend={backend!r}: allowed {list(BACKENDS)}")
        if backend == "opencv" and _cv is None:
            raise ValueError(f"backend='opencv': OpenCV is not importable ({_CV_ERROR}); "
                             "pip install opencv-python-headless, or use backend='torch'")
        # "opencv": per-crop SIMD kernels (raydino.augment_cv), the fast CPU path; "torch": the
        # batched torch ops below (the device pipeline's, and the fallback without OpenCV).
        self.backend = ("opencv" if _cv is not None else "torch") if backend == "auto" else backend
        # The torch backend runs photometric ops on the crops of `chunk_images` images at a time
        # (~2 MB of float crops per image): per-call overhead, not memory, limits small batches.
        self.chunk_images = chunk_images
        self._buffers: dict[str, torch.Tensor] = {}
        self._workspace = _cv.CropWorkspace() if _cv is not None else None
        self.rng = np.random.default_rng(seed)
        self.mode = self.cfg.interpolation
        self.kinds = [("global", self.cfg.global_crop_size, [0, 1])]
        if self.cfg.n_local_crops > 0:
            self.kinds.append(("local", self.cfg.local_crop_size, list(range(2, 2 + self.cfg.n_local_crops))))
        self.out_size = np.array([self.cfg.global_crop_size] * 2 + [self.cfg.local_crop_size] * self.cfg.n_local_crops)

    def crop_shapes(self) -> dict[str, tuple[int, int, int]]:
        return crop_shapes(self.cfg)

    def _rng_for(self, generator: torch.Generator | int | None) -> np.random.Generator:
        if generator is None:
            return self.rng
        if isinstance(generator, torch.Generator):
            return np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=generator)))
        return np.random.default_rng(int(generator))

    def sample_params(self, sizes: Sequence[tuple[int, int]], generator: torch.Generator | int | None = None) -> CropParams:
        """The random draws a batch of images of these (height, width) would get."""
        return sample_params(self.cfg, sizes, self._rng_for(generator))

    def __call__(self, image: ImageInput, generator: torch.Generator | int | None = None) -> list[torch.Tensor]:
        """One image (uint8 CHW tensor, HWC array or encoded bytes) -> list of uint8 crops, globals first."""
        out = self.augment_tensors([image], generator)
        return [out[k][0] for k in crop_shapes(self.cfg)]

    def augment_bytes(self, data: bytes, generator: torch.Generator | int | None = None) -> list[torch.Tensor]:
        """Encoded image (JPEG: draft-mode reduced decode when every crop allows it) -> crops."""
        if _as_bytes(data) is None:
            raise TypeError(f"augment_bytes expects encoded bytes, got {type(data).__name__}")
        return self(data, generator)

    def augment_batch(self, images: Sequence[ImageInput], generator: torch.Generator | int | None = None) -> dict[str, np.ndarray]:
        """Images -> {"global_0": uint8 [B, 3, Sg, Sg], "global_1": ..., "local_0": [B, 3, Sl, Sl], ...}."""
        return {k: v.numpy() for k, v in self.augment_tensors(images, generator).items()}

    def augment_tensors(self, images: Sequence[ImageInput], generator: torch.Generator | int | None = None,
                        params: CropParams | None = None) -> dict[str, torch.Tensor]:
        """As `augment_batch` but returns torch tensors; `params` replays given draws (tests, debugging)."""
        images = list(images)
        if not images:  # e.g. a Ray Data batch whose rows were all filtered out
            return {k: torch.empty((0, *shape), dtype=torch.uint8) for k, shape in crop_shapes(self.cfg).items()}
        sizes = [_image_size(im) for im in images]
        if params is None:
            params = self.sample_params(sizes, generator)
        return self._run(images, params)

    # -- internals

    def _run(self, images: list, p: CropParams) -> dict[str, torch.Tensor]:
        return self._run_per_crop(images, p) if self.backend == "opencv" else self._run_batched(images, p)

    def _run_per_crop(self, images: list, p: CropParams) -> dict[str, torch.Tensor]:
        """OpenCV backend: image by image, crop by crop, every op of a crop while it sits in cache."""
        B = len(images)
        out = {name: np.empty((len(crops), B, 3, size, size), dtype=np.uint8) for name, size, crops in self.kinds}
        slots = [(name, size, k, i) for name, size, crops in self.kinds for i, k in enumerate(crops)]
        # Every draw as nested Python lists: per-crop reads are then list lookups, not numpy scalar
        # boxing (~40 reads per crop; Python overhead is a tenth of the per-crop cost here).
        q = SimpleNamespace(**{f.name: getattr(p, f.name).tolist() for f in fields(p)},
                            order=JITTER_ORDERS[p.jitter_order].tolist())
        for b in range(B):
            img, sy, sx = self._decoded(images[b], p, b)
            for name, size, k, i in slots:
                box = (q.top[b][k], q.left[b][k], q.height[b][k], q.width[b][k])
                crop = self._resize_box(img, box, size, sy, sx, channels_last=True)[0].permute(1, 2, 0).numpy()
                self._photometric_crop(crop, q, b, k, list(out[name][i, b]))
        names = {"global": [f"global_{i}" for i in range(2)], "local": [f"local_{i}" for i in range(self.cfg.n_local_crops)]}
        return {key: torch.from_numpy(out[name][i]) for name, _, _ in self.kinds for i, key in enumerate(names[name])}

    def _photometric_crop(self, crop: np.ndarray, q: SimpleNamespace, b: int, k: int, planes: list[np.ndarray]) -> None:
        """Flip and DINO's photometric ops, in DINO's order, on one uint8 HWC crop; result -> CHW planes.

        q holds the draws of `CropParams` as nested lists (q.flip[b][k], ...) plus q.order[b][k],
        the crop's jitter op order.
        """
        cfg, ws, size = self.cfg, self._workspace, crop.shape[0]
        if not crop.flags.c_contiguous:  # OpenCV wants interleaved HWC (the channels-last resize gives it)
            crop = np.ascontiguousarray(crop)
        if q.flip[b][k]:
            crop = _cv.cv2.flip(crop, 1, dst=ws.get("flip", size, np.uint8))
        jitter, gray, blur, med_blur, noise, bias = (q.jitter[b][k], q.grayscale[b][k], q.blur[b][k],
                                                     q.med_blur[b][k], q.noise[b][k], q.bias_field[b][k])
        solarize = q.solarize[b][k] and k == 1  # DINO solarizes global crop 2 only
        if not (jitter or gray or blur or solarize or med_blur or noise or bias):
            _cv.cv2.split(crop, planes)  # nothing photometric: the resized crop is the output
            return
        x = ws.get("x", size)
        np.copyto(x, crop)  # uint8 -> float32 on [0, 255], once per crop
        if jitter:
            factors = (q.brightness[b][k], q.contrast[b][k], q.saturation[b][k])
            for op in q.order[b][k]:
                if op == 3:
                    if q.hue[b][k] != 0:  # jitter_hue = 0: torchvision skips the op
                        _cv.hue_(x, q.hue[b][k], ws.get("hsv", size))
                elif factors[op] != 1:
                    _cv.JITTER_FNS[op](x, factors[op])
        if gray:
            _cv.grayscale_(x)
        if blur:
            x = _cv.gaussian_blur(x, q.blur_sigma[b][k], ws.other(x))
        if solarize:
            _cv.solarize_(x, float(cfg.solarize_threshold))
        if med_blur:
            x = _cv.gaussian_blur(x, max(cfg.med_blur_sigma, 1e-3), ws.other(x))
        if noise:
            # one stream per (image, crop), seeded by the image's draw: independent of batch composition
            noise = np.random.default_rng((q.noise_seed[b], k)).standard_normal(x.shape, dtype=np.float32)
            np.clip(np.add(x, noise * np.float32(255.0 * cfg.noise_std), out=x), 0, 255, out=x)
        if bias:
            field = bias_field_maps(np.array([q.bias_coeffs[b][k]]), size, size, torch.device("cpu"))[0, 0].numpy()
            np.clip(np.multiply(x, field[:, :, None], out=x), 0, 255, out=x)
        _cv.to_uint8_planes(x, ws.get("u8", size, np.uint8), planes)

    def _run_batched(self, images: list, p: CropParams) -> dict[str, torch.Tensor]:
        """torch backend: crops stacked per kind, photometric ops batched over chunks of images."""
        B = len(images)
        out = {name: torch.empty((len(crops), B, 3, size, size), dtype=torch.uint8) for name, size, crops in self.kinds}
        for start in range(0, B, self.chunk_images):
            chunk = range(start, min(B, start + self.chunk_images))
            layouts = [self._layout(p, chunk, name, crops, size) for name, size, crops in self.kinds]
            for b in chunk:
                img, sy, sx = self._decoded(images[b], p, b)
                for (bb, kk, slot, x), (_, size, crops) in zip(layouts, self.kinds):
                    for k in crops:  # uint8 crop -> its float slot (the conversion is this copy)
                        x[slot[b - start, k]].copy_(self._crop(img, p, b, k, size, sy, sx))
            for (bb, kk, slot, x), (name, size, crops) in zip(layouts, self.kinds):
                photometric_(x, p.select(bb, kk), self.cfg, is_global2=(kk == 1))
                # values lie in [0, 255]: +0.5, then the truncating cast rounds.  Via int32: torch's
                # float->uint8 cast is not vectorised on CPU, float->int32->uint8 is (2x faster).
                xi = self._buffer("int", x.shape, torch.int32).copy_(x.add_(0.5))
                for i, (b, k) in enumerate(zip(bb, kk)):
                    out[name][k - crops[0], b].copy_(xi[i])
        names = {"global": [f"global_{i}" for i in range(2)], "local": [f"local_{i}" for i in range(self.cfg.n_local_crops)]}
        return {key: out[name][i] for name, _, _ in self.kinds for i, key in enumerate(names[name])}

    def _layout(self, p: CropParams, chunk: range, name: str, crops: list[int], size: int):
        """Slots of one crop kind for a chunk of images, in `jitter_blocks` order, and their float buffer."""
        bb = np.repeat(np.array(list(chunk)), len(crops))
        kk = np.tile(np.array(crops), len(chunk))
        order = np.argsort(jitter_blocks(p.select(bb, kk)), kind="stable")
        bb, kk = bb[order], kk[order]
        slot = np.empty((len(chunk), 2 + self.cfg.n_local_crops), dtype=np.int64)
        slot[bb - chunk.start, kk] = np.arange(len(bb))
        return bb, kk, slot, self._buffer(f"{name}_float", (len(bb), 3, size, size), torch.float32)

    def _buffer(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A reused work buffer: fresh multi-MB allocations cost a page fault per 4 kB on first touch."""
        n = math.prod(shape)
        buf = self._buffers.get(name)
        if buf is None or buf.numel() < n or buf.dtype != dtype:
            buf = self._buffers[name] = torch.empty(n, dtype=dtype)
        return buf[:n].view(shape)

    def _decoded(self, item: ImageInput, p: CropParams, b: int) -> tuple[torch.Tensor, float, float]:
        data = _as_bytes(item)
        img = _decode(data, _draft_scale(p, b, self.out_size)) if data is not None else _to_chw_uint8(item)
        return img, img.shape[1] / int(p.image_height[b]), img.shape[2] / int(p.image_width[b])

    def _crop(self, img: torch.Tensor, p: CropParams, b: int, k: int, size: int, sy: float, sx: float) -> torch.Tensor:
        """Crop box -> one antialiased resize on uint8 (torch's native kernel) -> flip: uint8 [3, S, S]."""
        box = (int(p.top[b, k]), int(p.left[b, k]), int(p.height[b, k]), int(p.width[b, k]))
        crop = self._resize_box(img, box, size, sy, sx)[0]
        return crop.flip(-1) if p.flip[b, k] else crop

    def _resize_box(self, img: torch.Tensor, box: tuple[int, int, int, int], size: int, sy: float, sx: float,
                    channels_last: bool = False) -> torch.Tensor:
        """The crop box (top, left, height, width) of the full-size image as a view of img (decoded at
        sy, sx of full size), resized to size x size: uint8 [1, 3, S, S].

        channels_last: give the box a 4-D channels-last view, so that the resize kernel sees the
        layout it computes in (25-30 % faster) and returns an HWC-contiguous crop.
        """
        t, l, h, w = box
        if sy != 1.0 or sx != 1.0:  # draft-decoded: the box in reduced coordinates (sub-pixel rounding)
            t, l = min(round(t * sy), img.shape[1] - 1), min(round(l * sx), img.shape[2] - 1)
            h, w = max(1, min(round(h * sy), img.shape[1] - t)), max(1, min(round(w * sx), img.shape[2] - l))
        if channels_last and img.stride(0) == 1:
            sc, sh, sw = img.stride()
            box = torch.as_strided(img, (1, 3, h, w), (sh * img.shape[1], sc, sh, sw), img.storage_offset() + t * sh + l * sw)
        else:
            box = img[:, t:t + h, l:l + w].unsqueeze(0)
        return TF.interpolate(box, size=(size, size), mode=self.mode, antialias=True, align_corners=False)
